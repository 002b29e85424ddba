//! End to end: a real BIRD 2 writes a TABLE_DUMP_V2 RIB dump of routes with
//! different origin ASNs; `sextantctl bgp load-rib` loads it into a real
//! `sextant-cp`; a real `sextant-dns` then answers `dig +subnet=` queries
//! from each ASN's prefixes with the edges of that ASN's client group. A
//! truncated dump is refused with its byte offset and changes nothing; a
//! newer dump replaces the map without a restart; the map survives one.

use std::time::Duration;

use anyhow::{Context, Result};
use sextant_tests::bird::Bird;
use sextant_tests::{eventually, ControlPlane, Ctl, DnsServer};

/// Groups isp-a (AS64500) → e1, isp-b (AS64501) → e2, default → e3.
const FLEET: &str = r#"
[[services]]
id = "www"
hostname = "www.example.com"
zone = "example.com"
ttl_seconds = 30
default_group = "default"
nameservers = ["ns1.example.com"]
answer_count = 1
policy = { mode = "weighted", weights = { isp-a = { e1 = 1 }, isp-b = { e2 = 1 }, default = { e3 = 1 } } }

[[edges]]
id = "e1"
kind = "self_built"
site = "region/r1/metro/m1/site/s1"
addresses = ["127.0.1.1"]
capacity_rps = 1000
health_check = "127.0.3.1:80"

[[edges]]
id = "e2"
kind = "self_built"
site = "region/r1/metro/m1/site/s2"
addresses = ["127.0.1.2"]
capacity_rps = 1000
health_check = "127.0.3.1:80"

[[edges]]
id = "e3"
kind = "self_built"
site = "region/r2/metro/m2/site/s3"
addresses = ["127.0.1.3"]
capacity_rps = 1000
health_check = "127.0.3.1:80"

[[groups]]
id = "isp-a"
asns = [64500]
demand_rps = { www = 10 }
latency_ms = { "region/r1" = 10, "region/r2" = 20 }

[[groups]]
id = "isp-b"
asns = [64501]
demand_rps = { www = 10 }
latency_ms = { "region/r1" = 10, "region/r2" = 20 }

[[groups]]
id = "default"
demand_rps = { www = 10 }
latency_ms = { "region/r1" = 10, "region/r2" = 20 }
"#;

fn version(ctl: &Ctl) -> Result<u64> {
    ctl.json(["status"])?["routing_version"]
        .as_u64()
        .context("routing_version")
}

/// Waits until the DNS node serves `version`.
fn wait_serving(dns: &DnsServer, version: u64) -> Result<()> {
    eventually(
        Duration::from_secs(15),
        "the dns node to serve the version",
        || (dns.config_version().ok()? >= version).then_some(()),
    )
}

/// The answer for www from a client in `subnet`.
fn answer(dns: &DnsServer, subnet: &str) -> Result<String> {
    let out = dns.dig(&[
        "www.example.com",
        "A",
        &format!("+subnet={subnet}"),
        "+short",
    ])?;
    Ok(out.trim().to_owned())
}

const FIRST: &[(&str, u32)] = &[
    ("10.11.0.0/16", 64500),
    ("10.12.0.0/16", 64501),
    ("10.13.0.0/16", 64502),
    ("2001:db8:11::/48", 64500),
];

#[test]
fn rib_dumps_from_bird_steer_asn_groups() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let fleet = dir.path().join("fleet.toml");
    std::fs::write(&fleet, FLEET)?;
    let bird_dir = dir.path().join("bird");
    std::fs::create_dir_all(&bird_dir)?;
    let bird = Bird::start(&bird_dir, FIRST)?;
    let rib = dir.path().join("rib-1.mrt");
    let bytes = bird.dump(&rib, FIRST.len())?;

    let cp = ControlPlane::start_with(
        &dir.path().join("cp"),
        Some(&fleet),
        &["--metrics", "127.0.0.1:0"],
    )?;
    let ctl = cp.ctl();
    let dns = DnsServer::start(&cp.url(), "dns-1", &dir.path().join("dns"))?;
    wait_serving(&dns, version(&ctl)?)?;
    // Without a RIB, ASN groups match nothing: the default group answers.
    assert_eq!(answer(&dns, "10.11.1.0/24")?, "127.0.1.3");
    assert_eq!(ctl.json(["bgp", "show"])?["generation"], 0);

    let before = version(&ctl)?;
    let loaded = ctl.json([
        "bgp",
        "load-rib",
        rib.to_str().context("path")?,
        "--reason",
        "weekly RIB",
    ])?;
    assert_eq!(loaded["changed"], true, "{loaded}");
    assert_eq!(loaded["rib"]["ipv4_prefixes"], 3, "{loaded}");
    assert_eq!(loaded["rib"]["ipv6_prefixes"], 1, "{loaded}");
    assert_eq!(loaded["rib"]["origin_asns"], 3, "{loaded}");
    assert_eq!(loaded["rib"]["grouped_prefixes"], 3, "{loaded}");
    assert_eq!(loaded["rib"]["source"], "rib-1.mrt");
    let after = loaded["routing_version_after"]
        .as_u64()
        .context("version")?;
    assert!(after > before);
    wait_serving(&dns, after)?;

    // Each ASN's prefixes get its group's edge; an ASN no group names gets
    // the default group; explicit ECS over IPv6 too.
    assert_eq!(answer(&dns, "10.11.1.0/24")?, "127.0.1.1");
    assert_eq!(answer(&dns, "10.12.200.0/24")?, "127.0.1.2");
    assert_eq!(answer(&dns, "10.13.0.0/24")?, "127.0.1.3");
    assert_eq!(answer(&dns, "2001:db8:11:5::/64")?, "127.0.1.1");
    // The ECS scope is the RIB prefix's length.
    let full = dns.dig(&["www.example.com", "A", "+subnet=10.11.1.0/24"])?;
    assert!(full.contains("CLIENT-SUBNET: 10.11.1.0/24/16"), "{full}");

    let groups = ctl.json(["get", "groups"])?;
    let isp_a = groups
        .as_array()
        .context("groups")?
        .iter()
        .find(|g| g["id"] == "isp-a")
        .context("isp-a")?;
    assert_eq!(isp_a["rib_prefixes"], 2, "{isp_a}");
    let table = ctl.run(["get", "groups"])?.ok()?.stdout;
    assert!(table.contains("AS64500 (2 RIB prefixes)"), "{table}");

    let metrics = cp.logged_addr("metrics")?;
    let (_, body) = sextant_tests::http_get(metrics, "/metrics")?;
    assert!(body.contains("sextant_bgp_rib_generation 1"), "{body}");
    assert!(
        body.contains("sextant_bgp_rib_prefixes{family=\"ipv4\"} 3"),
        "{body}"
    );

    let found = ctl.json(["bgp", "lookup", "10.12.3.4"])?;
    assert_eq!(found["prefix"], "10.12.0.0/16");
    assert_eq!(found["origin_asn"], 64501);
    assert_eq!(found["group"], "isp-b");
    let none = ctl.json(["bgp", "lookup", "192.0.2.1"])?;
    assert_eq!(none["origin_asn"], 0);
    let bad = ctl.run(["bgp", "lookup", "not-an-address"])?;
    assert!(
        !bad.success && bad.stderr.contains("not an IPv4 or IPv6 address"),
        "{}",
        bad.stderr
    );

    // Loading the same dump again changes nothing.
    let again = ctl.json(["bgp", "load-rib", rib.to_str().context("path")?])?;
    assert_eq!(again["changed"], false);
    assert_eq!(version(&ctl)?, after);

    // A truncated dump is refused with the offset; nothing changes.
    let cut = dir.path().join("cut.mrt");
    std::fs::write(&cut, &bytes[..bytes.len() - 7])?;
    let refused = ctl.run(["bgp", "load-rib", cut.to_str().context("path")?])?;
    assert!(!refused.success);
    assert!(
        refused.stderr.contains("cut.mrt: byte ") && refused.stderr.contains("truncated"),
        "{}",
        refused.stderr
    );
    assert!(
        refused.stderr.contains("the loaded map is unchanged"),
        "{}",
        refused.stderr
    );
    let garbage = dir.path().join("garbage.mrt");
    std::fs::write(
        &garbage,
        b"\x00\x00\x00\x01\x00\x0d\x00\x02\x00\x00\x00\x04abcd",
    )?;
    let refused = ctl.run(["bgp", "load-rib", garbage.to_str().context("path")?])?;
    assert!(
        !refused.success && refused.stderr.contains("byte 0"),
        "{}",
        refused.stderr
    );
    let shown = ctl.json(["bgp", "show"])?;
    assert_eq!(shown["generation"], 1);
    assert_eq!(shown["source"], "rib-1.mrt");
    assert_eq!(version(&ctl)?, after);
    assert_eq!(answer(&dns, "10.12.200.0/24")?, "127.0.1.2");

    // A newer dump (10.12/16 moved to AS64500) replaces the map live.
    let second: Vec<(&str, u32)> = vec![
        ("10.11.0.0/16", 64500),
        ("10.12.0.0/16", 64500),
        ("10.14.0.0/16", 64501),
        ("2001:db8:11::/48", 64500),
    ];
    bird.reconfigure(&second)?;
    let rib2 = dir.path().join("rib-2.mrt");
    bird.dump(&rib2, second.len())?;
    let loaded = ctl.json(["bgp", "load-rib", rib2.to_str().context("path")?])?;
    assert_eq!(loaded["rib"]["generation"], 2, "{loaded}");
    let v2 = loaded["routing_version_after"]
        .as_u64()
        .context("version")?;
    wait_serving(&dns, v2)?;
    assert_eq!(answer(&dns, "10.12.200.0/24")?, "127.0.1.1");
    assert_eq!(answer(&dns, "10.14.0.0/24")?, "127.0.1.2");
    assert_eq!(answer(&dns, "10.13.0.0/24")?, "127.0.1.3");

    // The audit log names who loaded what.
    let audit = ctl.json(["audit"])?;
    let loads: Vec<&serde_json::Value> = audit
        .as_array()
        .context("audit")?
        .iter()
        .filter(|r| r["action"] == "bgp.load-rib")
        .collect();
    assert_eq!(loads.len(), 2, "{audit}");
    assert_eq!(loads[0]["actor"], "e2e-test");
    assert_eq!(loads[0]["reason"], "weekly RIB");
    assert!(loads[1]["details"].to_string().contains("source=rib-2.mrt"));

    // The map is in the store: a restarted control plane has it.
    let digest = ctl.json(["bgp", "show"])?["digest"].clone();
    drop(dns);
    cp.process.stop()?;
    let cp = ControlPlane::start(&dir.path().join("cp"), None)?;
    let shown = cp.ctl().json(["bgp", "show"])?;
    assert_eq!(shown["generation"], 2);
    assert_eq!(shown["digest"], digest);
    assert_eq!(
        cp.ctl().json(["bgp", "lookup", "10.14.1.1"])?["group"],
        "isp-b"
    );
    Ok(())
}
