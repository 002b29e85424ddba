//! Anycast health speed, end to end on loopback (scripts/bench-bmp runs
//! it): a control plane with a BMP station, a `sextant-dns`, and a BMP
//! client of our own (sextant-bgp's writer) playing router `r1` of site
//! s1, so that the moment of the withdrawal is known exactly. Each trial
//! sends a Loc-RIB withdrawal of the site's prefix and measures
//!
//! - withdrawal → e1's verdict is down (`ListEdges`, polled every 2 ms),
//! - withdrawal → `sextant-dns` no longer answers with e1 (dig, every 20 ms),
//!
//! then announces the prefix again and waits for e1 to return. It runs
//! once with `--health-down-after 1` (the station's own path: vote on the
//! change, verdict, commit, push) and once with the default 2 (plus one
//! BMP vote interval, 1 s, of hysteresis). Prints the distributions.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sextant_bgp::bmp::write::{self, Peer};
use sextant_proto::v1 as pb;
use sextant_proto::v1::fleet_service_client::FleetServiceClient;
use sextant_tests::stats::report;
use sextant_tests::{eventually, ControlPlane, DnsServer};

const PREFIX: &str = "203.0.113.0/24";

fn fleet() -> String {
    let mut f = String::from(
        "[[services]]\nid = \"www\"\nhostname = \"www.example.com\"\nzone = \"example.com\"\n\
         default_group = \"all\"\nnameservers = [\"ns1.example.com\"]\nttl_seconds = 1\n\n",
    );
    for n in 1..=2 {
        f.push_str(&format!(
            "[[edges]]\nid = \"e{n}\"\nkind = \"self_built\"\nsite = \"region/r{n}/metro/m{n}/site/s{n}\"\n\
             addresses = [\"127.0.1.{n}\"]\ncapacity_rps = 1000\nhealth_check = \"127.0.0.1:9\"\n\n"
        ));
    }
    f.push_str(
        "[[groups]]\nid = \"all\"\nprefixes = [\"10.0.0.0/8\"]\ndemand_rps = { www = 100 }\n\
         latency_ms = { e1 = 5, e2 = 10 }\n\n",
    );
    f.push_str(&format!(
        "[[anycast]]\nsite = \"region/r1/metro/m1/site/s1\"\nrouters = [\"r1\"]\nprefixes = [\"{PREFIX}\"]\n"
    ));
    f
}

fn run(down_after: u32, trials: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let dir = tempfile::tempdir()?;
    let fleet_path = dir.path().join("fleet.toml");
    std::fs::write(&fleet_path, fleet())?;
    let k = down_after.to_string();
    let cp = ControlPlane::start_with(
        &dir.path().join("cp"),
        Some(&fleet_path),
        &[
            "--bmp-listen",
            "127.0.0.1:0",
            "--health-down-after",
            &k,
            "--health-up-after",
            "1",
            "--damping-half-life",
            "1s",
            "--failover-max-total",
            "0.5",
            "--failover-max-region",
            "1",
        ],
    )?;
    let station = cp.logged_addr("bmp")?;
    let url = cp.url();
    let dns = DnsServer::start(&url, "dns-1", &dir.path().join("dns"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut fleet_api = rt.block_on(FleetServiceClient::connect(url.clone()))?;
    let mut health = |id: &str| -> Result<String> {
        let r = rt
            .block_on(fleet_api.list_edges(pb::ListEdgesRequest {
                page_size: 0,
                page_token: String::new(),
            }))?
            .into_inner();
        Ok(r.edges
            .into_iter()
            .find(|e| e.id == id)
            .map(|e| e.health)
            .unwrap_or_default())
    };

    let p: ipnet::IpNet = PREFIX.parse()?;
    let loc = Peer::loc_rib(65001, std::net::Ipv4Addr::new(192, 0, 2, 1));
    let mut router = TcpStream::connect(station).context("connect to the station")?;
    router.set_nodelay(true)?;
    router.write_all(&write::initiation("r1", "bench"))?;
    let announce = write::route_monitoring(&loc, &[p], &[]);
    let withdraw = write::route_monitoring(&loc, &[], &[p]);

    let mut to_verdict = Vec::new();
    let mut to_dns = Vec::new();
    for trial in 0..trials {
        router.write_all(&announce)?;
        eventually(Duration::from_secs(60), "e1 up and answered", || {
            (health("e1").ok()? == "up"
                && dns.answers("10.1.0.0/24", &["+time=1"]).unwrap_or_default() == ["127.0.1.1"])
            .then_some(())
        })?;
        // Let the votes settle (several passing intervals) first.
        std::thread::sleep(Duration::from_millis(1500));
        router.write_all(&withdraw)?;
        let sent = Instant::now();
        let deadline = sent + Duration::from_secs(30);
        let (mut verdict, mut gone) = (None, None);
        let mut last_dig = sent - Duration::from_secs(1);
        while (verdict.is_none() || gone.is_none()) && Instant::now() < deadline {
            if verdict.is_none() && health("e1")? == "down" {
                verdict = Some(sent.elapsed());
            }
            if gone.is_none() && last_dig.elapsed() >= Duration::from_millis(20) {
                last_dig = Instant::now();
                if !dns
                    .answers("10.1.0.0/24", &["+time=1"])
                    .unwrap_or_default()
                    .contains(&"127.0.1.1".to_owned())
                {
                    gone = Some(sent.elapsed());
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let verdict = verdict.context("no down verdict within 30 s")?;
        let gone = gone.context("e1 still answered after 30 s")?;
        eprintln!(
            "K={down_after} trial {trial}: verdict {:.0} ms, out of DNS {:.0} ms",
            verdict.as_secs_f64() * 1e3,
            gone.as_secs_f64() * 1e3
        );
        to_verdict.push(verdict.as_secs_f64() * 1e3);
        to_dns.push(gone.as_secs_f64() * 1e3);
    }
    Ok((to_verdict, to_dns))
}

fn main() -> Result<()> {
    let trials: usize = std::env::var("TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    for k in [1, 2] {
        let (verdict, dns) = run(k, trials)?;
        println!("--health-down-after {k}, --bmp-interval 1s:");
        report("  BMP withdrawal -> verdict down", verdict);
        report("  BMP withdrawal -> out of sextant-dns answers", dns);
    }
    Ok(())
}
