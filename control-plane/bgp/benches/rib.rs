//! Loads a generated full-table-sized RIB dump and times lookups.
//!
//!   cargo bench -p sextant-bgp --bench rib [-- V4 V6 PEERS]
//!
//! Defaults: 1,000,000 IPv4 and 200,000 IPv6 prefixes, one peer per prefix
//! (a router's own table, as BIRD dumps it; RouteViews dumps have dozens of
//! peers per prefix: pass PEERS to see what that costs). The dump is written
//! as RFC 6396 TABLE_DUMP_V2 records (peer index table, then one RIB record
//! per prefix with ORIGIN, AS_PATH and NEXT_HOP), streamed to a temporary
//! file so that generating it does not inflate the load's memory figure.
//!
//! Prints: dump size, load time, peak RSS growth during the load (from
//! /proc/self/status VmHWM), the map's own bytes, and the mean time of a
//! longest-prefix lookup over random addresses (and over addresses inside
//! the table's prefixes).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Instant;

use sextant_bgp::rib::decode_mrt;
use sextant_bgp::synth::{self, Rng, Spec};

/// Peak resident set size so far, in bytes (VmHWM), and current (VmRSS).
fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let num = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (n4, n6, peers) = (num(0, 1_000_000), num(1, 200_000), num(2, 1) as u16);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("rib.mrt");
    let t = Instant::now();
    let spec = Spec {
        v4: n4,
        v6: n6,
        peers,
        origins: 70_000,
    };
    let (v4, size) = synth::write(&path, &spec)?;
    println!(
        "generated {n4} IPv4 + {n6} IPv6 prefixes, {peers} peer(s) each: {:.1} MB in {:.2} s",
        size as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );

    let (hwm_before, rss_before) = rss();
    let t = Instant::now();
    let data = std::fs::read(&path)?;
    let read_s = t.elapsed().as_secs_f64();
    let (map, stats) = decode_mrt(data.into())?;
    let load_s = t.elapsed().as_secs_f64();
    let (hwm_after, rss_after) = rss();
    println!(
        "load: {load_s:.2} s (read {read_s:.2} s + decode {:.2} s): {} IPv4, {} IPv6 prefixes, {} origins, {} entries",
        load_s - read_s,
        map.v4_len(),
        map.v6_len(),
        map.origins(),
        stats.entries
    );
    println!(
        "memory: peak RSS {:.0} MB -> {:.0} MB during the load (growth {:.0} MB, dump bytes included); RSS after {:.0} MB (+{:.0} MB); the map holds {:.0} MB",
        hwm_before as f64 / 1e6,
        hwm_after as f64 / 1e6,
        hwm_after.saturating_sub(hwm_before.max(rss_before)) as f64 / 1e6,
        rss_after as f64 / 1e6,
        rss_after.saturating_sub(rss_before) as f64 / 1e6,
        map.memory_bytes() as f64 / 1e6
    );

    // Lookups: random IPv4 addresses (most miss or hit short prefixes) and
    // addresses inside the table's prefixes (every one hits).
    let mut rng = Rng(42);
    let random: Vec<IpAddr> = (0..1_000_000)
        .map(|_| IpAddr::V4(Ipv4Addr::from(rng.next_u64() as u32)))
        .collect();
    let inside: Vec<IpAddr> = (0..1_000_000)
        .map(|_| {
            let (a, l) = v4[(rng.next_u64() % v4.len() as u64) as usize];
            let host = if l == 32 {
                0
            } else {
                (rng.next_u64() as u32) >> l
            };
            IpAddr::V4(Ipv4Addr::from(a | host))
        })
        .collect();
    let six: Vec<IpAddr> = (0..1_000_000)
        .map(|_| {
            let hi = 0x2000u128 | (u128::from(rng.next_u64() >> 48) & 0x0fff);
            IpAddr::V6(Ipv6Addr::from(hi << 112 | u128::from(rng.next_u64()) << 48))
        })
        .collect();
    for (what, addrs) in [
        ("random IPv4", &random),
        ("IPv4 inside the table", &inside),
        ("random IPv6 in 2000::/4", &six),
    ] {
        let mut hits = 0u64;
        let t = Instant::now();
        for _ in 0..5 {
            for a in addrs.iter() {
                if let Some(r) = map.lookup(std::hint::black_box(*a)) {
                    hits += u64::from(r.origin > 0);
                }
            }
        }
        let ns = t.elapsed().as_nanos() as f64 / (5 * addrs.len()) as f64;
        println!(
            "lookup ({what}): {ns:.0} ns each, {:.0} % hit",
            100.0 * hits as f64 / (5 * addrs.len()) as f64
        );
    }
    Ok(())
}
