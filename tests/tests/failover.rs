//! End to end: health verdicts from real probers (`sextant-probe`) and
//! automated failover — a killed edge leaves the DNS answers and comes back
//! after the up-threshold, a partitioned vantage point moves nothing, a
//! flapping edge is damped, automation stops at its bound, and a group
//! whose edges all look down fails open.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use sextant_tests::{bin, eventually, ControlPlane, Ctl, DnsServer, Prober, Process};

/// A free loopback port (bound, then released).
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A health target the test switches on and off: a TCP listener that
/// accepts and closes; off, connections are refused.
struct Target {
    port: u16,
    stop: Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>,
}

impl Target {
    fn new() -> Result<Self> {
        Self::on(free_port()?)
    }

    fn on(port: u16) -> Result<Self> {
        let mut t = Self { port, stop: None };
        t.up()?;
        Ok(t)
    }

    fn up(&mut self) -> Result<()> {
        if self.stop.is_some() {
            return Ok(());
        }
        let listener = TcpListener::bind(("127.0.0.1", self.port))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => drop(s),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        self.stop = Some((stop, handle));
        Ok(())
    }

    fn down(&mut self) {
        if let Some((stop, handle)) = self.stop.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = handle.join();
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.down();
    }
}

/// Four health targets, up, and the fleet's `health_check` for each.
fn four_targets() -> Result<(Vec<Target>, [String; 4])> {
    let targets = (0..4).map(|_| Target::new()).collect::<Result<Vec<_>>>()?;
    let checks = [0, 1, 2, 3].map(|i| format!("127.0.0.1:{}", targets[i].port));
    Ok((targets, checks))
}

/// Four edges, two per region, 1000 rps each; one group (10.0.0.0/8, 100
/// rps of www) that prefers e1, then e2, e3, e4 by latency. `checks[i]`
/// is edge i+1's health target.
fn fleet(checks: &[String; 4]) -> String {
    let mut f = String::from(
        "[[services]]\nid = \"www\"\nhostname = \"www.example.com\"\nzone = \"example.com\"\n\
         default_group = \"all\"\nnameservers = [\"ns1.example.com\"]\n\n",
    );
    for (i, check) in checks.iter().enumerate() {
        let n = i + 1;
        let region = if n <= 2 { "r1" } else { "r2" };
        f.push_str(&format!(
            "[[edges]]\nid = \"e{n}\"\nkind = \"self_built\"\nsite = \"region/{region}/metro/m{n}/site/s{n}\"\n\
             addresses = [\"127.0.1.{n}\"]\ncapacity_rps = 1000\nhealth_check = \"{check}\"\n\n"
        ));
    }
    f.push_str(
        "[[groups]]\nid = \"all\"\nprefixes = [\"10.0.0.0/8\"]\ndemand_rps = { www = 100 }\n\
         latency_ms = { e1 = 5, e2 = 10, e3 = 20, e4 = 25 }\n",
    );
    f
}

struct Rig {
    cp: ControlPlane,
    _probers: Vec<Prober>,
    dns: DnsServer,
    dir: tempfile::TempDir,
}

impl Rig {
    /// A control plane with `fleet_text`, three probers (`partitioned` of
    /// them see nothing), and a DNS server.
    fn start(fleet_text: &str, cp_args: &[&str], partitioned: usize) -> Result<Self> {
        let mut rig = Self::without_probers(fleet_text, cp_args)?;
        rig.add_probers(partitioned)?;
        Ok(rig)
    }

    /// Starts three probers, `partitioned` of which see nothing.
    fn add_probers(&mut self, partitioned: usize) -> Result<()> {
        for i in 0..3 {
            // A partitioned vantage point: every target is outside what it
            // may reach, so all its probes fail.
            let extra: &[&str] = if i < partitioned {
                &["--allow-targets", "10.255.255.255/32"]
            } else {
                &[]
            };
            self._probers
                .push(Prober::start(&self.cp.url(), &format!("probe-{i}"), extra)?);
        }
        Ok(())
    }

    /// A control plane and a DNS server.
    fn without_probers(fleet_text: &str, cp_args: &[&str]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let fleet = dir.path().join("fleet.toml");
        std::fs::write(&fleet, fleet_text)?;
        let cp = ControlPlane::start_with(&dir.path().join("cp"), Some(&fleet), cp_args)?;
        let dns = DnsServer::start(&cp.url(), "dns-1", &dir.path().join("dns"))?;
        let v = cp.ctl().json(["status"])?["routing_version"]
            .as_u64()
            .context("version")?;
        eventually(
            Duration::from_secs(10),
            "the DNS server to hold the config",
            || (dns.config_version().ok()? >= v).then_some(()),
        )?;
        Ok(Self {
            cp,
            _probers: Vec::new(),
            dns,
            dir,
        })
    }

    fn ctl(&self) -> Ctl {
        self.cp.ctl()
    }

    /// Every address in `n` answers for a client of the group.
    fn answers(&self, n: usize) -> Result<BTreeSet<String>> {
        let mut all = BTreeSet::new();
        for _ in 0..n {
            all.extend(self.dns.answers("10.1.0.0/24", &[])?);
        }
        Ok(all)
    }

    fn edge(&self, id: &str) -> Result<Value> {
        self.ctl()
            .json(["get", "edges"])?
            .as_array()
            .and_then(|a| a.iter().find(|e| e["id"] == id).cloned())
            .with_context(|| format!("edge {id} not listed"))
    }

    fn audit(&self) -> Result<Vec<Value>> {
        Ok(self
            .ctl()
            .json(["audit"])?
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// Audit records of automated failover about `edge`.
    fn failovers(&self, edge: &str) -> Result<Vec<String>> {
        Ok(self
            .audit()?
            .iter()
            .filter(|r| {
                r["target"] == edge
                    && r["action"]
                        .as_str()
                        .is_some_and(|a| a.starts_with("failover."))
            })
            .filter_map(|r| r["action"].as_str().map(str::to_owned))
            .collect())
    }

    fn version(&self) -> Result<u64> {
        self.ctl().json(["status"])?["routing_version"]
            .as_u64()
            .context("version")
    }
}

/// Starts a `sextant-edge` for `id` listening on `port` (its health target).
fn start_edge(cp: &str, id: &str, site: &str, port: u16, dir: &Path) -> Result<Process> {
    let mut cmd = Command::new(bin("sextant-edge")?);
    cmd.args(["--control-plane", cp, "--node-id", id, "--site", site])
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin",
            "127.0.0.1:0",
        ])
        .args([
            "--allow-upstream",
            "127.0.0.0/8",
            "--report-interval",
            "0.5",
        ])
        .arg("--data-dir")
        .arg(dir);
    Process::start(cmd, "http")
}

#[test]
fn a_killed_edge_leaves_dns_and_returns_after_the_up_threshold() -> Result<()> {
    let ports = [free_port()?, free_port()?, free_port()?, free_port()?];
    let checks = ports.map(|p| format!("127.0.0.1:{p}"));
    let _others = ports[1..]
        .iter()
        .map(|p| Target::on(*p))
        .collect::<Result<Vec<_>>>()?;
    // Short damping so that the return is quick; up after 3 passes.
    let mut rig = Rig::without_probers(
        &fleet(&checks),
        &["--damping-half-life", "1s", "--health-up-after", "3"],
    )?;
    let site = "region/r1/metro/m1/site/s1";
    let edge = start_edge(
        &rig.cp.url(),
        "e1",
        site,
        ports[0],
        &rig.dir.path().join("e1"),
    )?;
    rig.add_probers(0)?;
    eventually(Duration::from_secs(10), "e1 to be up", || {
        (rig.edge("e1").ok()?["health"] == "up").then_some(())
    })?;
    ensure!(
        rig.answers(5)? == BTreeSet::from(["127.0.1.1".to_owned()]),
        "{:?}",
        rig.answers(1)?
    );

    // Kill it: it leaves the answers, with the reason in `get edges` and
    // the audit log.
    edge.kill()?;
    let killed = Instant::now();
    eventually(
        Duration::from_secs(10),
        "e1 to leave the DNS answers",
        || {
            let a = rig.answers(1).ok()?;
            (!a.contains("127.0.1.1") && !a.is_empty()).then_some(())
        },
    )?;
    let took = killed.elapsed();
    let e1 = rig.edge("e1")?;
    ensure!(e1["health"] == "down", "{e1}");
    let reason = e1["health_reason"].as_str().unwrap_or_default();
    ensure!(
        reason.contains("voters see it down") && reason.contains("probe-"),
        "{reason}"
    );
    let rec = rig
        .audit()?
        .into_iter()
        .find(|r| r["action"] == "failover.down" && r["target"] == "e1")
        .context("no failover.down audit record")?;
    ensure!(rec["actor"] == "sextant-cp", "{rec}");
    ensure!(
        rec["details"].to_string().contains("failing since"),
        "{rec}"
    );
    eprintln!("kill -> out of DNS: {took:?}");

    // Restart it: back only after 3 passes from each of a quorum.
    let restarted = Instant::now();
    let _edge = start_edge(
        &rig.cp.url(),
        "e1",
        site,
        ports[0],
        &rig.dir.path().join("e1"),
    )?;
    eventually(
        Duration::from_secs(20),
        "e1 to return to the answers",
        || rig.answers(1).ok()?.contains("127.0.1.1").then_some(()),
    )?;
    let back = restarted.elapsed();
    ensure!(
        back >= Duration::from_millis(1900),
        "back after {back:?}: before the up-threshold"
    );
    ensure!(
        rig.failovers("e1")?.contains(&"failover.up".to_owned()),
        "{:?}",
        rig.failovers("e1")?
    );
    Ok(())
}

#[test]
fn a_partitioned_vantage_point_moves_nothing() -> Result<()> {
    let (_targets, checks) = four_targets()?;
    let rig = Rig::start(&fleet(&checks), &[], 1)?;
    eventually(Duration::from_secs(10), "verdicts", || {
        (rig.edge("e1").ok()?["health"] == "up").then_some(())
    })?;
    let v = rig.version()?;
    std::thread::sleep(Duration::from_secs(5));
    ensure!(rig.version()? == v, "the routing changed");
    let e1 = rig.edge("e1")?;
    ensure!(e1["health"] == "up", "{e1}");
    let reason = e1["health_reason"].as_str().unwrap_or_default();
    ensure!(reason.contains("probe-0 failing"), "{reason}");
    ensure!(
        rig.failovers("e1")?.is_empty(),
        "{:?}",
        rig.failovers("e1")?
    );
    ensure!(rig.answers(3)?.contains("127.0.1.1"), "e1 left the answers");
    Ok(())
}

#[test]
fn a_flapping_edge_is_damped_instead_of_oscillating() -> Result<()> {
    let (mut targets, checks) = four_targets()?;
    // No hysteresis to hide behind: one failure or pass flips a vote.
    let rig = Rig::start(
        &fleet(&checks),
        &[
            "--health-down-after",
            "1",
            "--health-up-after",
            "1",
            "--damping-half-life",
            "30s",
        ],
        0,
    )?;
    eventually(Duration::from_secs(10), "e1 up", || {
        (rig.edge("e1").ok()?["health"] == "up").then_some(())
    })?;
    // Down/up every 2 s for 16 s.
    for i in 0..8 {
        if i % 2 == 0 {
            targets[0].down();
        } else {
            targets[0].up()?;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    targets[0].up()?;
    std::thread::sleep(Duration::from_secs(2));
    let changes = rig.failovers("e1")?;
    ensure!(
        changes == vec!["failover.down".to_owned()],
        "routing changed {} times: {changes:?}",
        changes.len()
    );
    let e1 = rig.edge("e1")?;
    ensure!(e1["health"] == "down" && e1["damped"] == true, "{e1}");
    ensure!(
        e1["damping_penalty"].as_f64().is_some_and(|p| p > 1000.0),
        "{e1}"
    );
    ensure!(
        !rig.answers(3)?.contains("127.0.1.1"),
        "a damped edge is answered"
    );
    Ok(())
}

#[test]
fn automation_stops_at_its_bound_and_raises_the_alarm() -> Result<()> {
    let (mut targets, checks) = four_targets()?;
    // Default bounds: 25% of total (one edge of four), 50% of a region.
    let rig = Rig::start(&fleet(&checks), &[], 0)?;
    eventually(Duration::from_secs(10), "verdicts", || {
        (rig.edge("e1").ok()?["health"] == "up").then_some(())
    })?;
    targets[0].down();
    eventually(Duration::from_secs(10), "e1 to fail over", || {
        rig.failovers("e1")
            .ok()?
            .contains(&"failover.down".to_owned())
            .then_some(())
    })?;
    targets[1].down();
    eventually(Duration::from_secs(10), "e2 to be held", || {
        rig.failovers("e2")
            .ok()?
            .contains(&"failover.held".to_owned())
            .then_some(())
    })?;
    let e2 = rig.edge("e2")?;
    ensure!(
        e2["failover_held"] == true && e2["health"] == "down",
        "{e2}"
    );
    let status = rig.ctl().json(["status"])?;
    let alarms = status["alarms"].to_string();
    ensure!(
        alarms.contains("automated failover held: edge e2"),
        "{alarms}"
    );
    ensure!(
        alarms.contains("above the automation bound of 25.0%"),
        "{alarms}"
    );
    // e2 stays in the routing (it carries the group now: e1 is out), and
    // nothing is pushed into overload.
    ensure!(
        rig.answers(3)?.contains("127.0.1.2"),
        "the held edge left the answers"
    );
    for e in rig
        .ctl()
        .json(["get", "edges"])?
        .as_array()
        .context("edges")?
    {
        let (load, cap) = (
            e["predicted_load_rps"].as_f64().unwrap_or(0.0),
            e["capacity_rps"].as_f64().unwrap_or(0.0),
        );
        ensure!(load <= cap, "{} overloaded: {load} > {cap}", e["id"]);
    }
    Ok(())
}

#[test]
fn every_edge_down_fails_open_and_says_so() -> Result<()> {
    let (mut targets, checks) = four_targets()?;
    // Automation may take everything out: the solver must still fail open.
    let rig = Rig::start(
        &fleet(&checks),
        &["--failover-max-total", "1", "--failover-max-region", "1"],
        0,
    )?;
    eventually(Duration::from_secs(10), "verdicts", || {
        (rig.edge("e4").ok()?["health"] == "up").then_some(())
    })?;
    for t in &mut targets {
        t.down();
    }
    eventually(Duration::from_secs(10), "all four down", || {
        let edges = rig.ctl().json(["get", "edges"]).ok()?;
        edges
            .as_array()?
            .iter()
            .all(|e| e["health"] == "down")
            .then_some(())
    })?;
    let status = eventually(Duration::from_secs(5), "the fail-open alarm", || {
        let s = rig.ctl().json(["status"]).ok()?;
        s["alarms"].to_string().contains("failed open").then_some(s)
    })?;
    ensure!(status["alarms"].to_string().contains("www/all"), "{status}");
    // DNS still answers (as if all were up), never an empty answer.
    let a = rig.answers(3)?;
    ensure!(!a.is_empty(), "empty answer");
    Ok(())
}

#[test]
fn signals_sent_to_a_follower_reach_the_leader() -> Result<()> {
    let etcd = sextant_store::etcd_server::EtcdServer::start().map_err(|e| anyhow::anyhow!(e))?;
    let dir = tempfile::tempdir()?;
    let (mut targets, checks) = four_targets()?;
    let fleet_path = dir.path().join("fleet.toml");
    std::fs::write(&fleet_path, fleet(&checks))?;
    let replica = |id: &str| {
        ControlPlane::start_with(
            &dir.path().join(id),
            Some(&fleet_path),
            &[
                "--store",
                "etcd",
                "--etcd-endpoints",
                &etcd.endpoint(),
                "--replica-id",
                id,
                "--lease-ttl-seconds",
                "3",
            ],
        )
    };
    let a = replica("cp-1")?;
    let b = replica("cp-2")?;
    let leader_of = |ctl: &Ctl| -> Option<String> {
        let s = ctl.json(["status"]).ok()?;
        s["replicas"]
            .as_array()?
            .iter()
            .find(|r| r["leader"] == true)
            .and_then(|r| r["id"].as_str())
            .map(str::to_owned)
    };
    let leader = eventually(Duration::from_secs(15), "a leader", || leader_of(&a.ctl()))?;
    let (leader_cp, follower_cp) = if leader == "cp-1" { (&a, &b) } else { (&b, &a) };
    // Every prober talks to the follower only.
    let _probers = (0..3)
        .map(|i| Prober::start(&follower_cp.url(), &format!("probe-{i}"), &[]))
        .collect::<Result<Vec<_>>>()?;
    targets[0].down();
    eventually(
        Duration::from_secs(15),
        "the leader to fail e1 over",
        || {
            let audit = leader_cp.ctl().json(["audit"]).ok()?;
            audit
                .as_array()?
                .iter()
                .any(|r| r["action"] == "failover.down" && r["target"] == "e1")
                .then_some(())
        },
    )?;
    // The follower serves the new routing too: e1 carries nothing, e2 the
    // group.
    eventually(Duration::from_secs(10), "the follower to follow", || {
        let edges = follower_cp.ctl().json(["get", "edges"]).ok()?;
        edges
            .as_array()?
            .iter()
            .filter(|e| {
                (e["id"] == "e1" && e["predicted_load_rps"].as_f64() == Some(0.0))
                    || (e["id"] == "e2"
                        && e["predicted_load_rps"].as_f64().is_some_and(|l| l > 0.0))
            })
            .count()
            .eq(&2)
            .then_some(())
    })?;
    Ok(())
}
