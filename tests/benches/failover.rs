//! Failover speed, end to end on loopback (scripts/bench-failover runs it):
//! a control plane, three `sextant-probe` vantage points (1 s interval),
//! two `sextant-dns` servers and two `sextant-edge` proxies. Each trial
//! kills the edge that serves the group and measures
//!
//! - kill → `sextant-dns` no longer answers with it (dig, polled every
//!   20 ms on both DNS servers), and
//! - verdict → every connected subscriber has ACKed the version that
//!   carries the failover (the audit record's commit time to the first
//!   `Status` poll, every 2 ms, that shows all of them on it),
//!
//! then restarts the edge and waits for it to return. Prints the
//! distributions.

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context, Result};
use sextant_proto::v1 as pb;
use sextant_proto::v1::cluster_service_client::ClusterServiceClient;
use sextant_tests::stats::report;
use sextant_tests::{bin, eventually, ControlPlane, DnsServer, EdgeProxy, Prober, Process};

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(0))
}

fn start_edge(cp: &str, port: u16, dir: &Path) -> Result<Process> {
    let mut cmd = Command::new(bin("sextant-edge")?);
    cmd.args([
        "--control-plane",
        cp,
        "--node-id",
        "e1",
        "--site",
        "region/r1/metro/m1/site/s1",
    ])
    .args([
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--admin",
        "127.0.0.1:0",
    ])
    .args(["--allow-upstream", "127.0.0.0/8"])
    .arg("--data-dir")
    .arg(dir);
    Process::start(cmd, "http")
}

fn main() -> Result<()> {
    let trials: usize = std::env::var("TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir()?;
    let e1_port = free_port()?;
    // e2's health target: a listener that stays up.
    let e2_target = TcpListener::bind("127.0.0.1:0")?;
    let e2_port = e2_target.local_addr()?.port();
    std::thread::spawn(move || {
        for s in e2_target.incoming() {
            drop(s);
        }
    });
    let mut fleet = String::from(
        "[[services]]\nid = \"www\"\nhostname = \"www.example.com\"\nzone = \"example.com\"\n\
         default_group = \"all\"\nnameservers = [\"ns1.example.com\"]\nttl_seconds = 1\n\n",
    );
    for (n, port) in [(1, e1_port), (2, e2_port)] {
        fleet.push_str(&format!(
            "[[edges]]\nid = \"e{n}\"\nkind = \"self_built\"\nsite = \"region/r{n}/metro/m{n}/site/s{n}\"\n\
             addresses = [\"127.0.1.{n}\"]\ncapacity_rps = 1000\nhealth_check = \"127.0.0.1:{port}\"\n\n"
        ));
    }
    fleet.push_str(
        "[[groups]]\nid = \"all\"\nprefixes = [\"10.0.0.0/8\"]\ndemand_rps = { www = 100 }\n\
         latency_ms = { e1 = 5, e2 = 10 }\n",
    );
    let fleet_path = dir.path().join("fleet.toml");
    std::fs::write(&fleet_path, fleet)?;
    // Up after 2 passes; a short damping half-life so that trials follow
    // each other quickly. Both regions may lose their one edge.
    let cp = ControlPlane::start_with(
        &dir.path().join("cp"),
        Some(&fleet_path),
        &[
            "--health-up-after",
            "2",
            "--damping-half-life",
            "1s",
            "--failover-max-total",
            "0.5",
            "--failover-max-region",
            "1",
        ],
    )?;
    let url = cp.url();
    let _probers = (0..3)
        .map(|i| Prober::start(&url, &format!("probe-{i}"), &[]))
        .collect::<Result<Vec<_>>>()?;
    let dns = [
        DnsServer::start(&url, "dns-1", &dir.path().join("dns1"))?,
        DnsServer::start(&url, "dns-2", &dir.path().join("dns2"))?,
    ];
    let _e2 = EdgeProxy::start(
        &url,
        "e2",
        "region/r2/metro/m2/site/s2",
        &dir.path().join("e2"),
    )?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut cluster = rt.block_on(ClusterServiceClient::connect(url.clone()))?;

    let mut to_dns = Vec::new();
    let mut to_ack = Vec::new();
    for trial in 0..trials {
        let edge = start_edge(&url, e1_port, &dir.path().join("e1"))?;
        eventually(Duration::from_secs(60), "e1 to serve the group", || {
            dns.iter()
                .all(|d| {
                    d.answers("10.1.0.0/24", &["+time=1"]).unwrap_or_default() == ["127.0.1.1"]
                })
                .then_some(())
        })?;
        // Let the verdict settle (probes passing) before the kill.
        std::thread::sleep(Duration::from_millis(1500));
        let v_before = rt
            .block_on(cluster.status(pb::StatusRequest {}))?
            .into_inner()
            .routing_version;
        edge.kill()?;
        let killed = Instant::now();
        // Watch the ACKs in step with the DNS answers.
        let mut all_acked_at: Option<i64> = None;
        let mut gone = [None, None];
        let deadline = killed + Duration::from_secs(30);
        let mut last_dig = Instant::now() - Duration::from_secs(1);
        while (gone.iter().any(Option::is_none) || all_acked_at.is_none())
            && Instant::now() < deadline
        {
            if all_acked_at.is_none() {
                let s = rt
                    .block_on(cluster.status(pb::StatusRequest {}))?
                    .into_inner();
                let v = s.routing_version;
                if v > v_before
                    && s.subscribers
                        .iter()
                        .filter(|x| x.connected)
                        .all(|x| x.version_applied >= v)
                {
                    all_acked_at = Some(now_ms());
                }
            }
            if last_dig.elapsed() >= Duration::from_millis(20) {
                last_dig = Instant::now();
                for (i, d) in dns.iter().enumerate() {
                    if gone[i].is_none() {
                        let a = d.answers("10.1.0.0/24", &["+time=1"]).unwrap_or_default();
                        if !a.is_empty() && !a.iter().any(|x| x == "127.0.1.1") {
                            gone[i] = Some(killed.elapsed());
                        }
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let gone_ms = gone
            .iter()
            .map(|g| g.map(|d| d.as_secs_f64() * 1000.0))
            .collect::<Option<Vec<f64>>>()
            .ok_or_else(|| anyhow!("trial {trial}: e1 never left the answers"))?;
        let worst = gone_ms.iter().copied().fold(0.0, f64::max);
        // The failover's commit time, from the audit log.
        let audit = cp.ctl().json(["audit"])?;
        let at = audit
            .as_array()
            .and_then(|a| {
                a.iter()
                    .filter(|r| {
                        r["action"] == "failover.down"
                            && r["target"] == "e1"
                            && r["routing_version_after"]
                                .as_u64()
                                .is_some_and(|v| v > v_before)
                    })
                    .filter_map(|r| r["at_unix_ms"].as_i64())
                    .next()
            })
            .context("no failover.down record with a time")?;
        let acked = all_acked_at.context("never all ACKed")?;
        let ack_ms = (acked - at) as f64;
        println!(
            "trial {trial}: kill -> out of DNS {worst:.0} ms; verdict -> all ACKed {ack_ms:.0} ms"
        );
        to_dns.push(worst);
        to_ack.push(ack_ms);
    }
    report(
        "kill -> no longer answered by sextant-dns (worst of 2 servers)",
        to_dns,
    );
    report(
        "verdict commit -> all subscribers ACKed (poll resolution ~2 ms)",
        to_ack,
    );
    Ok(())
}
