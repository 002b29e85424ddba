//! In-process bench of GeoDNS answer selection (`cargo bench -p
//! sextant-edge --bench dns`): the zone shape of ../shared/bench/dns (zone
//! example.test, groups 10.1/16, 10.2/16, 10.3/16 and a default, four edges
//! each weighted 10/20/30/40), with 1,000 and 1,000,000 client prefixes,
//! queried with the same mix as gen_queries.py (ECS /24, 75 % inside the
//! three /16s). Reports build time, lookup-table and process memory, and
//! the cost per query of the LPM lookup alone and of the whole UDP answer
//! (scan, lookup, weighted pick, response written) — no sockets.
//!
//! For queries per CPU-second over real sockets against gdnsd and Knot, see
//! scripts/bench-dns, which also uses this binary to write large configs:
//! `cargo bench -p sextant-edge --bench dns -- --write-config DIR PREFIXES NODE_ID`
//! stores the bench config with PREFIXES client prefixes as DIR's persisted
//! last-good config, which `sextant-dns --node-id NODE_ID --data-dir DIR`
//! then serves.

use std::collections::HashSet;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Instant;

use sextant_edge::dns::metrics::Tally;
use sextant_edge::dns::table::Tables;
use sextant_edge::dns::udp::{answer, Scratch};
use sextant_proto::v1 as pb;

const PER_GROUP: usize = 1000;

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The bench fleet's node config with `prefixes` client prefixes in all.
pub fn config(prefixes: usize) -> pb::NodeConfig {
    let mut c = pb::NodeConfig {
        services: vec![pb::ServiceConfig {
            id: "www".into(),
            hostname: "www.example.test".into(),
            zone: "example.test".into(),
            ttl_seconds: 60,
            default_group: "default".into(),
            soa_mname: "ns1.example.test".into(),
            soa_rname: "hostmaster.example.test".into(),
            soa_refresh: 3600,
            soa_retry: 600,
            soa_expire: 86400,
            soa_minimum: 60,
            nameservers: vec!["ns1.example.test".into()],
            answer_count: 1,
        }],
        ..pb::NodeConfig::default()
    };
    for n in 1..=4u8 {
        for i in 1..=4u8 {
            c.edges.push(pb::EdgeTarget {
                id: format!("e{n}{i}"),
                addresses: vec![format!("192.0.{n}.{i}")],
                cname: String::new(),
                site: String::new(),
            });
        }
    }
    let row = |group: &str, n: u8| pb::GroupRouting {
        service: "www".into(),
        group: group.into(),
        weights: (1..=4u8)
            .map(|i| pb::EdgeWeight {
                edge: format!("e{n}{i}"),
                weight: f64::from(i) / 10.0,
            })
            .collect(),
        ..pb::GroupRouting::default()
    };
    for n in 1..=3u8 {
        c.groups.push(pb::GroupMatch {
            id: format!("g{n}"),
            prefixes: vec![format!("10.{n}.0.0/16")],
            ..pb::GroupMatch::default()
        });
        c.routing.push(row(&format!("g{n}"), n));
    }
    c.groups.push(pb::GroupMatch {
        id: "default".into(),
        ..pb::GroupMatch::default()
    });
    c.routing.push(row("default", 4));
    // The other prefixes: distinct random /24s outside 10/8, in groups of
    // 1,000 answered like the default group.
    let mut rng = fastrand::Rng::with_seed(1);
    let mut seen = HashSet::new();
    let extra = prefixes.saturating_sub(3);
    let mut group = Vec::new();
    while seen.len() < extra {
        let a = rng.u32(..) & 0xffff_ff00;
        if a >> 24 == 10 || a >> 24 == 0 || !seen.insert(a) {
            continue;
        }
        group.push(format!("{}/24", Ipv4Addr::from(a)));
        if group.len() == PER_GROUP || seen.len() == extra {
            let id = format!("x{}", c.groups.len());
            c.routing.push(row(&id, 4));
            c.groups.push(pb::GroupMatch {
                id,
                prefixes: std::mem::take(&mut group),
                ..pb::GroupMatch::default()
            });
        }
    }
    c
}

/// Queries like gen_queries.py: www.example.test A with ECS /24.
fn queries(n: usize) -> (Vec<Vec<u8>>, Vec<IpAddr>) {
    let mut rng = fastrand::Rng::with_seed(42);
    let mut qs = Vec::with_capacity(n);
    let mut addrs = Vec::with_capacity(n);
    for _ in 0..n {
        let ip: [u8; 4] = if rng.f64() < 0.75 {
            [10, rng.u8(1..=3), rng.u8(..), 0]
        } else {
            [
                [11, 23, 45, 81, 100, 151, 203][rng.usize(..7)],
                rng.u8(..),
                rng.u8(..),
                0,
            ]
        };
        let mut m = vec![0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1];
        for l in ["www", "example", "test"] {
            m.push(l.len() as u8);
            m.extend_from_slice(l.as_bytes());
        }
        m.extend_from_slice(&[0, 0, 1, 0, 1]);
        m.extend_from_slice(&[
            0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 11, 0, 8, 0, 7, 0, 1, 24, 0,
        ]);
        m.extend_from_slice(&ip[..3]);
        qs.push(m);
        addrs.push(IpAddr::from(ip));
    }
    (qs, addrs)
}

/// Sends the query mix at a fixed rate for `secs` seconds and prints the
/// latency percentiles of the answers (and how many were lost).
fn latency(server: SocketAddr, qps: u64, secs: u64) -> std::io::Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;
    let (qs, _) = queries(65_536);
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let rx = sock.try_clone()?;
    let start = Instant::now();
    // Send times by query id (ns since start).
    let sent: Arc<Vec<std::sync::atomic::AtomicU64>> = Arc::new(
        (0..65_536)
            .map(|_| std::sync::atomic::AtomicU64::new(0))
            .collect(),
    );
    let done = Arc::new(AtomicBool::new(false));
    let receiver = {
        let (sent, done) = (sent.clone(), done.clone());
        std::thread::spawn(move || {
            let mut lat = Vec::new();
            let mut buf = [0u8; 2048];
            while !done.load(Ordering::Relaxed) {
                if let Ok((n, _)) = rx.recv_from(&mut buf) {
                    if n >= 2 {
                        let id = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
                        let now = start.elapsed().as_nanos() as u64;
                        lat.push(now.saturating_sub(sent[id].load(Ordering::Relaxed)));
                    }
                }
            }
            lat
        })
    };
    // Paced in 1 ms ticks (sleeping in between, so that the receiver
    // thread gets the CPU it shares with the sender).
    let total = qps * secs;
    let per_tick = qps.div_ceil(1000);
    let mut i = 0u64;
    let mut tick = 0u32;
    while i < total {
        for _ in 0..per_tick.min(total - i) {
            let id = (i % 65_536) as usize;
            let mut q = qs[id].clone();
            q[..2].copy_from_slice(&(id as u16).to_be_bytes());
            sent[id].store(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
            sock.send_to(&q, server)?;
            i += 1;
        }
        tick += 1;
        if let Some(wait) = (Duration::from_millis(1) * tick).checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    done.store(true, Ordering::Relaxed);
    let mut lat = receiver.join().unwrap_or_default();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    println!(
        "{server}: {qps} q/s for {secs} s: {} answers, {} lost; p50 {:.0} us, p99 {:.0} us, p99.9 {:.0} us, max {:.0} us",
        lat.len(),
        total.saturating_sub(lat.len() as u64),
        pct(0.5),
        pct(0.99),
        pct(0.999),
        lat.last().copied().unwrap_or(0) as f64 / 1000.0
    );
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--latency") {
        let parsed = (
            args.get(i + 1).and_then(|a| a.parse::<SocketAddr>().ok()),
            args.get(i + 2).and_then(|a| a.parse::<u64>().ok()),
            args.get(i + 3).and_then(|a| a.parse::<u64>().ok()),
        );
        let (Some(server), Some(qps), Some(secs)) = parsed else {
            eprintln!("usage: dns --latency 127.0.0.1:PORT QPS SECONDS");
            std::process::exit(2);
        };
        if !server.ip().is_loopback() || qps == 0 {
            eprintln!("loopback servers and a positive rate only");
            std::process::exit(2);
        }
        if let Err(e) = latency(server, qps, secs) {
            eprintln!("{e}");
            std::process::exit(1);
        }
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--write-config") {
        let (Some(dir), Some(n), Some(node)) = (
            args.get(i + 1),
            args.get(i + 2).and_then(|n| n.parse().ok()),
            args.get(i + 3),
        ) else {
            eprintln!("usage: dns --write-config DIR PREFIXES NODE_ID");
            std::process::exit(2);
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        if let Err(e) = sextant_edge::subscriber::store(
            std::path::Path::new(dir),
            (node, sextant_proto::v1::NodeKind::Dns),
            (1, ""),
            &config(n),
            now,
        ) {
            eprintln!("{e}");
            std::process::exit(1);
        }
        println!("wrote a config with {n} prefixes to {dir}");
        return;
    }
    let (qs, addrs) = queries(100_000);
    let src: SocketAddr = ([127, 0, 0, 1], 5353).into();
    println!(
        "{:>10} {:>9} {:>8} {:>9} {:>11} {:>12} {:>12}",
        "prefixes", "build_ms", "lpm_MB", "rss_MB", "lookup_ns", "lookup_rnd", "answer_ns"
    );
    for n in [1_000usize, 1_000_000] {
        let c = config(n);
        let before = rss_kb();
        let started = Instant::now();
        let t = match Tables::build(1, &c, None) {
            Ok(t) => t,
            Err(e) => panic!("bench config does not build: {e}"),
        };
        let build = started.elapsed();
        drop(c);
        let rss = rss_kb().saturating_sub(before);
        // LPM only, on the query mix.
        let rounds = 20;
        let started = Instant::now();
        for _ in 0..rounds {
            for a in &addrs {
                black_box(t.classify(black_box(*a)));
            }
        }
        let lookup = started.elapsed().as_nanos() as f64 / (rounds * addrs.len()) as f64;
        // LPM only, uniformly random addresses (cache-unfriendly).
        let mut rng = fastrand::Rng::with_seed(7);
        let rnd: Vec<IpAddr> = (0..1_000_000)
            .map(|_| IpAddr::from(Ipv4Addr::from(rng.u32(..))))
            .collect();
        let started = Instant::now();
        for a in &rnd {
            black_box(t.classify(black_box(*a)));
        }
        let lookup_rnd = started.elapsed().as_nanos() as f64 / rnd.len() as f64;
        // The whole answer.
        let mut cx = Scratch::default();
        let mut tally = Tally::new("udp");
        tally.reset_for(Some(&t));
        let rounds = 10;
        let started = Instant::now();
        for _ in 0..rounds {
            for q in &qs {
                black_box(answer(black_box(q), src, Some(&t), &mut cx, &mut tally));
            }
        }
        let per_answer = started.elapsed().as_nanos() as f64 / (rounds * qs.len()) as f64;
        println!(
            "{:>10} {:>9.0} {:>8.1} {:>9.1} {:>11.1} {:>12.1} {:>12.1}",
            n,
            build.as_secs_f64() * 1000.0,
            t.lpm_bytes() as f64 / 1048576.0,
            rss as f64 / 1024.0,
            lookup,
            lookup_rnd,
            per_answer
        );
    }
}
