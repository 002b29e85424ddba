//! End to end: a real control plane pushing to a real `sextant-dns`, asked
//! by Debian's `dig` (semantics) and by a small UDP client (shares).

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RData;
use sextant_tests::{eventually, ControlPlane, Ctl, DnsServer};

/// www: group eu (10.1/16, 2001:db8:1::/48) → e1 20 %, e2 30 %, e3 50 %;
/// group us (10.2/16) → a CDN (CNAME); default → e3 (IPv4 and IPv6).
/// big: one edge with 40 addresses (too many for 512 bytes).
fn fleet() -> String {
    let mut f = String::from(
        r#"
[[services]]
id = "www"
hostname = "www.example.com"
zone = "example.com"
ttl_seconds = 30
default_group = "default"
nameservers = ["ns1.example.com", "ns2.example.com"]
answer_count = 1
policy = { mode = "weighted", weights = { eu = { e1 = 20, e2 = 30, e3 = 50 }, us = { cdn = 1 }, default = { e3 = 1 } } }

[[services]]
id = "big"
hostname = "big.example.com"
zone = "example.com"
default_group = "default"
nameservers = ["ns1.example.com", "ns2.example.com"]
policy = { mode = "weighted", weights = { default = { e4 = 1 }, eu = { e4 = 1 }, us = { e4 = 1 } } }

[[edges]]
id = "cdn"
kind = "third_party"
provider = "cdn-a"
site = "region/r2/metro/m2/site/cdn-a"
cname = "www.cdn-a.example.net"
capacity_rps = 1000
health_check = "127.0.2.1:80"

[[groups]]
id = "eu"
prefixes = ["10.1.0.0/16", "2001:db8:1::/48"]
demand_rps = { www = 100, big = 1 }
latency_ms = { "region/r1" = 10, "region/r2" = 20, "provider/cdn-a" = 30 }

[[groups]]
id = "us"
prefixes = ["10.2.0.0/16"]
demand_rps = { www = 100, big = 1 }
latency_ms = { "region/r1" = 10, "region/r2" = 20, "provider/cdn-a" = 30 }

[[groups]]
id = "default"
demand_rps = { www = 10, big = 1 }
latency_ms = { "region/r1" = 10, "region/r2" = 20, "provider/cdn-a" = 30 }
"#,
    );
    let big: Vec<String> = (1..=40).map(|i| format!("\"127.0.4.{i}\"")).collect();
    for (id, site, addrs) in [
        (
            "e1",
            "region/r1/metro/m1/site/s1",
            "\"127.0.1.1\"".to_owned(),
        ),
        (
            "e2",
            "region/r1/metro/m1/site/s2",
            "\"127.0.1.2\"".to_owned(),
        ),
        (
            "e3",
            "region/r2/metro/m2/site/s3",
            "\"127.0.1.3\", \"::1\"".to_owned(),
        ),
        ("e4", "region/r2/metro/m2/site/s4", big.join(", ")),
    ] {
        f.push_str(&format!(
            "\n[[edges]]\nid = \"{id}\"\nkind = \"self_built\"\nsite = \"{site}\"\naddresses = [{addrs}]\n\
             capacity_rps = 1000\nhealth_check = \"127.0.3.1:80\"\n"
        ));
    }
    f
}

fn edge_of(answer: &str) -> &str {
    match answer {
        "127.0.1.1" => "e1",
        "127.0.1.2" => "e2",
        "127.0.1.3" | "::1" => "e3",
        "www.cdn-a.example.net." => "cdn",
        other => other,
    }
}

fn start(dir: &Path) -> Result<(ControlPlane, DnsServer)> {
    let file = dir.join("fleet.toml");
    std::fs::write(&file, fleet())?;
    let cp = ControlPlane::start(&dir.join("cp"), Some(&file))?;
    let dns = DnsServer::start(&cp.url(), "dns-1", &dir.join("dns"))?;
    let v = routing_version(&cp.ctl())?;
    wait_applied(&cp.ctl(), &dns, v)?;
    Ok((cp, dns))
}

fn routing_version(ctl: &Ctl) -> Result<u64> {
    ctl.json(["status"])?["routing_version"]
        .as_u64()
        .context("routing_version")
}

/// Waits until the control plane has the DNS node's ACK for `version`.
fn wait_applied(ctl: &Ctl, dns: &DnsServer, version: u64) -> Result<()> {
    eventually(
        Duration::from_secs(15),
        "the dns node to ACK the version",
        || {
            let status = ctl.json(["status"]).ok()?;
            let applied = status["subscribers"]
                .as_array()?
                .iter()
                .find(|s| s["node_id"] == "dns-1" && s["kind"] == "dns")?["version_applied"]
                .as_u64()?;
            (applied == version).then_some(())
        },
    )?;
    ensure!(dns.config_version()? == version, "metrics disagree");
    Ok(())
}

/// The `+short` lines of a dig run.
fn short(dns: &DnsServer, args: &[&str]) -> Result<Vec<String>> {
    let mut all = args.to_vec();
    all.push("+short");
    Ok(dns
        .dig(&all)?
        .lines()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
        .collect())
}

/// A raw query for `name` A with an ECS option for `subnet` (IPv4 /24).
fn query(id: u16, name: &str, ecs: [u8; 3]) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[0x00, 0x00, 0, 1, 0, 0, 0, 0, 0, 1]);
    for l in name.split('.') {
        m.push(l.len() as u8);
        m.extend_from_slice(l.as_bytes());
    }
    m.extend_from_slice(&[0, 0, 1, 0, 1]);
    m.extend_from_slice(&[
        0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 11, 0, 8, 0, 7, 0, 1, 24, 0,
    ]);
    m.extend_from_slice(&ecs);
    m
}

/// Sends `n` queries (pipelined, 100 in flight) from clients spread over
/// `first_octets.x.y/24`, counts the first answer's edge.
fn shares(server: SocketAddr, first: [u8; 2], n: usize) -> Result<BTreeMap<String, usize>> {
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    sock.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut counts = BTreeMap::new();
    let mut buf = [0u8; 2048];
    let mut sent = 0usize;
    while sent < n {
        let batch = (n - sent).min(100);
        for k in 0..batch {
            let i = sent + k;
            sock.send_to(
                &query(
                    i as u16,
                    "www.example.com",
                    [first[0], first[1], (i % 251) as u8],
                ),
                server,
            )?;
        }
        for _ in 0..batch {
            let (len, _) = sock.recv_from(&mut buf).context("a response")?;
            let m = Message::from_vec(&buf[..len])?;
            ensure!(m.metadata.response_code == ResponseCode::NoError, "{m:?}");
            let first = m.answers.first().context("an answer")?;
            let key = match &first.data {
                RData::A(a) => a.0.to_string(),
                RData::CNAME(c) => c.0.to_string(),
                other => bail!("unexpected answer {other:?}"),
            };
            *counts.entry(edge_of(&key).to_owned()).or_insert(0) += 1;
        }
        sent += batch;
    }
    Ok(counts)
}

fn check_shares(counts: &BTreeMap<String, usize>, expected: &[(&str, f64)]) -> Result<()> {
    let n: usize = counts.values().sum();
    for (edge, want) in expected {
        let got = counts.get(*edge).copied().unwrap_or(0) as f64 / n as f64;
        ensure!(
            (got - want).abs() <= 0.03,
            "{edge}: {got:.3} of answers, pushed weight {want:.3} ± 0.03 ({counts:?})"
        );
    }
    ensure!(
        counts.len() == expected.len(),
        "unexpected edges answered: {counts:?}"
    );
    Ok(())
}

#[test]
fn answers_follow_client_subnets_weights_and_drains() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (cp, dns) = start(dir.path())?;
    let ctl = cp.ctl();

    // Two subnets, two groups; the scope in the reply is the group prefix.
    let eu = dns.dig(&["www.example.com", "A", "+subnet=10.1.2.0/24"])?;
    ensure!(eu.contains("CLIENT-SUBNET: 10.1.2.0/24/16"), "{eu}");
    ensure!(eu.contains("flags: qr aa"), "not authoritative: {eu}");
    let a = short(&dns, &["www.example.com", "+subnet=10.1.2.0/24"])?;
    ensure!(
        a.len() == 1 && ["e1", "e2", "e3"].contains(&edge_of(&a[0])),
        "{a:?}"
    );
    let us = dns.dig(&["www.example.com", "A", "+subnet=10.2.9.0/24"])?;
    ensure!(us.contains("CLIENT-SUBNET: 10.2.9.0/24/16"), "{us}");
    ensure!(
        us.contains("www.example.com.\t30\tIN\tCNAME\twww.cdn-a.example.net."),
        "third party not answered as a CNAME: {us}"
    );
    // Outside every group: the default group, with the scope of the block
    // that maps to it (11/8 here), not 0, which would let a resolver reuse
    // the default answer for the eu clients.
    let other = dns.dig(&["www.example.com", "A", "+subnet=11.0.0.0/24"])?;
    ensure!(
        other.contains("CLIENT-SUBNET: 11.0.0.0/24/8") && other.contains("127.0.1.3"),
        "{other}"
    );
    // IPv6 ECS, and the default group (no ECS: the source is 127.0.0.1).
    let v6 = dns.dig(&["www.example.com", "AAAA", "+subnet=2001:db8:1:200::/56"])?;
    ensure!(v6.contains("CLIENT-SUBNET: 2001:db8:1:200::/56/48"), "{v6}");
    ensure!(short(&dns, &["www.example.com"])? == ["127.0.1.3"]);
    ensure!(short(&dns, &["www.example.com", "AAAA"])? == ["::1"]);
    // Case-insensitive names; the question's case is kept.
    let mixed = dns.dig(&["WwW.ExAmPlE.cOm", "+subnet=10.9.0.0/24"])?;
    ensure!(
        mixed.contains(";WwW.ExAmPlE.cOm.") && mixed.contains("127.0.1.3"),
        "{mixed}"
    );

    // Apex data, NXDOMAIN vs NODATA, REFUSED outside the zone.
    let soa = short(&dns, &["example.com", "SOA"])?;
    ensure!(
        soa.len() == 1 && soa[0].starts_with("ns1.example.com. hostmaster.example.com. "),
        "{soa:?}"
    );
    let mut ns = short(&dns, &["example.com", "NS"])?;
    ns.sort();
    ensure!(ns == ["ns1.example.com.", "ns2.example.com."], "{ns:?}");
    let nx = dns.dig(&["nope.example.com"])?;
    ensure!(
        nx.contains("status: NXDOMAIN") && nx.contains("IN\tSOA\tns1.example.com."),
        "{nx}"
    );
    let nodata = dns.dig(&["www.example.com", "TXT"])?;
    ensure!(
        nodata.contains("status: NOERROR")
            && nodata.contains("ANSWER: 0")
            && nodata.contains("SOA"),
        "{nodata}"
    );
    let refused = dns.dig(&["www.example.org"])?;
    ensure!(refused.contains("status: REFUSED"), "{refused}");

    // Over TCP, and truncation: 40 addresses do not fit in 512 bytes.
    let tcp = short(&dns, &["www.example.com", "+tcp", "+subnet=10.2.0.0/24"])?;
    ensure!(tcp == ["www.cdn-a.example.net."], "{tcp:?}");
    let tc = dns.dig(&["big.example.com", "+noedns", "+ignore"])?;
    ensure!(
        tc.contains("flags: qr aa tc") && tc.contains("ANSWER: 0"),
        "{tc}"
    );
    let retried = short(&dns, &["big.example.com", "+noedns"])?;
    ensure!(
        retried.len() == 40,
        "dig's TCP retry got {} answers",
        retried.len()
    );

    // The shares of 10,000 queries match the pushed weights.
    let counts = shares(dns.addr(), [10, 1], 10_000)?;
    check_shares(&counts, &[("e1", 0.2), ("e2", 0.3), ("e3", 0.5)])?;

    // Drain e2: once the DNS node ACKs the new version, e2 is never answered.
    let v1 = routing_version(&ctl)?;
    ctl.run([
        "drain",
        "region/r1/metro/m1/site/s2",
        "--reason",
        "geodns test",
    ])?
    .ok()?;
    let v2 = routing_version(&ctl)?;
    ensure!(v2 > v1, "drain made no new version");
    wait_applied(&ctl, &dns, v2)?;
    let counts = shares(dns.addr(), [10, 1], 3_000)?;
    ensure!(
        !counts.contains_key("e2"),
        "drained e2 answered: {counts:?}"
    );
    check_shares(&counts, &[("e1", 0.2 / 0.7), ("e3", 0.5 / 0.7)])?;

    // Visibility: the debug endpoint and the metrics.
    let (code, body) = sextant_tests::http_get(
        dns.admin,
        "/debug/answer?name=www.example.com&client=10.1.2.0/24",
    )?;
    ensure!(code == 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body)?;
    ensure!(
        v["client_group"] == "eu" && v["scope"] == 16 && v["matched_prefix"] == "10.1.0.0/16",
        "{v}"
    );
    let edges: Vec<&str> = v["weights"]
        .as_array()
        .context("weights")?
        .iter()
        .filter_map(|w| w["edge"].as_str())
        .collect();
    ensure!(edges == ["e1", "e3"], "{v}");
    let metrics = eventually(Duration::from_secs(5), "metrics flushed", || {
        let m = dns.metrics().ok()?;
        m.contains("sextant_dns_steered_total{group=\"eu\"}")
            .then_some(m)
    })?;
    for needle in [
        "sextant_dns_queries_total{transport=\"udp\",qtype=\"A\",rcode=\"NOERROR\"}",
        "sextant_dns_queries_total{transport=\"tcp\",qtype=\"A\",rcode=\"NOERROR\"}",
        "sextant_dns_queries_total{transport=\"udp\",qtype=\"A\",rcode=\"NXDOMAIN\"}",
        "sextant_dns_ecs_queries_total{ecs=\"present\"}",
        "sextant_dns_edge_answers_total{edge=\"e2\"}",
    ] {
        ensure!(metrics.contains(needle), "{needle} not in\n{metrics}");
    }
    ensure!(
        dns.metric("sextant_dns_truncated_total ")?.unwrap_or(0.0) >= 1.0,
        "no truncation counted"
    );
    Ok(())
}

#[test]
fn answers_continue_from_the_persisted_config() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (cp, dns) = start(dir.path())?;
    let v = dns.config_version()?;
    cp.process.kill()?;
    // The control plane is gone: nothing changes.
    ensure!(
        short(&dns, &["www.example.com", "+subnet=10.2.0.0/24"])? == ["www.cdn-a.example.net."]
    );
    // A restart without a control plane serves the persisted config.
    dns.process.kill()?;
    let dns = DnsServer::start("http://127.0.0.1:1", "dns-1", &dir.path().join("dns"))?;
    eventually(Duration::from_secs(5), "the persisted config", || {
        (dns.config_version().ok()? == v).then_some(())
    })?;
    ensure!(dns.metric("sextant_dns_config_from_disk ")? == Some(1.0));
    let a = short(&dns, &["www.example.com", "+subnet=10.1.0.0/24"])?;
    ensure!(
        a.len() == 1 && ["e1", "e2", "e3"].contains(&edge_of(&a[0])),
        "{a:?}"
    );
    ensure!(
        short(&dns, &["www.example.com", "+subnet=10.2.0.0/24"])? == ["www.cdn-a.example.net."]
    );
    let counts = shares(dns.addr(), [10, 1], 3_000)?;
    check_shares(&counts, &[("e1", 0.2), ("e2", 0.3), ("e3", 0.5)])?;
    Ok(())
}

/// Sends a packet; returns the response's rcode, or None without one.
fn exchange(sock: &UdpSocket, server: SocketAddr, packet: &[u8]) -> Result<Option<ResponseCode>> {
    sock.send_to(packet, server)?;
    let mut buf = [0u8; 2048];
    match sock.recv_from(&mut buf) {
        Ok((n, _)) => Ok(Some(Message::from_vec(&buf[..n])?.metadata.response_code)),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

#[test]
fn malformed_packets_get_formerr_or_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (_cp, dns) = start(dir.path())?;
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    sock.set_read_timeout(Some(Duration::from_millis(300)))?;
    let good = query(7, "www.example.com", [10, 1, 2]);
    ensure!(exchange(&sock, dns.addr(), &good)? == Some(ResponseCode::NoError));
    let mut bad: Vec<(String, Vec<u8>)> = Vec::new();
    for cut in [0, 5, 11, 12, 20, good.len() - 12, good.len() - 1] {
        bad.push((format!("truncated at {cut}"), good[..cut].to_vec()));
    }
    for (at, v) in [(5, 3u8), (7, 2), (9, 1), (11, 4), (4, 0xff)] {
        let mut p = good.clone();
        p[at] = v;
        bad.push((format!("count byte {at} = {v}"), p));
    }
    let n = good.len();
    let mut p = good.clone();
    p[n - 9] = 0xff; // ECS option longer than the OPT record
    bad.push(("ecs length".into(), p));
    let mut p = good.clone();
    p[n - 6] = 7; // unknown ECS family
    bad.push(("ecs family".into(), p));
    let mut p = good.clone();
    p[n - 5] = 33; // source prefix longer than IPv4
    bad.push(("ecs source".into(), p));
    let mut p = good.clone();
    p[n - 1] = 1; // bits set beyond the /22
    p[n - 5] = 22;
    bad.push(("ecs host bits".into(), p));
    let mut p = good.clone();
    p.extend_from_slice(&good[n - 22..]); // a second OPT record
    p[11] = 2;
    bad.push(("two OPT records".into(), p));
    let mut p = good.clone();
    p[2] = 0x80; // a response
    bad.push(("a response".into(), p));
    bad.push((
        "garbage".into(),
        (0..200u8).map(|i| i.wrapping_mul(37)).collect(),
    ));
    for (what, packet) in &bad {
        match exchange(&sock, dns.addr(), packet)? {
            None | Some(ResponseCode::FormErr) => {}
            Some(other) => bail!("{what}: answered {other:?}"),
        }
    }
    // Still serving, and it said FORMERR at least for the bad ECS options.
    ensure!(exchange(&sock, dns.addr(), &good)? == Some(ResponseCode::NoError));
    let formerr = eventually(Duration::from_secs(5), "FORMERR counted", || {
        dns.metric(
            "sextant_dns_queries_total{transport=\"udp\",qtype=\"other\",rcode=\"FORMERR\"} ",
        )
        .ok()
        .flatten()
    })?;
    ensure!(formerr >= 4.0, "{formerr}");
    ensure!(
        short(&dns, &["www.example.com", "+subnet=10.2.0.0/24"])? == ["www.cdn-a.example.net."]
    );
    Ok(())
}
