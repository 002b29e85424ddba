//! End to end: anycast health from BGP. A real gobgpd sends BMP (Loc-RIB
//! monitoring) to `sextant-cp --bmp-listen`; the fleet says that site s1
//! is announced by router `r1` with 203.0.113.0/24. Withdrawing the prefix
//! takes e1 out of the real `sextant-dns` answers (dig), with the route's
//! details in `get edges`; announcing it again brings e1 back after the
//! up-threshold; killing gobgpd (session down) takes it out again.
//! Garbage on the BMP port is refused, named, and counted.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use sextant_tests::gobgp::Gobgp;
use sextant_tests::{eventually, http_get, ControlPlane, DnsServer};

const PREFIX: &str = "203.0.113.0/24";

/// Four edges, two per region; the group prefers e1. Site s1 is anycast,
/// announced by router r1 (its BMP sysName).
fn fleet() -> String {
    let mut f = String::from(
        "[[services]]\nid = \"www\"\nhostname = \"www.example.com\"\nzone = \"example.com\"\n\
         default_group = \"all\"\nnameservers = [\"ns1.example.com\"]\n\n",
    );
    for n in 1..=4 {
        let region = if n <= 2 { "r1" } else { "r2" };
        f.push_str(&format!(
            "[[edges]]\nid = \"e{n}\"\nkind = \"self_built\"\nsite = \"region/{region}/metro/m{n}/site/s{n}\"\n\
             addresses = [\"127.0.1.{n}\"]\ncapacity_rps = 1000\nhealth_check = \"127.0.0.1:9\"\n\n"
        ));
    }
    f.push_str(
        "[[groups]]\nid = \"all\"\nprefixes = [\"10.0.0.0/8\"]\ndemand_rps = { www = 100 }\n\
         latency_ms = { e1 = 5, e2 = 10, e3 = 20, e4 = 25 }\n\n",
    );
    f.push_str(&format!(
        "[[anycast]]\nsite = \"region/r1/metro/m1/site/s1\"\nrouters = [\"r1\"]\nprefixes = [\"{PREFIX}\"]\n"
    ));
    f
}

fn edge(cp: &ControlPlane, id: &str) -> Result<Value> {
    cp.ctl()
        .json(["get", "edges"])?
        .as_array()
        .and_then(|a| a.iter().find(|e| e["id"] == id).cloned())
        .with_context(|| format!("edge {id} not listed"))
}

fn has_e1(dns: &DnsServer) -> Option<bool> {
    dns.answers("10.1.0.0/24", &[])
        .ok()
        .map(|a| a.iter().any(|x| x == "127.0.1.1"))
}

#[test]
fn a_withdrawn_anycast_prefix_takes_its_site_out_of_dns_and_back() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let fleet_file = dir.path().join("fleet.toml");
    std::fs::write(&fleet_file, fleet())?;
    let cp = ControlPlane::start_with(
        &dir.path().join("cp"),
        Some(&fleet_file),
        &[
            "--bmp-allow",
            "127.0.0.0/8",
            "--bmp-listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--damping-half-life",
            "1s",
            "--health-up-after",
            "3",
        ],
    )?;
    let station = cp.logged_addr("bmp")?;
    let metrics = cp.logged_addr("metrics")?;
    let dns = DnsServer::start(&cp.url(), "dns-1", &dir.path().join("dns"))?;

    let router = Gobgp::start(&dir.path().join("gobgp"), "r1", station)?;
    router.add(PREFIX)?;
    eventually(Duration::from_secs(10), "r1's vote to bring e1 up", || {
        let e = edge(&cp, "e1").ok()?;
        (e["health"] == "up" && e["health_reason"].as_str()?.contains("bgp:r1 ok")).then_some(())
    })?;
    eventually(Duration::from_secs(10), "e1 in the DNS answers", || {
        has_e1(&dns)?.then_some(())
    })?;
    let sessions = cp.ctl().json(["bgp", "sessions"])?;
    let s = sessions
        .as_array()
        .and_then(|a| a.iter().find(|s| s["up"] == true).cloned())
        .context("no BMP session listed")?;
    ensure!(
        s["router"] == "r1"
            && s["sys_name"] == "r1"
            && s["site"] == "region/r1/metro/m1/site/s1"
            && s["bgp_id"] == "192.0.2.1",
        "{s}"
    );
    ensure!(
        s["announced"]
            .to_string()
            .contains("203.0.113.0/24 via Loc-RIB (AS65001)"),
        "{s}"
    );

    // Withdraw: e1 leaves the answers; the reason names the route.
    let withdrawn = Instant::now();
    router.del(PREFIX)?;
    eventually(
        Duration::from_secs(10),
        "e1 to leave the DNS answers",
        || (!has_e1(&dns)?).then_some(()),
    )?;
    let took = withdrawn.elapsed();
    eprintln!("withdrawal -> out of DNS: {took:?}");
    let e1 = edge(&cp, "e1")?;
    ensure!(e1["health"] == "down", "{e1}");
    let reason = e1["health_reason"].as_str().unwrap_or_default();
    ensure!(
        reason.contains(
            "anycast: 1 of 1 routers lost the route (quorum 1): not reachable by anycast"
        ) && reason.contains(
            "bgp:r1 failing: no route: 203.0.113.0/24 withdrawn by Loc-RIB (AS65001) at "
        ),
        "{reason}"
    );
    let text = cp.ctl().run(["get", "edges"])?.ok()?.stdout;
    ensure!(
        text.contains("e1: ") && text.contains("withdrawn by Loc-RIB"),
        "{text}"
    );
    let listed = cp.ctl().run(["bgp", "sessions"])?.ok()?.stdout;
    ensure!(
        listed.contains("203.0.113.0/24 withdrawn by Loc-RIB (AS65001)"),
        "{listed}"
    );

    // Announce again: back after 3 passing votes (1 s apart) and the hold.
    let announced = Instant::now();
    router.add(PREFIX)?;
    eventually(
        Duration::from_secs(20),
        "e1 to return to the answers",
        || has_e1(&dns)?.then_some(()),
    )?;
    let back = announced.elapsed();
    eprintln!("re-announce -> back in DNS: {back:?}");
    ensure!(
        back >= Duration::from_millis(1900),
        "back after {back:?}: before the up-threshold"
    );

    // The router dies: its session drops, which counts as a withdrawal.
    router.kill()?;
    let killed = Instant::now();
    eventually(
        Duration::from_secs(15),
        "e1 to leave the answers again",
        || (!has_e1(&dns)?).then_some(()),
    )?;
    eprintln!("router killed -> out of DNS: {:?}", killed.elapsed());
    let reason = edge(&cp, "e1")?["health_reason"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    ensure!(
        reason.contains("bgp:r1 failing: BMP session from r1 (127.0.0.1:")
            && reason.contains("the router closed the BMP session"),
        "{reason}"
    );

    // Garbage on the BMP port: refused with what and where, counted.
    let mut junk = std::net::TcpStream::connect(station)?;
    junk.write_all(b"\x03\x00\x00\x00\x02\x04garbage")?;
    drop(junk);
    eventually(Duration::from_secs(5), "the refusal in the log", || {
        cp.process
            .log()
            .contains("byte 1: BMP message length 2 is shorter than its 6-byte header")
            .then_some(())
    })?;
    let (_, text) = http_get(metrics, "/metrics")?;
    ensure!(text.contains("sextant_bmp_decode_errors_total 1"), "{text}");
    ensure!(
        text.contains("sextant_bmp_messages_total{type=\"route_monitoring\"}"),
        "{text}"
    );
    Ok(())
}
