use super::*;
use bgpkit_parser::encoder::MrtRibEncoder;
use bgpkit_parser::models::{AsPath, Asn, BgpElem, NetworkPrefix};
use proptest::prelude::*;

fn elem(prefix: &str, peer: &str, path: &[u32]) -> BgpElem {
    BgpElem {
        timestamp: 1_700_000_000.0,
        peer_ip: peer.parse().expect("peer"),
        peer_asn: Asn::new_32bit(path.first().copied().unwrap_or(64999)),
        prefix: NetworkPrefix::new(prefix.parse().expect("prefix"), None),
        next_hop: Some(peer.parse().expect("peer")),
        as_path: Some(AsPath::from_sequence(path)),
        ..Default::default()
    }
}

fn dump(elems: &[BgpElem]) -> Bytes {
    let mut enc = MrtRibEncoder::new();
    for e in elems {
        enc.process_elem(e).expect("encodable");
    }
    enc.export_bytes().expect("encodes")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

fn sample() -> Bytes {
    dump(&[
        elem("10.1.0.0/16", "192.0.2.1", &[65000, 64500]),
        elem("10.1.2.0/24", "192.0.2.1", &[65000, 64501]),
        elem("10.9.0.0/16", "192.0.2.1", &[65000, 64502, 64502]),
        elem("2001:db8::/32", "192.0.2.1", &[65000, 64500]),
        elem("2001:db8:1::/48", "192.0.2.1", &[65000, 64503]),
    ])
}

#[test]
fn reads_origins_and_looks_up_the_longest_prefix() {
    let (map, stats) = decode_mrt(sample()).expect("a good dump");
    assert_eq!((map.v4_len(), map.v6_len(), map.origins()), (3, 2, 4));
    assert_eq!(stats.entries, 5);
    assert_eq!(stats.skipped, 0);
    let at = |a: &str| map.lookup(ip(a)).map(|r| (r.prefix.to_string(), r.origin));
    assert_eq!(at("10.1.2.3"), Some(("10.1.2.0/24".into(), 64501)));
    assert_eq!(at("10.1.3.3"), Some(("10.1.0.0/16".into(), 64500)));
    assert_eq!(at("10.9.255.1"), Some(("10.9.0.0/16".into(), 64502)));
    assert_eq!(at("10.2.0.1"), None);
    assert_eq!(at("2001:db8:1::5"), Some(("2001:db8:1::/48".into(), 64503)));
    assert_eq!(at("2001:db8:2::5"), Some(("2001:db8::/32".into(), 64500)));
    assert_eq!(at("2001:db9::1"), None);
}

#[test]
fn packs_the_prefixes_of_an_asn() {
    let (map, _) = decode_mrt(sample()).expect("a good dump");
    let p = map.packed(64500);
    assert_eq!(p.v4.as_ref(), &[10, 1, 0, 0, 16]);
    assert_eq!(p.v6.len(), 17);
    assert_eq!(p.v6[16], 32);
    assert_eq!(map.count_of(64500), 2);
    assert_eq!(map.count_of(1), 0);
    assert!(map.packed(1).is_empty());
}

#[test]
fn peers_that_disagree_pick_the_most_seen_origin() {
    let (map, stats) = decode_mrt(dump(&[
        elem("10.5.0.0/16", "192.0.2.1", &[65000, 64510]),
        elem("10.5.0.0/16", "192.0.2.2", &[65001, 64511]),
        elem("10.5.0.0/16", "192.0.2.3", &[65002, 64511]),
        elem("10.6.0.0/16", "192.0.2.1", &[65000, 64520]),
        elem("10.6.0.0/16", "192.0.2.2", &[65001, 64519]),
    ]))
    .expect("a good dump");
    assert_eq!(stats.multi_origin, 2);
    assert_eq!(map.lookup(ip("10.5.1.1")).map(|r| r.origin), Some(64511));
    // A tie goes to the lowest ASN.
    assert_eq!(map.lookup(ip("10.6.1.1")).map(|r| r.origin), Some(64519));
}

#[test]
fn routes_without_an_origin_are_skipped() {
    let mut no_path = elem("10.7.0.0/16", "192.0.2.1", &[]);
    no_path.as_path = Some(AsPath::new());
    let (map, stats) = decode_mrt(dump(&[
        no_path,
        elem("10.8.0.0/16", "192.0.2.1", &[65000, 64530]),
    ]))
    .expect("a good dump");
    assert_eq!(stats.skipped, 1);
    assert_eq!(map.len(), 1);
}

#[test]
fn a_truncated_dump_names_the_offset_of_the_record() {
    let good = sample();
    // Cut inside the last record.
    let cut = good.slice(..good.len() - 3);
    let err = decode_mrt(cut.clone()).expect_err("truncated");
    match &err {
        MrtError::TruncatedRecord {
            offset,
            declared,
            available,
            ..
        } => {
            assert!(*offset > 0 && *offset < cut.len());
            assert_eq!(declared - available, 3);
        }
        other => panic!("wrong error: {other}"),
    }
    assert!(err.to_string().starts_with("byte "), "{err}");
    // Cut inside a header.
    let mut first_len = [0u8; 4];
    first_len.copy_from_slice(&good[8..12]);
    let second = 12 + u32::from_be_bytes(first_len) as usize;
    let err = decode_mrt(good.slice(..second + 5)).expect_err("truncated header");
    assert_eq!(
        err,
        MrtError::TruncatedHeader {
            offset: second,
            available: 5
        }
    );
}

#[test]
fn a_corrupt_record_is_refused_with_its_offset() {
    let good = sample();
    let mut bad = good.to_vec();
    // The second record (the first RIB entry): set its prefix length to 200.
    let first = 12 + u32::from_be_bytes([bad[8], bad[9], bad[10], bad[11]]) as usize;
    bad[first + 12 + 4] = 200;
    let err = decode_mrt(Bytes::from(bad)).expect_err("corrupt");
    match err {
        MrtError::Record { offset, kind, .. } => {
            assert_eq!(offset, first);
            assert_eq!(kind, 13);
        }
        other => panic!("wrong error: {other}"),
    }
}

#[test]
fn garbage_and_empty_input_are_refused() {
    assert_eq!(
        decode_mrt(Bytes::new()).expect_err("empty"),
        MrtError::NoRib { records: 0 }
    );
    let err =
        decode_mrt(Bytes::from_static(b"this is not an MRT dump at all, no")).expect_err("text");
    assert!(
        matches!(
            err,
            MrtError::TooLarge { offset: 0, .. } | MrtError::TruncatedRecord { offset: 0, .. }
        ),
        "{err}"
    );
}

#[test]
fn the_binary_form_round_trips_and_checks_itself() {
    let (map, _) = decode_mrt(sample()).expect("a good dump");
    let bytes = map.encode();
    let back = RibMap::decode(&bytes).expect("decodes");
    assert_eq!(
        back.routes().collect::<Vec<_>>(),
        map.routes().collect::<Vec<_>>()
    );
    assert_eq!(back.digest(), map.digest());
    assert!(RibMap::decode(&bytes[..bytes.len() - 1]).is_err());
    assert!(RibMap::decode(b"SXRIBv2\nxxxxxxxxxxxxxxxx").is_err());
    let mut long = bytes.clone();
    long[24 + 4] = 33;
    assert_eq!(RibMap::decode(&long).expect_err("bad length").offset, 28);
    let other = RibMap::from_routes([Route {
        prefix: "10.0.0.0/8".parse().expect("net"),
        origin: 1,
    }])
    .expect("builds");
    assert_ne!(other.digest(), map.digest());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_mrt(Bytes::from(data));
    }

    #[test]
    fn mutated_dumps_never_panic(at in 0usize..200, value in any::<u8>(), cut in 0usize..40) {
        let mut d = sample().to_vec();
        let i = at % d.len();
        d[i] = value;
        d.truncate(d.len().saturating_sub(cut));
        let _ = decode_mrt(Bytes::from(d));
    }

    #[test]
    fn lookups_match_a_linear_scan(
        nets in proptest::collection::vec((any::<u32>(), 8u8..=32, 1u32..50), 1..60),
        probes in proptest::collection::vec(any::<u32>(), 1..40),
    ) {
        let routes: Vec<Route> = nets
            .iter()
            .map(|&(a, l, o)| Route {
                prefix: IpNet::V4(Ipv4Net::new(a.into(), l).expect("len").trunc()),
                origin: o,
            })
            .collect();
        let map = RibMap::from_routes(routes.clone()).expect("builds");
        for p in probes {
            let addr = IpAddr::V4(p.into());
            // First listing of a prefix wins, as in from_routes.
            let mut best: Option<Route> = None;
            for r in &routes {
                if r.prefix.contains(&addr)
                    && best.is_none_or(|b| r.prefix.prefix_len() > b.prefix.prefix_len())
                {
                    best = Some(*r);
                }
            }
            prop_assert_eq!(map.lookup(addr), best);
        }
    }
}

#[test]
fn a_synthetic_full_table_shape_decodes_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("synth.mrt");
    let spec = crate::synth::Spec {
        v4: 3000,
        v6: 400,
        peers: 3,
        origins: 50,
    };
    let (v4, size) = crate::synth::write(&path, &spec).expect("written");
    let data = std::fs::read(&path).expect("read");
    assert_eq!(data.len() as u64, size);
    let (map, stats) = decode_mrt(data.into()).expect("decodes");
    assert_eq!((map.v4_len(), map.v6_len()), (3000, 400));
    assert_eq!(stats.entries, 3400 * 3);
    assert_eq!(stats.skipped, 0);
    assert!(map.origins() <= 50);
    for (a, l) in v4 {
        let hit = map
            .lookup(IpAddr::V4(a.into()))
            .expect("every prefix is in the map");
        assert!(hit.prefix.prefix_len() >= l);
    }
}
