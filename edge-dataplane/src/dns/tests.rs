//! Resolution semantics, and the fast path checked against the general
//! (hickory) path on the same queries.

use std::net::{IpAddr, SocketAddr};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::opt::{EdnsCode, EdnsOption};
use hickory_proto::rr::{RData, RecordType};
use hickory_server::net::xfer::Protocol;
use hickory_server::server::Request;
use sextant_proto::v1 as pb;

use super::general;
use super::metrics::Tally;
use super::sample::config as fixture;
use super::table::{Answer, Client, Rcode, Tables};
use super::udp::{self, Scratch};

fn tables() -> Tables {
    Tables::build(7, &fixture(), None).expect("fixture builds")
}

fn row(service: &str, group: &str, ws: &[(&str, f64)], unserved: f64) -> pb::GroupRouting {
    super::sample::row(service, group, ws, unserved)
}

fn wire(name: &str) -> Vec<u8> {
    super::table::wire_name(name).expect("name")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn steered_edges(t: &Tables, name: &str, qtype: u16, client: &str) -> (Vec<String>, u8) {
    let mut rng = fastrand::Rng::with_seed(3);
    let r = t.resolve(&wire(name), qtype, Client { addr: ip(client) }, &mut rng);
    match r.answer {
        Answer::Steered {
            service,
            family,
            route,
            picks,
            count,
        } => (
            t.steered(service, family, route, &picks[..usize::from(count)])
                .map(|p| t.edges[p.edge as usize].id.clone())
                .collect(),
            r.scope,
        ),
        _ => (vec![], r.scope),
    }
}

#[test]
fn groups_rows_and_fallbacks() {
    let t = tables();
    assert_eq!(
        steered_edges(&t, "www.example.com", 1, "10.1.2.0"),
        (vec!["ams1".into()], 16)
    );
    assert_eq!(
        steered_edges(&t, "www.example.com", 28, "2001:db8:1:2::"),
        (vec!["ams1".into()], 48)
    );
    // Drained group → the default group's row.
    assert_eq!(
        steered_edges(&t, "www.example.com", 1, "10.2.0.1").0,
        ["lon1"]
    );
    // No match → default group.
    assert_eq!(
        steered_edges(&t, "www.example.com", 1, "192.0.2.1").0,
        ["lon1"]
    );
    assert_eq!(
        steered_edges(&t, "www.example.com", 1, "127.0.0.1").0,
        ["lon1"]
    );
    // Third party → CNAME for A and AAAA alike.
    assert_eq!(
        steered_edges(&t, "www.example.com", 1, "10.7.0.1").0,
        ["cdn-a"]
    );
    assert_eq!(
        steered_edges(&t, "www.example.com", 28, "10.7.0.1").0,
        ["cdn-a"]
    );
    // api: two distinct answers.
    let (mut two, _) = steered_edges(&t, "API.v1.example.com", 1, "10.1.0.9");
    two.sort();
    assert_eq!(two, ["ams1", "ams2"]);
    // A group with an IPv4-only edge: AAAA is NODATA, with the scope.
    let mut rng = fastrand::Rng::new();
    let r = t.resolve(
        &wire("www.example.com"),
        28,
        Client {
            addr: ip("10.5.1.1"),
        },
        &mut rng,
    );
    assert!(matches!(r.answer, Answer::None));
    assert_eq!(
        (r.rcode, r.scope, r.soa_zone.is_some()),
        (Rcode::NoError, 16, true)
    );
}

#[test]
fn names_outside_and_inside_the_zone() {
    let t = tables();
    let mut rng = fastrand::Rng::new();
    let c = Client {
        addr: ip("10.1.0.1"),
    };
    let r = t.resolve(&wire("nope.example.com"), 1, c, &mut rng);
    assert_eq!(
        (r.rcode, r.authoritative, r.soa_zone),
        (Rcode::NxDomain, true, Some(0))
    );
    let r = t.resolve(&wire("x.www.example.com"), 1, c, &mut rng);
    assert_eq!(r.rcode, Rcode::NxDomain);
    let r = t.resolve(&wire("www.example.org"), 1, c, &mut rng);
    assert_eq!((r.rcode, r.authoritative), (Rcode::Refused, false));
    // Empty non-terminal above api.v1: NODATA.
    let r = t.resolve(&wire("v1.example.com"), 1, c, &mut rng);
    assert_eq!((r.rcode, r.soa_zone), (Rcode::NoError, Some(0)));
    assert!(matches!(r.answer, Answer::None));
    // Apex SOA and NS; another type at the apex is NODATA.
    let r = t.resolve(&wire("example.com"), 6, c, &mut rng);
    assert!(matches!(r.answer, Answer::Soa));
    let r = t.resolve(&wire("example.com"), 2, c, &mut rng);
    assert!(matches!(r.answer, Answer::Ns));
    let r = t.resolve(&wire("example.com"), 1, c, &mut rng);
    assert!(matches!(r.answer, Answer::None) && r.soa_zone.is_some());
    // A TXT at a steered name: NODATA, not tailored.
    let r = t.resolve(&wire("www.example.com"), 16, c, &mut rng);
    assert!(matches!(r.answer, Answer::None));
    assert_eq!(r.scope, 0);
}

#[test]
fn bad_configs_are_refused_with_reasons() {
    let mut c = fixture();
    c.groups[0].prefixes.push("10.1.0.1/16".into());
    c.groups[1].prefixes.push("10.1.0.0/16".into());
    c.edges[0].addresses.push("banana".into());
    c.routing.push(row("www", "nope", &[("ams1", 1.0)], 0.0));
    c.services[0].default_group = "missing".into();
    let e = Tables::build(1, &c, None).expect_err("bad config");
    for needle in [
        "10.1.0.1/16\" has host bits set",
        "prefix 10.1.0.0/16 is in groups",
        "\"banana\" is not an IP address",
        "route www/nope names an unknown group",
        "unknown default group \"missing\"",
    ] {
        assert!(e.contains(needle), "{needle:?} not in {e}");
    }
    // Everything drained: fail open rather than answer nothing.
    let mut c = fixture();
    for r in &mut c.routing {
        r.weights.clear();
        r.unserved = 1.0;
    }
    let t = Tables::build(1, &c, None).expect("builds");
    assert!(!steered_edges(&t, "www.example.com", 1, "10.1.0.1")
        .0
        .is_empty());
    assert!(
        t.warnings.iter().any(|w| w.contains("failing open")),
        "{:?}",
        t.warnings
    );
}

/// A query; `ecs` = (family, address bytes, source length).
fn query(id: u16, name: &str, qtype: u16, ecs: Option<(u8, &[u8], u8)>, edns: bool) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[
        0x01,
        0x00,
        0,
        1,
        0,
        0,
        0,
        0,
        0,
        u8::from(edns || ecs.is_some()),
    ]);
    for l in name.split('.').filter(|l| !l.is_empty()) {
        m.push(l.len() as u8);
        m.extend_from_slice(l.as_bytes());
    }
    m.push(0);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&[0, 1]);
    if edns || ecs.is_some() {
        let opt: Vec<u8> = match ecs {
            Some((family, addr, source)) => {
                let mut o = vec![0, 8];
                o.extend_from_slice(&((4 + addr.len()) as u16).to_be_bytes());
                o.extend_from_slice(&[0, family, source, 0]);
                o.extend_from_slice(addr);
                o
            }
            None => vec![],
        };
        m.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0]);
        m.extend_from_slice(&(opt.len() as u16).to_be_bytes());
        m.extend(opt);
    }
    m
}

fn src() -> SocketAddr {
    "127.0.0.1:5353".parse().expect("addr")
}

fn fast(t: &Tables, q: &[u8], seed: u64) -> Option<Vec<u8>> {
    let mut cx = Scratch {
        rng: fastrand::Rng::with_seed(seed),
        ..Scratch::default()
    };
    let mut tally = Tally::new("udp");
    udp::answer(q, src(), Some(t), &mut cx, &mut tally).then(|| cx.out.clone())
}

fn general(t: &Tables, q: &[u8], seed: u64) -> Vec<u8> {
    let req = Request::from_bytes(q.to_vec(), src(), Protocol::Udp).expect("decodes");
    let mut rng = fastrand::Rng::with_seed(seed);
    let plan = general::plan(Some(t), &req, q, src().ip(), &mut rng);
    let mut out = Vec::new();
    general::encode_udp(&req, &plan, &mut out);
    out
}

fn same(a: &[u8], b: &[u8]) {
    let (a, b) = (
        Message::from_vec(a).expect("fast response decodes"),
        Message::from_vec(b).expect("general response decodes"),
    );
    assert_eq!(a.metadata, b.metadata, "header");
    assert_eq!(a.queries, b.queries, "question");
    assert_eq!(a.answers, b.answers, "answers");
    assert_eq!(a.authorities, b.authorities, "authority");
    let ecs = |m: &Message| {
        m.edns
            .as_ref()
            .map(|e| (e.max_payload(), e.option(EdnsCode::Subnet).cloned()))
    };
    assert_eq!(ecs(&a), ecs(&b), "edns");
}

#[test]
fn the_fast_path_answers_like_the_general_path() {
    let t = tables();
    let cases: Vec<Vec<u8>> = vec![
        query(1, "www.example.com", 1, None, false),
        query(2, "WwW.Example.COM", 1, Some((1, &[10, 1, 2], 24)), false),
        query(
            3,
            "www.example.com",
            28,
            Some((2, &[0x20, 0x01, 0x0d, 0xb8, 0, 1, 0], 56)),
            false,
        ),
        query(4, "www.example.com", 28, Some((1, &[10, 5], 16)), false),
        query(5, "www.example.com", 1, Some((1, &[10, 7, 0], 24)), false),
        query(6, "www.example.com", 1, Some((1, &[], 0)), false),
        query(7, "api.v1.example.com", 1, Some((1, &[10, 1], 16)), true),
        query(8, "api.v1.example.com", 1, None, true),
        query(9, "nope.example.com", 1, Some((1, &[10, 1, 2], 24)), false),
        query(10, "www.example.org", 1, None, true),
        query(11, "v1.example.com", 28, None, false),
        query(12, "example.com", 1, None, true),
        query(13, "www.example.com", 1, Some((1, &[10, 2, 0], 24)), false),
    ];
    for (i, q) in cases.iter().enumerate() {
        for seed in 0..4 {
            let f = fast(&t, q, seed).expect("answered");
            let g = general(&t, q, seed);
            same(&f, &g);
            let m = Message::from_vec(&f).expect("decodes");
            if i == 1 {
                let Some(EdnsOption::Subnet(s)) =
                    m.edns.as_ref().and_then(|e| e.option(EdnsCode::Subnet))
                else {
                    panic!("no ECS echoed: {m:?}");
                };
                assert_eq!((s.source_prefix(), s.scope_prefix()), (24, 16));
                assert!(m.metadata.authoritative);
                assert!(
                    matches!(m.answers[0].data, RData::A(ref a) if a.0.octets() == [127, 10, 1, 1])
                );
            }
            if i == 4 {
                assert_eq!(m.answers[0].record_type(), RecordType::CNAME);
            }
            if i == 8 {
                assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
                assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
            }
        }
    }
}

#[test]
fn malformed_packets_get_formerr_or_nothing() {
    let t = tables();
    let good = query(9, "www.example.com", 1, Some((1, &[10, 1, 2], 24)), false);
    // Every truncation.
    for cut in 0..good.len() {
        if let Some(r) = fast(&t, &good[..cut], 1) {
            let m = Message::from_vec(&r).expect("decodes");
            assert_eq!(m.metadata.response_code, ResponseCode::FormErr, "cut {cut}");
        }
    }
    // Wrong counts.
    for (k, v) in [(4usize, 2u8), (5, 0), (7, 3), (9, 1), (11, 2)] {
        let mut q = good.clone();
        q[k] = v;
        if let Some(r) = fast(&t, &q, 1) {
            let m = Message::from_vec(&r).expect("decodes");
            assert_eq!(
                m.metadata.response_code,
                ResponseCode::FormErr,
                "count {k}={v}: {m:?}"
            );
        }
    }
    // Garbage EDNS: option lengths beyond the record, bad ECS.
    let mut q = good.clone();
    let n = q.len();
    q[n - 9] = 0xff;
    assert_formerr(&t, &q);
    let q = query(
        9,
        "www.example.com",
        1,
        Some((1, &[10, 1, 2, 3], 24)),
        false,
    );
    assert_formerr(&t, &q);
    // A response is never answered.
    let mut q = good.clone();
    q[2] |= 0x80;
    assert!(fast(&t, &q, 1).is_none());
    // Random bytes never panic.
    let mut rng = fastrand::Rng::with_seed(99);
    for _ in 0..20_000 {
        let mut q = good.clone();
        for _ in 0..rng.usize(1..4) {
            let i = rng.usize(..q.len());
            q[i] = rng.u8(..);
        }
        q.truncate(rng.usize(0..=q.len()));
        let _ = fast(&t, &q, 1);
    }
}

fn assert_formerr(t: &Tables, q: &[u8]) {
    let r = fast(t, q, 1).expect("an answer");
    let m = Message::from_vec(&r).expect("decodes");
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr, "{m:?}");
}

#[test]
fn big_answers_are_truncated_over_udp() {
    let mut c = fixture();
    let addrs: Vec<String> = (0..60).map(|i| format!("127.10.9.{i}")).collect();
    c.edges[2].addresses = addrs;
    let t = Tables::build(1, &c, None).expect("builds");
    let q = query(1, "www.example.com", 1, None, false);
    let r = fast(&t, &q, 1).expect("answer");
    let m = Message::from_vec(&r).expect("decodes");
    assert!(m.metadata.truncation && m.answers.is_empty(), "{m:?}");
    assert!(r.len() <= 512);
    // With a large EDNS buffer it fits.
    let q = query(1, "www.example.com", 1, None, true);
    let m = Message::from_vec(&fast(&t, &q, 1).expect("answer")).expect("decodes");
    assert!(!m.metadata.truncation && m.answers.len() == 60);
    let g = Message::from_vec(&general(
        &t,
        &query(1, "www.example.com", 1, None, false),
        1,
    ))
    .expect("decodes");
    assert!(g.metadata.truncation && g.answers.is_empty());
}

#[test]
fn country_and_asn_groups_resolve_through_the_geo_map() {
    let mut c = fixture();
    c.groups[1].countries = vec!["DE".into()];
    c.groups[4].asns = vec![64501];
    let geo = super::geo::GeoMap::parse(
        "192.0.2.0/24,DE,\n198.51.100.0/24,NL,64501\n10.1.0.0/16,DE,\n2001:db8:99::/48,DE,\n",
    )
    .expect("geo map");
    let t = Tables::build(1, &c, Some(&geo)).expect("builds");
    // A country group (de → fra1) and an ASN group (nl → ams1).
    assert_eq!(
        steered_edges(&t, "www.example.com", 1, "192.0.2.7"),
        (vec!["fra1".into()], 24)
    );
    assert_eq!(
        steered_edges(&t, "www.example.com", 1, "198.51.100.1").0,
        ["ams1"]
    );
    // An explicit group prefix wins over the same map prefix.
    assert_eq!(
        steered_edges(&t, "www.example.com", 1, "10.1.0.1").0,
        ["ams1"]
    );
    let (slot, _) = t.classify(ip("2001:db8:99::1"));
    assert_eq!(t.group_id(slot), "de");
}

#[test]
fn asn_groups_resolve_through_the_pushed_rib_prefixes() {
    let mut c = fixture();
    c.groups[1].countries = vec!["DE".into()];
    c.groups[4].asns = vec![64501];
    c.groups[1].asns = vec![64502];
    c.asn_prefixes = vec![
        pb::AsnPrefixes {
            asn: 64501,
            part: 0,
            v4: vec![198, 51, 100, 0, 24, 203, 0, 113, 0, 24].into(),
            v6: Default::default(),
        },
        pb::AsnPrefixes {
            asn: 64502,
            part: 0,
            // Explicit group prefixes win over RIB prefixes.
            v4: vec![10, 1, 0, 0, 16].into(),
            v6: [
                0x20, 0x01, 0x0d, 0xb8, 0, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 48,
            ]
            .to_vec()
            .into(),
        },
        // An ASN no group names is ignored.
        pb::AsnPrefixes {
            asn: 1,
            part: 0,
            v4: vec![192, 0, 2, 0, 24].into(),
            v6: Default::default(),
        },
    ];
    // The RIB wins over the geo map for the same prefix.
    let geo = super::geo::GeoMap::parse("198.51.100.0/24,DE,\n").expect("geo map");
    let t = Tables::build(1, &c, Some(&geo)).expect("builds");
    assert_eq!(
        steered_edges(&t, "www.example.com", 1, "198.51.100.1"),
        (vec!["ams1".into()], 24)
    );
    assert_eq!(
        steered_edges(&t, "www.example.com", 1, "203.0.113.9").0,
        ["ams1"]
    );
    assert_eq!(
        steered_edges(&t, "www.example.com", 1, "10.1.0.1").0,
        ["ams1"]
    );
    let (slot, _) = t.classify(ip("2001:db8:77::1"));
    assert_eq!(t.group_id(slot), "de");
    let (slot, _) = t.classify(ip("192.0.2.1"));
    assert_ne!(t.group_id(slot), "de");

    // Bytes that are not whole prefixes are refused, naming the ASN.
    c.asn_prefixes[0].v4 = vec![198, 51, 100, 0].into();
    let err = Tables::build(2, &c, None).expect_err("bad prefixes");
    assert!(err.contains("AS64501 part 0"), "{err}");
    c.asn_prefixes[0].v4 = vec![198, 51, 100, 0, 40].into();
    let err = Tables::build(3, &c, None).expect_err("bad length");
    assert!(err.contains("AS64501"), "{err}");
}
