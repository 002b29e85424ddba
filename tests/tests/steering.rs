//! End to end: why the routing is what it is (`sextantctl explain`) and
//! what losing a region would do (`sextantctl n-minus-one`).

use std::collections::BTreeSet;

use anyhow::{ensure, Context, Result};
use sextant_tests::{example_fleet, ControlPlane};

#[test]
fn explain_shows_the_drain_binding_and_where_the_traffic_went() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cp = ControlPlane::start(dir.path(), Some(&example_fleet()))?;
    let ctl = cp.ctl();
    let before = ctl.json(["explain", "www", "--group", "nl"])?;
    let eu_west: BTreeSet<String> = ctl
        .json(["get", "edges"])?
        .as_array()
        .context("edges")?
        .iter()
        .filter(|e| {
            e["site"]
                .as_str()
                .is_some_and(|s| s.starts_with("region/eu-west/"))
        })
        .filter_map(|e| e["id"].as_str().map(str::to_owned))
        .collect();
    let weight_in = |v: &serde_json::Value, set: &BTreeSet<String>| -> f64 {
        v["edges"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["edge"].as_str().is_some_and(|id| set.contains(id)))
            .filter_map(|e| e["weight"].as_f64())
            .sum()
    };
    ensure!(
        weight_in(&before, &eu_west) > 0.99,
        "nl is not served from eu-west: {before}"
    );

    ctl.run(["drain", "region/eu-west", "--reason", "maintenance"])?
        .ok()?;
    let after = ctl.json(["explain", "www", "--group", "nl"])?;
    ensure!(after["version"] == 2, "{after}");
    let edges = after["edges"].as_array().context("edges")?;
    let mut total = after["unserved"].as_f64().unwrap_or(0.0);
    for e in edges {
        let id = e["edge"].as_str().unwrap_or_default();
        let binding: Vec<&str> = e["binding"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| b.as_str())
            .collect();
        total += e["weight"].as_f64().unwrap_or(0.0);
        if eu_west.contains(id) {
            ensure!(binding.contains(&"drain"), "{id}: {e}");
            ensure!(e["weight"] == 0.0, "{id} still has weight: {e}");
            ensure!(
                e["drains"].as_array().is_some_and(|d| d
                    .iter()
                    .any(|x| x.as_str().is_some_and(|x| x.contains("region/eu-west")))),
                "{id}: {e}"
            );
        } else if e["weight"].as_f64().unwrap_or(0.0) > 0.0 {
            ensure!(!binding.is_empty(), "{id} has weight but no binding: {e}");
            ensure!(!e["reason"].as_str().unwrap_or_default().is_empty(), "{e}");
        }
    }
    ensure!((total - 1.0).abs() < 1e-9, "weights + unserved = {total}");
    // The human form names the binding constraint.
    let human = ctl.run(["explain", "www", "--group", "nl"])?.ok()?.stdout;
    ensure!(
        human.contains("drain") && human.contains("BINDING"),
        "{human}"
    );
    // Unknown names are clear errors.
    let out = ctl.run(["explain", "www", "--group", "atlantis"])?;
    ensure!(
        !out.success && out.stderr.contains("unknown client group"),
        "{}",
        out.stderr
    );
    Ok(())
}

#[test]
fn n_minus_one_covers_every_region_and_provider() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cp = ControlPlane::start(dir.path(), Some(&example_fleet()))?;
    let report = cp.ctl().json(["n-minus-one"])?;
    let lost: BTreeSet<&str> = report["scenarios"]
        .as_array()
        .context("scenarios")?
        .iter()
        .filter_map(|s| s["lost"].as_str())
        .collect();
    let expected = BTreeSet::from([
        "region/ap-south",
        "region/eu-central",
        "region/eu-west",
        "region/us-east",
        "provider/cdn-a",
        "provider/cdn-b",
    ]);
    ensure!(lost == expected, "{lost:?}");
    for s in report["scenarios"].as_array().into_iter().flatten() {
        let domains = s["domains"].as_array().context("domains")?;
        ensure!(
            domains.iter().all(|d| d["domain"] != s["lost"]),
            "the lost domain is in its own scenario: {s}"
        );
        ensure!(
            s["max_utilization"].as_f64().is_some_and(|u| u >= 0.0),
            "{s}"
        );
    }
    Ok(())
}

fn shift_fleet(e1_latency: u32) -> String {
    format!(
        r#"
[[services]]
id = "www"
hostname = "www.example.com"
zone = "example.com"
default_group = "g"
nameservers = ["ns1.example.com"]
policy = {{ max_shift = 0.25 }}

[[edges]]
id = "e1"
kind = "self_built"
site = "region/r1/metro/m1/site/s1"
addresses = ["127.0.1.1"]
capacity_rps = 10000
health_check = "127.0.1.1:80"

[[edges]]
id = "e2"
kind = "self_built"
site = "region/r2/metro/m2/site/s2"
addresses = ["127.0.1.2"]
capacity_rps = 10000
health_check = "127.0.1.2:80"

[[groups]]
id = "g"
prefixes = ["10.0.0.0/8"]
demand_rps = {{ www = 1000 }}
latency_ms = {{ e1 = {e1_latency}, e2 = 20 }}
"#
    )
}

#[test]
fn a_shift_limited_move_steps_by_itself() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let a = dir.path().join("a.toml");
    let b = dir.path().join("b.toml");
    std::fs::write(&a, shift_fleet(10))?;
    std::fs::write(&b, shift_fleet(40))?;
    let cp = ControlPlane::start_with(
        &dir.path().join("cp"),
        Some(&a),
        &["--shift-interval-seconds", "1"],
    )?;
    let ctl = cp.ctl();
    let weight_e2 = || -> Result<(f64, u64)> {
        let r = ctl.json(["routes", "www", "--group", "g"])?;
        let w = r["rows"][0]["weights"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|w| w["edge"] == "e2")
            .and_then(|w| w["weight"].as_f64())
            .unwrap_or(0.0);
        Ok((w, r["version"].as_u64().unwrap_or(0)))
    };
    ensure!(
        weight_e2()?.0 == 0.0,
        "e2 carries traffic before the change"
    );
    // e2 becomes the cheaper edge: the move is limited to 25% per step.
    ctl.run(["apply".as_ref(), "-f".as_ref(), b.as_os_str()])?
        .ok()?;
    let (w, v) = weight_e2()?;
    ensure!((w - 0.25).abs() < 1e-9, "first step moved {w}");
    let done = sextant_tests::eventually(
        std::time::Duration::from_secs(15),
        "the move to finish",
        || weight_e2().ok().filter(|(w, _)| (*w - 1.0).abs() < 1e-9),
    )?;
    ensure!(done.1 == v + 3, "steps: version {} after {v}", done.1);
    let audit = ctl.json(["audit"])?;
    let steps = audit
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["action"] == "routing.shift_step" && r["actor"] == "sextant-cp")
        .count();
    ensure!(steps == 3, "{steps} shift steps audited: {audit}");
    Ok(())
}
