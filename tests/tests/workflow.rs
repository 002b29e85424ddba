//! End to end: the operator workflow — stepped drains, guardrails and
//! --force, expiry, drills that abort and restore, restarts mid-drain, and
//! bad input refused.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use sextant_tests::fleets::{origins_and_fleet, SITE1};
use sextant_tests::origin::Origin;
use sextant_tests::{eventually, example_fleet, split, ControlPlane, Ctl, DnsServer, EdgeProxy};

fn version(ctl: &Ctl) -> Result<u64> {
    ctl.json(["status"])?["routing_version"]
        .as_u64()
        .context("routing_version")
}

fn drains(ctl: &Ctl) -> Result<BTreeMap<String, Value>> {
    Ok(ctl
        .json(["get", "drains"])?
        .as_array()
        .context("drains")?
        .iter()
        .filter_map(|d| Some((d["domain"].as_str()?.to_owned(), d.clone())))
        .collect())
}

fn audit_actions(ctl: &Ctl) -> Result<Vec<(String, String)>> {
    Ok(ctl
        .json(["audit"])?
        .as_array()
        .context("audit")?
        .iter()
        .map(|r| {
            (
                r["action"].as_str().unwrap_or_default().to_owned(),
                r["target"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect())
}

/// The share of o2 in e1's upstream split over `n` requests.
fn o2_share(edge: &EdgeProxy, n: usize) -> Result<f64> {
    let counts = split(edge.process.addr, n)?;
    Ok(*counts.get("o2").unwrap_or(&0) as f64 / n as f64)
}

struct Rig {
    _origins: Vec<Origin>,
    cp: ControlPlane,
    edge: EdgeProxy,
    _dir: tempfile::TempDir,
}

fn rig(extra: &[&str]) -> Result<Rig> {
    let dir = tempfile::tempdir()?;
    let (origins, fleet) = origins_and_fleet(dir.path())?;
    let cp = ControlPlane::start_with(&dir.path().join("cp"), Some(&fleet), extra)?;
    let edge = EdgeProxy::start(&cp.url(), "e1", SITE1, &dir.path().join("e1"))?;
    let v = version(&cp.ctl())?;
    eventually(
        Duration::from_secs(10),
        "the edge to hold the config",
        || (edge.config_version().ok()? == v).then_some(()),
    )?;
    Ok(Rig {
        _origins: origins,
        cp,
        edge,
        _dir: dir,
    })
}

#[test]
fn a_stepped_drain_moves_step_by_step_and_undrains_back() -> Result<()> {
    let rig = rig(&[])?;
    let ctl = rig.cp.ctl();
    // o2 is 2000 of 4000 rps of origin capacity.
    let share = o2_share(&rig.edge, 1000)?;
    ensure!((share - 0.5).abs() < 0.06, "o2 share before: {share}");
    let v0 = version(&ctl)?;

    // Drain o2 in two steps, 2 s apart, and wait for it (--wait follows
    // the steps and the edge's ACKs).
    let out = ctl
        .run([
            "drain",
            "region/r2/origin/o2",
            "--steps",
            "0.5,1.0",
            "--interval",
            "2s",
            "--reason",
            "o2 maintenance",
            "--wait",
        ])?
        .ok()?;
    ensure!(
        out.stdout
            .contains("stepped region/r2/origin/o2: fraction 1 of 1"),
        "{}",
        out.stdout
    );
    ensure!(out.stdout.contains("edges 1/1"), "{}", out.stdout);
    ensure!(version(&ctl)? == v0 + 2, "two versions: one per step");
    let share = o2_share(&rig.edge, 1000)?;
    ensure!(share == 0.0, "o2 still gets {share} after the last step");
    // The first step was a third (1000 of 3000) — check it through the audit.
    let acts = audit_actions(&ctl)?;
    ensure!(
        acts.iter()
            .filter(|(a, t)| a == "drain.step" && t == "region/r2/origin/o2")
            .count()
            == 1,
        "{acts:?}"
    );

    // Undrain steps back down: 0.5 at once, then gone 2 s later.
    let started = Instant::now();
    ctl.run([
        "undrain",
        "region/r2/origin/o2",
        "--reason",
        "done",
        "--wait",
    ])?
    .ok()?;
    ensure!(
        started.elapsed() >= Duration::from_millis(1500),
        "undrain did not step"
    );
    ensure!(drains(&ctl)?.is_empty(), "drain still there");
    let share = o2_share(&rig.edge, 1000)?;
    ensure!(
        (share - 0.5).abs() < 0.06,
        "o2 share after undrain: {share}"
    );
    let acts = audit_actions(&ctl)?;
    ensure!(acts.iter().any(|(a, _)| a == "drain.done"), "{acts:?}");
    Ok(())
}

/// The A records `sextant-dns` answers for a client in the fleet's group.
fn answers(dns: &DnsServer) -> Result<Vec<String>> {
    Ok(dns
        .dig(&["www.example.com", "A", "+short", "+subnet=10.1.0.0/24"])?
        .lines()
        .map(str::to_owned)
        .collect())
}

#[test]
fn a_stepped_region_drain_reaches_dns_and_comes_back() -> Result<()> {
    let rig = rig(&[])?;
    let ctl = rig.cp.ctl();
    let dns = DnsServer::start(&rig.cp.url(), "dns-1", &rig._dir.path().join("dns"))?;
    let v = version(&ctl)?;
    eventually(
        Duration::from_secs(10),
        "the DNS server to hold the config",
        || (dns.config_version().ok()? == v).then_some(()),
    )?;
    // r1 (e1, 10 ms) serves the group before the drain.
    let before = answers(&dns)?;
    ensure!(before.iter().any(|a| a == "127.0.1.1"), "{before:?}");

    let out = ctl
        .run([
            "drain",
            "region/r1",
            "--steps",
            "0.5,1.0",
            "--interval",
            "1s",
            "--reason",
            "r1 maintenance",
            "--wait",
        ])?
        .ok()?;
    ensure!(out.stdout.contains("fraction 1 of 1"), "{}", out.stdout);
    ensure!(
        out.stdout.contains("dns 1/1") && out.stdout.contains("edges 1/1"),
        "{}",
        out.stdout
    );
    // --wait returned once the DNS server ACKed the last step: it answers
    // with r2 only, at once.
    let during = answers(&dns)?;
    ensure!(
        !during.is_empty() && during.iter().all(|a| a == "127.0.1.2"),
        "{during:?}"
    );

    ctl.run([
        "undrain",
        "region/r1",
        "--now",
        "--reason",
        "done",
        "--wait",
    ])?
    .ok()?;
    let after = answers(&dns)?;
    ensure!(
        after == before,
        "answers after undrain {after:?}, before {before:?}"
    );
    Ok(())
}

#[test]
fn guardrails_refuse_with_numbers_and_force_is_audited() -> Result<()> {
    // The example fleet with three times its demand: losing us-east then
    // leaves demand unserved.
    let dir = tempfile::tempdir()?;
    let heavy = dir.path().join("heavy.toml");
    std::fs::write(
        &heavy,
        scaled_demand(&std::fs::read_to_string(example_fleet())?, 3)?,
    )?;
    let cp = ControlPlane::start_with(
        &dir.path().join("cp"),
        Some(&heavy),
        &["--max-move-share", "0.2"],
    )?;
    let ctl = cp.ctl();
    let v = version(&ctl)?;

    let out = ctl.run(["drain", "region/us-east", "--reason", "test"])?;
    ensure!(!out.success, "an overloading drain went through");
    ensure!(
        out.stderr.contains("refused by guardrails"),
        "{}",
        out.stderr
    );
    ensure!(
        out.stderr.contains("rps of demand would be left unserved"),
        "{}",
        out.stderr
    );
    ensure!(out.stderr.contains("above its planned"), "{}", out.stderr);
    ensure!(
        out.stderr.contains("--force --force-reason"),
        "{}",
        out.stderr
    );
    ensure!(
        version(&ctl)? == v && drains(&ctl)?.is_empty(),
        "a refused drain changed something"
    );
    // The dry run shows the same verdict without refusing.
    let preview = ctl.json(["drain", "region/us-east", "--reason", "t", "--dry-run"])?;
    let violations = preview["impact"]["violations"]
        .as_array()
        .context("violations")?;
    ensure!(!violations.is_empty(), "{preview}");
    ensure!(
        preview["impact"]["scopes"]
            .as_array()
            .is_some_and(|s| !s.is_empty()),
        "{preview}"
    );
    ensure!(version(&ctl)? == v, "a dry run changed the routing");

    // --force without a reason is refused; with one it goes through and
    // the audit says who overrode what.
    let out = ctl.run(["drain", "region/us-east", "--reason", "dc move", "--force"])?;
    ensure!(
        !out.success && drains(&ctl)?.is_empty(),
        "force without a reason: {}",
        out.stderr
    );
    ctl.run([
        "drain",
        "region/us-east",
        "--reason",
        "dc move",
        "--force",
        "--force-reason",
        "CAB-77 approved",
    ])?
    .ok()?;
    let audit = ctl.json(["audit"])?;
    let rec = audit
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|r| r["action"] == "drain" && r["target"] == "region/us-east")
        })
        .context("audit record")?;
    let details = rec["details"].to_string();
    ensure!(
        details.contains("forced=CAB-77 approved") && details.contains("overrode="),
        "{rec}"
    );
    drop(cp);

    // On the example fleet (room to spare), the blast-radius brake: a
    // region drain at once moves too much...
    let cp = ControlPlane::start_with(
        &dir.path().join("cp2"),
        Some(&example_fleet()),
        &["--max-move-share", "0.2"],
    )?;
    let ctl = cp.ctl();
    let out = ctl.run(["drain", "region/eu-west", "--reason", "test"])?;
    ensure!(
        !out.success && out.stderr.contains("of all traffic at once"),
        "{}",
        out.stderr
    );
    // ...in small steps it is allowed (the brake looks at the first step).
    ctl.run([
        "drain",
        "region/eu-west",
        "--steps",
        "0.05,1.0",
        "--interval",
        "1h",
        "--reason",
        "stepped",
    ])?
    .ok()?;
    // A fleet change that moves too much at once is refused too.
    // (eu-central suddenly 1 ms from every group that can reach it).
    let text = std::fs::read_to_string(example_fleet())?
        .lines()
        .map(|l| match l.find("\"region/eu-central\" = ") {
            Some(i) => {
                let rest = &l[i + 22..];
                let end = rest
                    .find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(rest.len());
                format!("{}\"region/eu-central\" = 1{}\n", &l[..i], &rest[end..])
            }
            None => format!("{l}\n"),
        })
        .collect::<String>();
    let moved = dir.path().join("moved.toml");
    std::fs::write(&moved, text)?;
    let out = ctl.run(["apply".as_ref(), "-f".as_ref(), moved.as_os_str()])?;
    ensure!(
        !out.success && out.stderr.contains("fleet apply refused by guardrails"),
        "{}",
        out.stderr
    );
    // Too many drains at once.
    for d in ["provider/cdn-a", "region/ap-south/metro/sin/site/sin1"] {
        ctl.run(["drain", d, "--fraction", "0.1", "--reason", "t"])?
            .ok()?;
    }
    let out = ctl.run([
        "drain",
        "region/ap-south/metro/bom/site/bom1",
        "--fraction",
        "0.1",
        "--reason",
        "t",
    ])?;
    ensure!(
        !out.success
            && out
                .stderr
                .contains("drains at once, more than the 3 allowed"),
        "{}",
        out.stderr
    );
    Ok(())
}

/// `text` (a fleet file) with every group's demand multiplied by `k`.
fn scaled_demand(text: &str, k: u64) -> Result<String> {
    let mut out = String::with_capacity(text.len());
    let mut scaled = 0;
    for line in text.lines() {
        match line
            .strip_prefix("demand_rps = {")
            .and_then(|l| l.strip_suffix('}'))
        {
            Some(body) => {
                let mut parts = vec![];
                for kv in body.split(',') {
                    let (name, n) = kv.split_once('=').context("demand entry")?;
                    let n: u64 = n.trim().parse()?;
                    parts.push(format!("{} = {}", name.trim(), n * k));
                }
                out.push_str(&format!("demand_rps = {{ {} }}\n", parts.join(", ")));
                scaled += 1;
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    ensure!(scaled > 0, "no demand in the fleet file");
    Ok(out)
}

#[test]
fn an_expired_drain_restores_itself() -> Result<()> {
    let rig = rig(&[])?;
    let ctl = rig.cp.ctl();
    ctl.run([
        "drain",
        "region/r2/origin/o2",
        "--expires",
        "2s",
        "--reason",
        "short window",
    ])?
    .ok()?;
    ensure!(o2_share(&rig.edge, 400)? == 0.0, "o2 not drained");
    let listed = drains(&ctl)?;
    ensure!(
        listed["region/r2/origin/o2"]["expires_at"].is_string() || listed.len() == 1,
        "{listed:?}"
    );
    eventually(Duration::from_secs(8), "the drain to expire", || {
        drains(&ctl).ok().filter(|d| d.is_empty())
    })?;
    let acts = audit_actions(&ctl)?;
    ensure!(
        acts.iter()
            .any(|(a, t)| a == "drain.expire" && t == "region/r2/origin/o2"),
        "{acts:?}"
    );
    let v = version(&ctl)?;
    eventually(
        Duration::from_secs(5),
        "the edge to hold the restored config",
        || (rig.edge.config_version().ok()? == v).then_some(()),
    )?;
    let share = o2_share(&rig.edge, 1000)?;
    ensure!((share - 0.5).abs() < 0.06, "o2 share after expiry: {share}");
    Ok(())
}

#[test]
fn a_drill_aborts_on_injected_errors_and_its_report_says_why() -> Result<()> {
    let rig = rig(&[])?;
    let ctl = rig.cp.ctl();
    let out = ctl
        .run([
            "drill",
            "start",
            "region/r3/origin/o3",
            "--duration",
            "10m",
            "--abort-if",
            "error_rate>0.2",
            "--abort-if",
            "utilization>0.99",
            "--reason",
            "quarterly DR drill",
        ])?
        .ok()?;
    ensure!(
        out.stdout.contains("drill drill-1 started"),
        "{}",
        out.stdout
    );
    ensure!(
        drains(&ctl)?.contains_key("region/r3/origin/o3"),
        "no drill drain"
    );
    // An operator cannot undrain it behind the drill's back.
    let out = ctl.run(["undrain", "region/r3/origin/o3"])?;
    ensure!(
        !out.success && out.stderr.contains("drill abort drill-1"),
        "{}",
        out.stderr
    );

    // Inject errors: every origin fails, traffic flows through e1.
    for o in &rig._origins {
        o.failing.store(true, Ordering::Relaxed);
    }
    let injected = Instant::now();
    let addr = rig.edge.process.addr;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = stop.clone();
    let load = std::thread::spawn(move || {
        while !s2.load(Ordering::Relaxed) {
            let _ = sextant_tests::http_get(addr, "/");
        }
    });
    let aborted = eventually(Duration::from_secs(10), "the drill to abort", || {
        let r = ctl.json(["drill", "report", "drill-1"]).ok()?;
        r["outcome"]
            .as_str()
            .is_some_and(|o| o.starts_with("aborted"))
            .then_some(r)
    });
    stop.store(true, Ordering::Relaxed);
    let _ = load.join();
    let report = aborted?;
    let took = injected.elapsed();
    ensure!(took < Duration::from_secs(5), "aborted after {took:?}");
    ensure!(
        report["outcome"]
            .as_str()
            .unwrap_or_default()
            .contains("error_rate>0.2"),
        "{report}"
    );
    ensure!(
        report["peak_error_rate"].as_f64().unwrap_or(0.0) > 0.2,
        "{report}"
    );
    eventually(Duration::from_secs(5), "the drill drain to be gone", || {
        drains(&ctl).ok().filter(|d| d.is_empty())
    })?;
    let human = ctl.run(["drill", "report", "drill-1"])?.ok()?.stdout;
    ensure!(
        human.contains("outcome: aborted") && human.contains("error_rate"),
        "{human}"
    );
    let acts = audit_actions(&ctl)?;
    ensure!(
        acts.contains(&("drill.abort".to_owned(), "drill-1".to_owned())),
        "{acts:?}"
    );
    Ok(())
}

#[test]
fn a_drill_runs_its_course_and_blocking_windows_refuse() -> Result<()> {
    let rig = rig(&[])?;
    let ctl = rig.cp.ctl();
    ctl.run([
        "drill",
        "start",
        "region/r3/origin/o3",
        "--duration",
        "2s",
        "--abort-if",
        "error_rate>0.5",
        "--reason",
        "short drill",
    ])?
    .ok()?;
    let report = eventually(Duration::from_secs(10), "the drill to succeed", || {
        let r = ctl.json(["drill", "report", "drill-1"]).ok()?;
        (r["outcome"] == "succeeded").then_some(r)
    })?;
    ensure!(
        report["time_to_restore_ms"]
            .as_u64()
            .is_some_and(|t| t < 5000),
        "{report}"
    );
    ensure!(report["drill"]["state"] == "succeeded", "{report}");
    ensure!(drains(&ctl)?.is_empty(), "drill drain left behind");
    let list = ctl.json(["drill", "list"])?;
    ensure!(list.as_array().map(Vec::len) == Some(1), "{list}");

    // With a blocking window in effect, a drill is refused and recorded.
    let dir = tempfile::tempdir()?;
    let cp = ControlPlane::start_with(
        dir.path(),
        Some(&example_fleet()),
        &["--drill-blocking-window", "mon-sun 00:00-24:00"],
    )?;
    let out = cp.ctl().run([
        "drill",
        "start",
        "region/eu-west",
        "--duration",
        "5m",
        "--abort-if",
        "utilization>0.9",
        "--reason",
        "q4",
    ])?;
    ensure!(
        !out.success && out.stderr.contains("blocking window"),
        "{}",
        out.stderr
    );
    let r = cp.ctl().json(["drill", "report", "drill-1"])?;
    ensure!(
        r["outcome"]
            .as_str()
            .is_some_and(|o| o.starts_with("refused: blocking window")),
        "{r}"
    );
    ensure!(drains(&cp.ctl())?.is_empty(), "a refused drill drained");
    Ok(())
}

#[test]
fn a_restart_mid_drain_resumes_at_its_step() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let fleet = example_fleet();
    let cp = ControlPlane::start(dir.path(), Some(&fleet))?;
    let ctl = cp.ctl();
    ctl.run([
        "drain",
        "region/eu-west/metro/ams",
        "--steps",
        "0.25,0.5,0.75,1.0",
        "--interval",
        "2s",
        "--reason",
        "ams rebuild",
    ])?
    .ok()?;
    eventually(Duration::from_secs(6), "the second step", || {
        let d = drains(&ctl).ok()?;
        (d["region/eu-west/metro/ams"]["fraction"].as_f64()? >= 0.5).then_some(())
    })?;
    cp.process.kill()?;
    let cp = ControlPlane::start(dir.path(), Some(&fleet))?;
    let ctl = cp.ctl();
    let f = drains(&ctl)?["region/eu-west/metro/ams"]["fraction"]
        .as_f64()
        .context("fraction")?;
    ensure!(f >= 0.5, "the drain went back to {f} after the restart");
    eventually(
        Duration::from_secs(10),
        "the last step after the restart",
        || {
            let d = drains(&ctl).ok()?;
            (d["region/eu-west/metro/ams"]["fraction"].as_f64()? == 1.0).then_some(())
        },
    )?;
    let steps = audit_actions(&ctl)?
        .iter()
        .filter(|(a, t)| a == "drain.step" && t == "region/eu-west/metro/ams")
        .count();
    ensure!(steps == 3, "{steps} steps audited");
    Ok(())
}

#[test]
fn bad_input_is_refused_clearly_and_changes_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cp = ControlPlane::start(dir.path(), Some(&example_fleet()))?;
    let ctl = cp.ctl();
    let v = version(&ctl)?;
    let cases: &[(&[&str], &str)] = &[
        (
            &["drain", "region/mars", "--reason", "x"],
            "unknown fault domain region/mars",
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
                "--steps",
                "0.5,0.25,1.0",
                "--interval",
                "1m",
            ],
            "steps must increase",
        ),
        (
            &[
                "drain",
                "region/eu-west",
                "--reason",
                "x",
                "--steps",
                "0.5,0.75",
                "--fraction",
                "1",
                "--interval",
                "1m",
            ],
            "must equal the target",
        ),
        (
            &[
                "drain",
                "region/eu-west",
                "--reason",
                "x",
                "--steps",
                "0.5,1.0",
            ],
            "--steps needs --interval",
        ),
        (
            &[
                "drain",
                "region/eu-west",
                "--reason",
                "x",
                "--interval",
                "5 minutes",
                "--steps",
                "0.5,1",
            ],
            "--interval",
        ),
        (
            &[
                "drain",
                "region/eu-west",
                "--reason",
                "x",
                "--expires",
                "30d",
            ],
            "longer than the maximum",
        ),
        (&["drain", "region/eu-west"], "--reason"),
        (
            &["drain", "region/eu-west", "--reason", "x", "--force"],
            "--force-reason",
        ),
        (
            &[
                "drill",
                "start",
                "region/eu-west",
                "--duration",
                "5m",
                "--abort-if",
                "utilisation>0.9",
                "--reason",
                "x",
            ],
            "unknown metric",
        ),
        (
            &[
                "drill",
                "start",
                "region/eu-west",
                "--duration",
                "5m",
                "--abort-if",
                "error_rate>2",
                "--reason",
                "x",
            ],
            "share in [0, 1]",
        ),
        (
            &[
                "drill",
                "start",
                "region/eu-west",
                "--duration",
                "10x",
                "--abort-if",
                "error_rate>0.1",
                "--reason",
                "x",
            ],
            "--duration",
        ),
        (
            &[
                "drill",
                "start",
                "region/eu-west",
                "--duration",
                "5m",
                "--abort-if",
                "error_rate>0.1",
            ],
            "--reason",
        ),
        (
            &[
                "drill",
                "start",
                "region/atlantis",
                "--duration",
                "5m",
                "--abort-if",
                "error_rate>0.1",
                "--reason",
                "x",
            ],
            "unknown fault domain",
        ),
        (&["drill", "report", "drill-9"], "no drill drill-9"),
    ];
    for (args, expected) in cases {
        let out = ctl.run(*args)?;
        ensure!(!out.success, "{args:?} succeeded: {}", out.stdout);
        ensure!(out.stderr.contains(expected), "{args:?}: {}", out.stderr);
    }
    ensure!(version(&ctl)? == v, "a refused request moved the version");
    ensure!(drains(&ctl)?.is_empty(), "a refused request stored a drain");
    ensure!(
        ctl.json(["drill", "list"])?
            .as_array()
            .is_some_and(Vec::is_empty),
        "a drill was recorded"
    );
    Ok(())
}
