//! A full-table RIB end to end on loopback (scripts/bench-rib runs it): a
//! synthetic dump of 1,000,000 IPv4 and 200,000 IPv6 prefixes (70,000
//! origins) loaded with `sextantctl bgp load-rib` into a real `sextant-cp`
//! (embedded store) whose example fleet's 20 groups name 1,000 origin ASNs
//! each (about 29 % of the table), with a real `sextant-dns` subscribed.
//! Measures:
//!
//! - the load call (upload, decode, store, commit), and the time until the
//!   DNS server serves the version that carries the map;
//! - the control plane's and the DNS server's memory (VmRSS, VmHWM) before
//!   and after;
//! - a second, different dump replacing the first; and the same dump
//!   again (a no-op).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sextant_bgp::synth::{self, Spec};
use sextant_tests::{eventually, ControlPlane, DnsServer};

const ASNS_PER_GROUP: u32 = 1000;

/// The example fleet with each group's `asns` widened to 1,000 ASNs.
fn fleet() -> Result<String> {
    let text = std::fs::read_to_string(sextant_tests::example_fleet())?;
    let mut k = 0;
    let lines: Vec<String> = text
        .lines()
        .map(|l| {
            if l.starts_with("asns = [") {
                let asns: Vec<String> = (k * ASNS_PER_GROUP + 1..=(k + 1) * ASNS_PER_GROUP)
                    .map(|a| a.to_string())
                    .collect();
                k += 1;
                format!("asns = [{}]", asns.join(", "))
            } else {
                l.to_owned()
            }
        })
        .collect();
    Ok(lines.join("\n"))
}

/// (VmRSS, VmHWM) of a process, MB.
fn memory(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn load(cp: &ControlPlane, dns: &DnsServer, file: &Path, what: &str) -> Result<()> {
    let t = Instant::now();
    let out = cp
        .ctl()
        .json(["bgp", "load-rib", file.to_str().context("path")?])?;
    let call = t.elapsed();
    let version = out["routing_version_after"].as_u64().context("version")?;
    eventually(
        Duration::from_secs(120),
        "the DNS server to serve the map",
        || (dns.config_version().ok()? >= version).then_some(()),
    )?;
    let served = t.elapsed();
    println!(
        "{what}: load call {:.2} s, served by sextant-dns after {:.2} s (changed: {}, version {version}, {} prefixes in groups)",
        call.as_secs_f64(),
        served.as_secs_f64(),
        out["changed"],
        out["rib"]["grouped_prefixes"]
    );
    let (rss, hwm) = memory(cp.process.pid());
    let (drss, dhwm) = memory(dns.process.pid());
    println!(
        "  sextant-cp RSS {rss:.0} MB (peak {hwm:.0} MB); sextant-dns RSS {drss:.0} MB (peak {dhwm:.0} MB)"
    );
    Ok(())
}

fn main() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut spec = Spec {
        v4: 1_000_000,
        v6: 200_000,
        peers: 1,
        origins: 70_000,
    };
    let first = dir.path().join("rib-1.mrt");
    let (_, size) = synth::write(&first, &spec)?;
    // A different table of the same size (other prefixes and origins).
    spec.v4 -= 1;
    let second = dir.path().join("rib-2.mrt");
    synth::write(&second, &spec)?;
    println!("dumps: {:.1} MB each", size as f64 / 1e6);

    let fleet_file = dir.path().join("fleet.toml");
    std::fs::write(&fleet_file, fleet()?)?;
    let cp = ControlPlane::start(&dir.path().join("cp"), Some(&fleet_file))?;
    let dns = DnsServer::start(&cp.url(), "dns-1", &dir.path().join("dns"))?;
    eventually(
        Duration::from_secs(30),
        "the DNS server's first config",
        || (dns.config_version().ok()? >= 1).then_some(()),
    )?;
    let (rss, _) = memory(cp.process.pid());
    let (drss, _) = memory(dns.process.pid());
    println!("before: sextant-cp RSS {rss:.0} MB, sextant-dns RSS {drss:.0} MB");
    load(&cp, &dns, &first, "first load")?;
    load(&cp, &dns, &second, "replacing load")?;
    load(&cp, &dns, &second, "same dump again")?;
    Ok(())
}
