//! End to end: an operator applies a fleet, drains a region through the
//! CLI, and sees the routing move; state survives a crash and a restart.

use std::collections::BTreeSet;

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use sextant_tests::{example_fleet, ControlPlane, Ctl};

const EPS: f64 = 1e-9;

/// Edge ids under a domain path, from `get edges -o json`.
fn edges_under(ctl: &Ctl, domain: &str) -> Result<BTreeSet<String>> {
    let edges = ctl.json(["get", "edges"])?;
    let prefix = format!("{domain}/");
    Ok(edges
        .as_array()
        .context("edges is not a list")?
        .iter()
        .filter(|e| e["site"].as_str().is_some_and(|s| s.starts_with(&prefix)))
        .filter_map(|e| e["id"].as_str().map(str::to_owned))
        .collect())
}

/// Checks every row of `routes SERVICE -o json`: weights plus unserved sum
/// to 1, and returns the total weight put on `edges` over all rows.
fn weight_on(ctl: &Ctl, service: &str, edges: &BTreeSet<String>) -> Result<(f64, u64)> {
    let routes = ctl.json(["routes", service])?;
    let rows = routes["rows"].as_array().context("rows")?;
    ensure!(rows.len() == 20, "expected 20 groups, got {}", rows.len());
    let mut on = 0.0;
    for row in rows {
        let weights = row["weights"].as_array().context("weights")?;
        let mut sum = row["unserved"].as_f64().context("unserved")?;
        for w in weights {
            let weight = w["weight"].as_f64().context("weight")?;
            sum += weight;
            if edges.contains(w["edge"].as_str().context("edge")?) {
                on += weight;
            }
        }
        ensure!((sum - 1.0).abs() < EPS, "row {row} sums to {sum}");
    }
    Ok((on, routes["version"].as_u64().context("version")?))
}

fn version(ctl: &Ctl) -> Result<u64> {
    ctl.json(["status"])?["routing_version"]
        .as_u64()
        .context("routing_version")
}

#[test]
fn drain_moves_routing_and_survives_a_crash() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cp = ControlPlane::start(dir.path(), None)?;
    let ctl = cp.ctl();

    let fleet = example_fleet();
    let applied = ctl
        .run([
            "apply".as_ref(),
            "-f".as_ref(),
            fleet.as_os_str(),
            "--reason".as_ref(),
            "initial fleet".as_ref(),
        ])?
        .ok()?;
    ensure!(
        applied.stdout.contains("generation 1"),
        "{}",
        applied.stdout
    );

    let eu_west = edges_under(&ctl, "region/eu-west")?;
    ensure!(eu_west.len() >= 4, "eu-west edges: {eu_west:?}");
    for service in ["www", "api"] {
        let (on, _) = weight_on(&ctl, service, &eu_west)?;
        ensure!(on > 0.5, "{service}: eu-west carries {on} before the drain");
    }

    let drained = ctl
        .run([
            "drain",
            "region/eu-west",
            "--reason",
            "maintenance window 42",
        ])?
        .ok()?;
    ensure!(
        drained.stdout.contains("routing version 1 -> 2"),
        "{}",
        drained.stdout
    );
    for service in ["www", "api"] {
        let (on, v) = weight_on(&ctl, service, &eu_west)?;
        ensure!(
            on == 0.0,
            "{service}: eu-west still carries {on} after the drain"
        );
        ensure!(v == 2, "version {v}");
    }

    ctl.run(["undrain", "region/eu-west", "--reason", "maintenance done"])?
        .ok()?;
    let (on, v) = weight_on(&ctl, "www", &eu_west)?;
    ensure!(
        on > 0.5 && v == 3,
        "after undrain: weight {on}, version {v}"
    );

    // Drain again, then crash the control plane and restart it.
    ctl.run([
        "drain",
        "region/eu-west/metro/ams",
        "--fraction",
        "0.5",
        "--reason",
        "half of ams",
    ])?
    .ok()?;
    ctl.run(["drain", "region/eu-west", "--reason", "second window"])?
        .ok()?;
    let before_crash = version(&ctl)?;
    ensure!(before_crash == 5, "version before crash {before_crash}");
    cp.process.kill()?;

    let cp = ControlPlane::start(dir.path(), Some(&fleet))?;
    let ctl = cp.ctl();
    let drains = ctl.json(["get", "drains"])?;
    let domains: BTreeSet<&str> = drains
        .as_array()
        .context("drains")?
        .iter()
        .filter_map(|d| d["domain"].as_str())
        .collect();
    ensure!(
        domains == BTreeSet::from(["region/eu-west", "region/eu-west/metro/ams"]),
        "drains after restart: {drains}"
    );
    let after_restart = version(&ctl)?;
    ensure!(
        after_restart >= before_crash,
        "version went back: {after_restart} < {before_crash}"
    );
    let (on, _) = weight_on(&ctl, "www", &eu_west)?;
    ensure!(on == 0.0, "eu-west carries {on} after the restart");
    // --fleet on restart does not overwrite the stored fleet.
    ensure!(
        ctl.json(["status"])?["fleet_generation"] == 1,
        "fleet was re-seeded"
    );

    // The next change continues the version sequence.
    ctl.run(["undrain", "region/eu-west", "--reason", "after restart"])?
        .ok()?;
    ensure!(
        version(&ctl)? == after_restart + 1,
        "no gap or repeat after restart"
    );

    // The audit log lists every action with its reason and versions.
    let audit = ctl.json(["audit"])?;
    let records = audit.as_array().context("audit")?;
    let summary: Vec<(String, String, String)> = records
        .iter()
        .map(|r| {
            (
                r["action"].as_str().unwrap_or_default().to_owned(),
                r["target"].as_str().unwrap_or_default().to_owned(),
                r["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let expect = [
        ("fleet.apply", "generation 1", "initial fleet"),
        ("drain", "region/eu-west", "maintenance window 42"),
        ("undrain", "region/eu-west", "maintenance done"),
        ("drain", "region/eu-west/metro/ams", "half of ams"),
        ("drain", "region/eu-west", "second window"),
        ("undrain", "region/eu-west", "after restart"),
    ];
    ensure!(summary.len() == expect.len(), "audit: {summary:?}");
    for ((a, t, r), (ea, et, er)) in summary.iter().zip(expect) {
        ensure!(a == ea && t == et && r == er, "audit: {summary:?}");
    }
    for r in records {
        ensure!(r["actor"] == "e2e-test", "actor of {r}");
        let (b, a) = (
            r["routing_version_before"].as_u64().unwrap_or(0),
            r["routing_version_after"].as_u64().unwrap_or(0),
        );
        ensure!(a == b + 1, "versions of {r}");
    }
    Ok(())
}

#[test]
fn a_broken_fleet_is_refused_and_changes_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let fleet = example_fleet();
    let cp = ControlPlane::start(dir.path(), Some(&fleet))?;
    let ctl = cp.ctl();
    let stored = ctl.run(["get", "fleet"])?.ok()?.stdout;
    let v = version(&ctl)?;

    let text = std::fs::read_to_string(&fleet)?
        .replacen("capacity_rps = 30000", "capacity_rps = 0", 1)
        .replacen(
            "default_group = \"default\"",
            "default_group = \"nowhere\"",
            1,
        );
    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, text)?;
    let out = ctl.run(["apply".as_ref(), "-f".as_ref(), broken.as_os_str()])?;
    ensure!(!out.success, "a broken fleet was applied");
    ensure!(
        out.stderr.starts_with("error: invalid fleet: 2 problems"),
        "{}",
        out.stderr
    );
    ensure!(
        out.stderr.contains("edges[0] \"ams1\".capacity_rps"),
        "{}",
        out.stderr
    );
    ensure!(
        out.stderr.contains("services[0] \"www\".default_group"),
        "{}",
        out.stderr
    );
    ensure!(
        out.stderr.lines().count() == 1,
        "not one line: {}",
        out.stderr
    );

    // A syntax error names its line.
    std::fs::write(&broken, "[[edges]\nid = 1\n")?;
    let out = ctl.run(["apply".as_ref(), "-f".as_ref(), broken.as_os_str()])?;
    ensure!(
        !out.success && out.stderr.contains("line 1"),
        "{}",
        out.stderr
    );

    // `diff` of a broken file fails the same way and writes nothing.
    let out = ctl.run(["diff".as_ref(), "-f".as_ref(), broken.as_os_str()])?;
    ensure!(!out.success, "diff accepted a broken fleet");

    ensure!(
        ctl.run(["get", "fleet"])?.ok()?.stdout == stored,
        "stored fleet changed"
    );
    ensure!(version(&ctl)? == v, "routing version moved");
    ensure!(
        ctl.json(["audit"])?.as_array().map(Vec::len) == Some(1),
        "audit grew"
    );
    Ok(())
}

#[test]
fn bad_drain_requests_are_refused_and_change_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cp = ControlPlane::start(dir.path(), Some(&example_fleet()))?;
    let ctl = cp.ctl();
    let v = version(&ctl)?;
    let cases: [(&[&str], &str); 6] = [
        (
            &["drain", "region/mars", "--reason", "x"],
            "unknown fault domain region/mars",
        ),
        (
            &["drain", "region/Mars", "--reason", "x"],
            "invalid fault-domain path",
        ),
        (&["drain", "region/eu-west"], "--reason"),
        (
            &["drain", "region/eu-west", "--reason", "  "],
            "a reason is required",
        ),
        (
            &[
                "drain",
                "region/eu-west",
                "--reason",
                "x",
                "--fraction",
                "1.5",
            ],
            "(0, 1]",
        ),
        (
            &[
                "drain",
                "region/eu-west",
                "--reason",
                "x",
                "--fraction",
                "0",
            ],
            "(0, 1]",
        ),
    ];
    for (args, expected) in cases {
        let out = ctl.run(args)?;
        ensure!(!out.success, "{args:?} succeeded");
        ensure!(out.stderr.contains(expected), "{args:?}: {}", out.stderr);
    }
    let out = ctl.run(["undrain", "region/eu-west"])?;
    ensure!(
        !out.success && out.stderr.contains("is not drained"),
        "{}",
        out.stderr
    );
    ensure!(version(&ctl)? == v, "version moved");
    ensure!(
        ctl.json(["get", "drains"])? == Value::Array(vec![]),
        "a drain was stored"
    );
    Ok(())
}

#[test]
fn dry_run_shows_the_diff_and_writes_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cp = ControlPlane::start(dir.path(), Some(&example_fleet()))?;
    let ctl = cp.ctl();
    let v = version(&ctl)?;
    let eu_west = edges_under(&ctl, "region/eu-west")?;
    let preview = ctl.json([
        "drain",
        "region/eu-west",
        "--reason",
        "preview",
        "--dry-run",
    ])?;
    ensure!(preview["dry_run"] == true, "{preview}");
    let changes = preview["changes"].as_array().context("changes")?;
    ensure!(!changes.is_empty(), "no changes in preview");
    for c in changes {
        for w in c["after"].as_array().context("after")? {
            let edge = w["edge"].as_str().unwrap_or_default();
            ensure!(!eu_west.contains(edge), "preview keeps {edge}: {c}");
        }
    }
    let total = preview["shifts"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["scope"] == "total"))
        .context("total shift")?;
    ensure!(
        total["moved_share"].as_f64().unwrap_or(0.0) > 0.1,
        "{total}"
    );
    ensure!(version(&ctl)? == v, "dry run moved the version");
    ensure!(
        ctl.json(["get", "drains"])? == Value::Array(vec![]),
        "dry run stored a drain"
    );
    // The human form says it wrote nothing.
    let human = ctl
        .run(["drain", "region/eu-west", "--reason", "p", "--dry-run"])?
        .ok()?;
    ensure!(human.stdout.contains("nothing written"), "{}", human.stdout);
    Ok(())
}

#[test]
fn read_commands_have_json_output() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cp = ControlPlane::start(dir.path(), Some(&example_fleet()))?;
    let ctl = cp.ctl();
    let domains = ctl.json(["get", "domains"])?;
    let kinds: BTreeSet<&str> = domains
        .as_array()
        .context("domains")?
        .iter()
        .filter_map(|d| d["kind"].as_str())
        .collect();
    ensure!(
        kinds == BTreeSet::from(["metro", "origin", "provider", "region", "site"]),
        "{kinds:?}"
    );
    ensure!(ctl.json(["get", "services"])?.as_array().map(Vec::len) == Some(2));
    ensure!(ctl.json(["get", "groups"])?.as_array().map(Vec::len) == Some(20));
    ensure!(ctl.json(["get", "edges"])?.as_array().map(Vec::len) == Some(20));
    ensure!(ctl.json(["versions"])?.as_array().map(Vec::len) == Some(1));
    let one = ctl.json(["routes", "www", "--group", "nl"])?;
    ensure!(one["rows"].as_array().map(Vec::len) == Some(1), "{one}");
    let out = ctl.run(["routes", "nope"])?;
    ensure!(
        !out.success && out.stderr.contains("unknown service"),
        "{}",
        out.stderr
    );
    // Diff of the same fleet: nothing changes.
    let fleet = example_fleet();
    let diff = ctl.json(["diff".as_ref(), "-f".as_ref(), fleet.as_os_str()])?;
    ensure!(diff["changes"] == Value::Array(vec![]), "{diff}");
    ensure!(diff["routing_changes"] == Value::Array(vec![]), "{diff}");
    Ok(())
}

#[test]
fn an_unreachable_server_is_one_clear_line() -> Result<()> {
    let ctl = Ctl {
        url: "http://127.0.0.1:1".into(),
    };
    let out = ctl.run(["status"])?;
    ensure!(!out.success, "status succeeded against nothing");
    ensure!(
        out.stderr
            .starts_with("error: cannot reach the control plane at http://127.0.0.1:1"),
        "{}",
        out.stderr
    );
    ensure!(out.stderr.trim_end().lines().count() == 1, "{}", out.stderr);
    Ok(())
}
