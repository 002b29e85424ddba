use super::write::{self, Peer};
use super::*;
use proptest::prelude::*;

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn net(s: &str) -> IpNet {
    s.parse().expect("prefix")
}

/// What gobgpd 3.10 sent with `route-monitoring-policy = "all"` and no
/// neighbours: Initiation, then Loc-RIB Route Monitoring for
/// `gobgp global rib add 203.0.113.0/24`, `add -a ipv6 2001:db8::/32`,
/// and the two `del`s.
const GOBGPD: [&str; 5] = [
    "03000000160400020002723100010006332e31302e30",
    "03000000560003000000000000000000000000000000000000000000000000000000fde9c00002016b13461100000000ffffffffffffffffffffffffffffffff0026020000000b400101024003040000000018cb0071",
    "03000000680003000000000000000000000000000000000000000000000000000000fde9c00002016b13461100000000ffffffffffffffffffffffffffffffff0038020000002140010102800e1a0002011000000000000000000000000000000000002020010db8",
    "030000004b0003000000000000000000000000000000000000000000000000000000fde9c00002016b13461100000000ffffffffffffffffffffffffffffffff001b02000418cb00710000",
    "03000000520003000000000000000000000000000000000000000000000000000000fde9c00002016b13461100000000ffffffffffffffffffffffffffffffff0022020000000b800f080002012020010db8",
];

fn gobgpd_stream() -> Vec<u8> {
    GOBGPD.iter().flat_map(|h| hex(h)).collect()
}

#[test]
fn gobgpd_messages_decode() {
    let msgs = decode_stream(&gobgpd_stream()).expect("decodes");
    assert_eq!(msgs.len(), 5);
    assert_eq!(
        msgs[0],
        Message::Initiation {
            sys_name: Some("r1".into()),
            sys_descr: Some("3.10.0".into())
        }
    );
    let Message::RouteMonitoring { peer, update } = &msgs[1] else {
        panic!("{:?}", msgs[1]);
    };
    assert_eq!(peer.peer_type, PeerType::LocRib);
    assert_eq!(peer.asn, 65001);
    assert_eq!(peer.bgp_id, Ipv4Addr::new(192, 0, 2, 1));
    assert_eq!(update.announced, vec![net("203.0.113.0/24")]);
    let Message::RouteMonitoring { update, .. } = &msgs[2] else {
        panic!()
    };
    assert_eq!(update.announced, vec![net("2001:db8::/32")]);
    let Message::RouteMonitoring { update, .. } = &msgs[3] else {
        panic!()
    };
    assert_eq!(update.withdrawn, vec![net("203.0.113.0/24")]);
    assert!(!update.end_of_rib);
    let Message::RouteMonitoring { update, .. } = &msgs[4] else {
        panic!()
    };
    assert_eq!(update.withdrawn, vec![net("2001:db8::/32")]);
}

#[test]
fn the_writer_and_the_decoder_agree() {
    let peer = Peer::neighbour(
        "2001:db8::2".parse().expect("ip"),
        65002,
        Ipv4Addr::new(10, 0, 0, 2),
    );
    let local = Ipv4Addr::new(127, 0, 0, 1);
    let mut s = write::initiation("edge-r1", "test");
    s.extend(write::peer_up(&peer, local, Ipv4Addr::new(192, 0, 2, 9)));
    let a = [
        net("203.0.113.0/24"),
        net("2001:db8:1::/48"),
        net("0.0.0.0/0"),
    ];
    s.extend(write::route_monitoring(
        &peer,
        &a,
        &[net("198.51.100.0/24")],
    ));
    s.extend(write::end_of_rib(&peer));
    s.extend(write::peer_down(&peer, 4));
    s.extend(write::termination(0));
    let msgs = decode_stream(&s).expect("decodes");
    let kinds: Vec<_> = msgs.iter().map(Message::kind).collect();
    assert_eq!(
        kinds,
        [
            "initiation",
            "peer_up",
            "route_monitoring",
            "route_monitoring",
            "peer_down",
            "termination"
        ]
    );
    let Message::PeerUp {
        peer: h,
        local_bgp_id,
        ..
    } = &msgs[1]
    else {
        panic!()
    };
    assert_eq!(h.address, "2001:db8::2".parse::<IpAddr>().expect("ip"));
    assert_eq!(*local_bgp_id, Some(Ipv4Addr::new(192, 0, 2, 9)));
    let Message::RouteMonitoring { update, .. } = &msgs[2] else {
        panic!()
    };
    let mut got = update.announced.clone();
    got.sort();
    let mut want = a.to_vec();
    want.sort();
    assert_eq!(got, want);
    assert_eq!(update.withdrawn, vec![net("198.51.100.0/24")]);
    let Message::RouteMonitoring { update, .. } = &msgs[3] else {
        panic!()
    };
    assert!(update.end_of_rib);
    let Message::PeerDown { reason, .. } = &msgs[4] else {
        panic!()
    };
    assert!(reason.contains("peer closed"), "{reason}");
    let Message::Termination { reason } = &msgs[5] else {
        panic!()
    };
    assert_eq!(reason, "session administratively closed");
}

#[test]
fn bad_headers_are_refused_with_the_offset() {
    let good = gobgpd_stream();
    let first = GOBGPD[0].len() / 2;
    // A wrong version in the second message.
    let mut s = good.clone();
    s[first] = 1;
    let e = decode_stream(&s).expect_err("version");
    assert_eq!(
        e,
        BmpError::Version {
            offset: first as u64,
            version: 1
        }
    );
    assert!(
        e.to_string()
            .starts_with(&format!("byte {first}: BMP version 1")),
        "{e}"
    );
    // Lengths below the header and above the limit.
    for (len, short) in [(5u32, true), (0, true), (u32::MAX, false), (2 << 20, false)] {
        let mut s = good.clone();
        s[first + 1..first + 5].copy_from_slice(&len.to_be_bytes());
        let e = decode_stream(&s).expect_err("length");
        assert_eq!(e.offset(), first as u64 + 1, "{e}");
        assert_eq!(matches!(e, BmpError::TooShort { .. }), short, "{e}");
    }
    // Garbage.
    let e = decode_stream(b"GET / HTTP/1.1\r\n\r\n").expect_err("http");
    assert!(e.to_string().contains("is this a BMP stream"), "{e}");
}

#[test]
fn bad_bodies_are_refused_naming_what_and_where() {
    let peer = Peer::loc_rib(65001, Ipv4Addr::new(192, 0, 2, 1));
    let m = write::route_monitoring(&peer, &[net("203.0.113.0/24")], &[]);
    // The BGP marker starts after the common and per-peer headers.
    let marker = 6 + 42;
    let mut bad = m.clone();
    bad[marker + 3] = 0;
    let e = decode(&bad, 1000).expect_err("marker");
    assert_eq!(e.offset(), 1000 + marker as u64);
    assert!(e.to_string().contains("marker"), "{e}");
    // A prefix length of /33 in the NLRI (the last 4 bytes: 24, 203, 0, 113).
    let mut bad = m.clone();
    let at = bad.len() - 4;
    bad[at] = 33;
    let e = decode(&bad, 0).expect_err("/33");
    assert_eq!(e.offset(), at as u64);
    assert!(e.to_string().contains("/33"), "{e}");
    // A BGP length that disagrees with the BMP length.
    let mut bad = m.clone();
    bad[marker + 17] += 1;
    let e = decode(&bad, 0).expect_err("bgp length");
    assert_eq!(e.offset(), (marker + 16) as u64);
    // Route Monitoring carrying a KEEPALIVE.
    let mut bad = m;
    bad[marker + 18] = 4;
    let e = decode(&bad, 0).expect_err("type");
    assert!(e.to_string().contains("UPDATE"), "{e}");
}

#[test]
fn a_stream_cut_anywhere_is_refused_with_the_offset_of_the_cut_message() {
    let s = gobgpd_stream();
    let starts: Vec<usize> = GOBGPD
        .iter()
        .scan(0, |at, h| {
            let here = *at;
            *at += h.len() / 2;
            Some(here)
        })
        .collect();
    for cut in 1..s.len() {
        let r = decode_stream(&s[..cut]);
        if starts.contains(&cut) {
            assert!(r.is_ok(), "cut at a message boundary {cut}: {r:?}");
            continue;
        }
        let e = r.expect_err("truncated");
        let msg_start = starts
            .iter()
            .rev()
            .find(|&&st| st < cut)
            .copied()
            .unwrap_or(0);
        assert_eq!(e.offset(), msg_start as u64, "cut at {cut}: {e}");
        assert!(e.to_string().contains("truncated"), "{e}");
    }
}

#[test]
fn the_framer_takes_bytes_one_at_a_time() {
    let s = gobgpd_stream();
    let mut f = Framer::new();
    let mut got = vec![];
    for b in &s {
        f.push(std::slice::from_ref(b));
        while let Some((at, m)) = f.next_message().expect("frames") {
            got.push(decode(&m, at).expect("decodes"));
        }
    }
    assert!(f.finish().is_ok());
    assert_eq!(got, decode_stream(&s).expect("decodes"));
    // A wrong version is refused at its first byte.
    let mut f = Framer::new();
    f.push(&[1]);
    assert!(matches!(
        f.next_message(),
        Err(BmpError::Version { offset: 0, .. })
    ));
}

fn watched() -> BTreeSet<IpNet> {
    [net("203.0.113.0/24"), net("2001:db8::/32")].into()
}

#[test]
fn a_session_tracks_watched_prefixes_per_peer() {
    let w = watched();
    let mut s = Session::default();
    for (i, m) in decode_stream(&gobgpd_stream())
        .expect("ok")
        .iter()
        .enumerate()
    {
        let changed = s.apply(m, i as i64, &w);
        assert_eq!(changed, i > 0, "message {i}");
        if i == 2 {
            assert!(s.announces(&net("203.0.113.0/24")) && s.announces(&net("2001:db8::/32")));
        }
    }
    assert_eq!(s.sys_name.as_deref(), Some("r1"));
    assert_eq!(s.bgp_id, Some(Ipv4Addr::new(192, 0, 2, 1)));
    assert!(s.synced);
    let last = &s.last[&net("203.0.113.0/24")];
    assert_eq!(
        (last.announced, last.at_ms, last.why.as_str()),
        (false, 3, "withdrawn")
    );
    assert_eq!(last.by, "Loc-RIB (AS65001)");
    assert_eq!(s.counts.by_kind["route_monitoring"], 4);

    // Two peers announce; one withdraws: still announced. Peer down of the
    // other: lost, and the reason says so. Unwatched prefixes are not kept.
    let mut s = Session::default();
    let p1 = Peer::neighbour(
        "127.0.0.2".parse().expect("ip"),
        65002,
        Ipv4Addr::new(10, 0, 0, 2),
    );
    let p2 = Peer::neighbour(
        "127.0.0.3".parse().expect("ip"),
        65003,
        Ipv4Addr::new(10, 0, 0, 3),
    );
    let p = net("203.0.113.0/24");
    let msgs: Vec<Message> = [
        write::route_monitoring(&p1, &[p, net("10.0.0.0/8")], &[]),
        write::route_monitoring(&p2, &[p], &[]),
        write::route_monitoring(&p1, &[], &[p]),
    ]
    .iter()
    .map(|m| decode(m, 0).expect("ok"))
    .collect();
    assert!(s.apply(&msgs[0], 1, &w));
    assert!(!s.apply(&msgs[1], 2, &w));
    assert!(!s.apply(&msgs[2], 3, &w));
    assert!(s.announces(&p));
    assert!(!s.announces(&net("10.0.0.0/8")));
    let down = decode(&write::peer_down(&p2, 3), 0).expect("ok");
    assert!(s.apply(&down, 4, &w));
    assert!(!s.announces(&p));
    let last = &s.last[&p];
    assert_eq!(last.by, "peer 127.0.0.3 AS65003 (pre-policy)");
    assert!(
        last.why.starts_with("peer down: the peer closed"),
        "{}",
        last.why
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = decode_stream(&data);
        let _ = decode(&data, 0);
    }

    #[test]
    fn arbitrary_bodies_behind_a_good_header_never_panic(
        kind in 0u8..8,
        body in proptest::collection::vec(any::<u8>(), 0..400),
    ) {
        let mut m = vec![3];
        m.extend_from_slice(&((6 + body.len()) as u32).to_be_bytes());
        m.push(kind);
        m.extend_from_slice(&body);
        if let Ok(msg) = decode(&m, 0) {
            let mut s = Session::default();
            s.apply(&msg, 0, &watched());
        }
    }

    #[test]
    fn mutated_real_messages_never_panic(i in 0usize..5, at in 0usize..104, b in any::<u8>()) {
        let mut m = hex(GOBGPD[i]);
        let at = at % m.len();
        m[at] = b;
        let _ = decode(&m, 0);
    }

    #[test]
    fn written_routes_read_back(
        v4 in proptest::collection::vec((any::<u32>(), 0u8..=32), 0..20),
        v6 in proptest::collection::vec((any::<u128>(), 0u8..=128), 0..20),
    ) {
        let mut a: Vec<IpNet> = v4.iter().map(|&(x, l)| IpNet::V4(Ipv4Net::new(Ipv4Addr::from(x), l).expect("len").trunc()))
            .chain(v6.iter().map(|&(x, l)| IpNet::V6(Ipv6Net::new(Ipv6Addr::from(x), l).expect("len").trunc())))
            .collect();
        let peer = Peer::loc_rib(65001, Ipv4Addr::new(192, 0, 2, 1));
        let m = write::route_monitoring(&peer, &a, &a);
        let Message::RouteMonitoring { update, .. } = decode(&m, 0).expect("decodes") else {
            panic!("not route monitoring")
        };
        let (mut got_a, mut got_w) = (update.announced, update.withdrawn);
        a.sort();
        got_a.sort();
        got_w.sort();
        prop_assert_eq!(&got_a, &a);
        prop_assert_eq!(&got_w, &a);
    }
}
