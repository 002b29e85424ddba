//! Writes BMP messages, for tests, benches and fuzz seeds: a small BMP
//! client without a BGP speaker behind it.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;

use super::VERSION;

fn message(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(6 + body.len());
    out.push(VERSION);
    out.extend_from_slice(&((6 + body.len()) as u32).to_be_bytes());
    out.push(kind);
    out.extend_from_slice(body);
    out
}

/// Who a per-peer header names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// 0 global, 3 Loc-RIB.
    pub peer_type: u8,
    pub post_policy: bool,
    pub address: IpAddr,
    pub asn: u32,
    pub bgp_id: Ipv4Addr,
}

impl Peer {
    /// The router's own Loc-RIB (what gobgpd's `local-rib` policy sends).
    pub fn loc_rib(asn: u32, bgp_id: Ipv4Addr) -> Self {
        Self {
            peer_type: 3,
            post_policy: false,
            address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            asn,
            bgp_id,
        }
    }

    /// A BGP neighbour's pre-policy Adj-RIB-In.
    pub fn neighbour(address: IpAddr, asn: u32, bgp_id: Ipv4Addr) -> Self {
        Self {
            peer_type: 0,
            post_policy: false,
            address,
            asn,
            bgp_id,
        }
    }

    fn header(&self) -> Vec<u8> {
        let mut h = Vec::with_capacity(42);
        h.push(self.peer_type);
        let mut flags = 0u8;
        if self.peer_type != 3 {
            if self.address.is_ipv6() {
                flags |= 0x80;
            }
            if self.post_policy {
                flags |= 0x40;
            }
        }
        h.push(flags);
        h.extend_from_slice(&[0; 8]);
        match self.address {
            IpAddr::V4(a) => {
                h.extend_from_slice(&[0; 12]);
                h.extend_from_slice(&a.octets());
            }
            IpAddr::V6(a) => h.extend_from_slice(&a.octets()),
        }
        h.extend_from_slice(&self.asn.to_be_bytes());
        h.extend_from_slice(&self.bgp_id.octets());
        h.extend_from_slice(&[0; 8]);
        h
    }
}

fn tlv(t: u16, v: &[u8]) -> Vec<u8> {
    let mut out = t.to_be_bytes().to_vec();
    out.extend_from_slice(&(v.len() as u16).to_be_bytes());
    out.extend_from_slice(v);
    out
}

/// Initiation with a sysName and sysDescr.
pub fn initiation(sys_name: &str, sys_descr: &str) -> Vec<u8> {
    let mut body = tlv(1, sys_descr.as_bytes());
    body.extend(tlv(2, sys_name.as_bytes()));
    message(4, &body)
}

/// Termination with a reason code.
pub fn termination(code: u16) -> Vec<u8> {
    message(5, &tlv(1, &code.to_be_bytes()))
}

fn open(asn: u16, bgp_id: Ipv4Addr) -> Vec<u8> {
    let mut m = vec![0xff; 16];
    m.extend_from_slice(&29u16.to_be_bytes());
    m.push(1);
    m.push(4);
    m.extend_from_slice(&asn.to_be_bytes());
    m.extend_from_slice(&90u16.to_be_bytes());
    m.extend_from_slice(&bgp_id.octets());
    m.push(0);
    m
}

/// Peer Up, with the OPENs both sides sent.
pub fn peer_up(peer: &Peer, local: Ipv4Addr, local_bgp_id: Ipv4Addr) -> Vec<u8> {
    let mut body = peer.header();
    body.extend_from_slice(&[0; 12]);
    body.extend_from_slice(&local.octets());
    body.extend_from_slice(&179u16.to_be_bytes());
    body.extend_from_slice(&40000u16.to_be_bytes());
    body.extend(open(65000, local_bgp_id));
    body.extend(open(u16::try_from(peer.asn).unwrap_or(23456), peer.bgp_id));
    message(3, &body)
}

/// Peer Down with a reason code (1 to 6).
pub fn peer_down(peer: &Peer, code: u8) -> Vec<u8> {
    let mut body = peer.header();
    body.push(code);
    message(2, &body)
}

fn nlri(out: &mut Vec<u8>, p: &IpNet) {
    let bits = p.prefix_len();
    out.push(bits);
    let n = usize::from(bits).div_ceil(8);
    match p {
        IpNet::V4(p) => out.extend_from_slice(&p.network().octets()[..n]),
        IpNet::V6(p) => out.extend_from_slice(&p.network().octets()[..n]),
    }
}

/// Route Monitoring with an UPDATE: IPv4 routes in the classic fields,
/// IPv6 in MP_REACH_NLRI / MP_UNREACH_NLRI.
pub fn route_monitoring(peer: &Peer, announced: &[IpNet], withdrawn: &[IpNet]) -> Vec<u8> {
    let mut w4 = Vec::new();
    let mut w6 = Vec::new();
    for p in withdrawn {
        nlri(if p.addr().is_ipv4() { &mut w4 } else { &mut w6 }, p);
    }
    let mut a4 = Vec::new();
    let mut a6 = Vec::new();
    for p in announced {
        nlri(if p.addr().is_ipv4() { &mut a4 } else { &mut a6 }, p);
    }
    let mut attrs = Vec::new();
    if !announced.is_empty() {
        attrs.extend_from_slice(&[0x40, 1, 1, 0]); // ORIGIN IGP
        attrs.extend_from_slice(&[0x40, 2, 6, 2, 1]); // AS_PATH, one ASN
        attrs.extend_from_slice(&peer.asn.to_be_bytes());
        if !a4.is_empty() {
            attrs.extend_from_slice(&[0x40, 3, 4, 127, 0, 0, 1]); // NEXT_HOP
        }
    }
    if !a6.is_empty() {
        let mut v = vec![0, 2, 1, 16];
        v.extend_from_slice(&[0; 15]);
        v.push(1);
        v.push(0);
        v.extend(a6);
        attrs.extend_from_slice(&[0x90, 14]);
        attrs.extend_from_slice(&(v.len() as u16).to_be_bytes());
        attrs.extend(v);
    }
    if !w6.is_empty() {
        let mut v = vec![0, 2, 1];
        v.extend(w6);
        attrs.extend_from_slice(&[0x90, 15]);
        attrs.extend_from_slice(&(v.len() as u16).to_be_bytes());
        attrs.extend(v);
    }
    let mut update = vec![0xff; 16];
    let len = 19 + 2 + w4.len() + 2 + attrs.len() + a4.len();
    update.extend_from_slice(&(len as u16).to_be_bytes());
    update.push(2);
    update.extend_from_slice(&(w4.len() as u16).to_be_bytes());
    update.extend(w4);
    update.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    update.extend(attrs);
    update.extend(a4);
    let mut body = peer.header();
    body.extend(update);
    message(0, &body)
}

/// An IPv4 End-of-RIB (an empty UPDATE).
pub fn end_of_rib(peer: &Peer) -> Vec<u8> {
    route_monitoring(peer, &[], &[])
}
