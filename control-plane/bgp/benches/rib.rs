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

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Instant;

use sextant_bgp::rib::decode_mrt;

/// xorshift64*: deterministic, fast.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn record(out: &mut Vec<u8>, subtype: u16, body: &[u8]) {
    out.extend_from_slice(&1_700_000_000u32.to_be_bytes());
    out.extend_from_slice(&13u16.to_be_bytes());
    out.extend_from_slice(&subtype.to_be_bytes());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
}

fn peer_table(peers: u16) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&[192, 0, 2, 1]);
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&peers.to_be_bytes());
    for p in 0..peers {
        // IPv4 peer address, 4-byte AS.
        b.push(0b10);
        b.extend_from_slice(&[192, 0, 2, p as u8]);
        b.extend_from_slice(&[192, 0, 2, p as u8]);
        b.extend_from_slice(&(65000 + u32::from(p)).to_be_bytes());
    }
    b
}

fn attributes(path: &[u32], v6: bool) -> Vec<u8> {
    let mut a = vec![0x40, 1, 1, 0];
    let seg_len = 2 + 4 * path.len();
    a.extend_from_slice(&[0x40, 2, seg_len as u8, 2, path.len() as u8]);
    for asn in path {
        a.extend_from_slice(&asn.to_be_bytes());
    }
    if !v6 {
        a.extend_from_slice(&[0x40, 3, 4, 192, 0, 2, 1]);
    }
    a
}

fn rib_record(
    seq: u32,
    addr: &[u8],
    len: u8,
    origin: u32,
    peers: u16,
    rng: &mut Rng,
) -> (u16, Vec<u8>) {
    let v6 = addr.len() == 16;
    let mut b = Vec::with_capacity(64);
    b.extend_from_slice(&seq.to_be_bytes());
    b.push(len);
    b.extend_from_slice(&addr[..usize::from(len).div_ceil(8)]);
    b.extend_from_slice(&peers.to_be_bytes());
    for p in 0..peers {
        let transit = 64000 + (rng.next() % 500) as u32;
        let attrs = attributes(&[65000 + u32::from(p), transit, origin], v6);
        b.extend_from_slice(&p.to_be_bytes());
        b.extend_from_slice(&1_700_000_000u32.to_be_bytes());
        b.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
        b.extend_from_slice(&attrs);
    }
    (if v6 { 4 } else { 2 }, b)
}

/// Writes the dump; returns the prefixes it holds.
fn generate(
    path: &std::path::Path,
    n4: usize,
    n6: usize,
    peers: u16,
) -> std::io::Result<(Vec<(u32, u8)>, u64)> {
    let mut rng = Rng(0x5eed_cafe_f00d_0001);
    // Distinct prefixes, mostly /24s as in the real table.
    let mut v4: Vec<(u32, u8)> = Vec::with_capacity(n4 + n4 / 8);
    while v4.len() < n4 + n4 / 8 {
        let r = rng.next();
        let len = match r % 100 {
            0..=59 => 24,
            60..=74 => 23,
            75..=84 => 22,
            85..=94 => 20 + (r >> 8) as u8 % 2,
            _ => 16 + (r >> 8) as u8 % 4,
        };
        let a = (r >> 32) as u32 & (u32::MAX << (32 - len));
        // Keep out of 0/8, 127/8, multicast and above.
        if (1..224).contains(&(a >> 24)) && a >> 24 != 127 {
            v4.push((a, len));
        }
    }
    v4.sort_unstable();
    v4.dedup();
    v4.truncate(n4);
    let mut v6: Vec<(u128, u8)> = Vec::with_capacity(n6 + n6 / 8);
    while v6.len() < n6 + n6 / 8 {
        let r = rng.next();
        let len = [32u8, 40, 44, 48, 48, 48][(r % 6) as usize];
        let hi = 0x2000u128 | (u128::from(r >> 48) & 0x0fff);
        let a = (hi << 112 | u128::from(rng.next()) << 48) & (u128::MAX << (128 - len));
        v6.push((a, len));
    }
    v6.sort_unstable();
    v6.dedup();
    v6.truncate(n6);

    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut buf = Vec::with_capacity(1 << 20);
    record(&mut buf, 1, &peer_table(peers));
    let mut seq = 0u32;
    for &(a, l) in &v4 {
        let origin = 1 + (rng.next() % 70_000) as u32;
        let (subtype, body) = rib_record(seq, &a.to_be_bytes(), l, origin, peers, &mut rng);
        record(&mut buf, subtype, &body);
        seq += 1;
        if buf.len() > 1 << 20 {
            file.write_all(&buf)?;
            buf.clear();
        }
    }
    for &(a, l) in &v6 {
        let origin = 1 + (rng.next() % 70_000) as u32;
        let (subtype, body) = rib_record(seq, &a.to_be_bytes(), l, origin, peers, &mut rng);
        record(&mut buf, subtype, &body);
        seq += 1;
        if buf.len() > 1 << 20 {
            file.write_all(&buf)?;
            buf.clear();
        }
    }
    file.write_all(&buf)?;
    file.flush()?;
    let size = std::fs::metadata(path)?.len();
    Ok((v4, size))
}

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
    let (v4, size) = generate(&path, n4, n6, peers)?;
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
        .map(|_| IpAddr::V4(Ipv4Addr::from(rng.next() as u32)))
        .collect();
    let inside: Vec<IpAddr> = (0..1_000_000)
        .map(|_| {
            let (a, l) = v4[(rng.next() % v4.len() as u64) as usize];
            let host = if l == 32 { 0 } else { (rng.next() as u32) >> l };
            IpAddr::V4(Ipv4Addr::from(a | host))
        })
        .collect();
    let six: Vec<IpAddr> = (0..1_000_000)
        .map(|_| {
            let hi = 0x2000u128 | (u128::from(rng.next() >> 48) & 0x0fff);
            IpAddr::V6(Ipv6Addr::from(hi << 112 | u128::from(rng.next()) << 48))
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
