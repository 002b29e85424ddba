//! MRT RIB dumps to a prefix → origin ASN map.
//!
//! [`decode_mrt`] reads a dump (RFC 6396 TABLE_DUMP_V2, as BIRD's `mrt`
//! protocol, RouteViews and RIPE RIS write them; legacy TABLE_DUMP too)
//! record by record: each record's common header is checked against the
//! bytes that follow before bgpkit-parser decodes its body, so a truncated
//! or corrupt dump is refused with the byte offset of the record at fault,
//! and nothing is half-loaded. The origin of a route is the last ASN of its
//! AS path; when the peers of a dump disagree (MOAS), the origin most of
//! them see wins (the lowest ASN on a tie), so a load is deterministic.
//!
//! A [`RibMap`] holds the result compactly (12 bytes per IPv4 prefix, 24 per
//! IPv6 prefix, plus a multibit trie for longest-prefix lookups) and says
//! which prefixes each ASN originates. It has a binary form of its own
//! ([`RibMap::encode`], [`RibMap::decode`]) for the store, and a digest to
//! compare two maps.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Mutex;

use bgpkit_parser::models::{TableDumpMessage, TableDumpV2Message, TableDumpV2Type};
use bgpkit_parser::parser::{parse_table_dump_messages, parse_table_dump_v2_message};
use bytes::Bytes;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use sextant_core::lpm::{Lpm, MAX_SLOT};

/// MRT type codes (RFC 6396 §4).
const TABLE_DUMP: u16 = 12;
const TABLE_DUMP_V2: u16 = 13;
/// The common header: timestamp, type, subtype, length.
const HEADER: usize = 12;
/// A record larger than this is not a RIB record (bgpkit refuses 16 MiB).
const MAX_RECORD: usize = 16 * 1024 * 1024;

/// Why a dump is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MrtError {
    #[error("byte {offset}: truncated MRT header ({available} of 12 bytes)")]
    TruncatedHeader { offset: usize, available: usize },
    #[error("byte {offset}: MRT record of type {kind}/{subtype} declares {declared} bytes but only {available} follow (truncated dump)")]
    TruncatedRecord {
        offset: usize,
        kind: u16,
        subtype: u16,
        declared: usize,
        available: usize,
    },
    #[error("byte {offset}: MRT record of type {kind}/{subtype} declares {declared} bytes, more than {MAX_RECORD}")]
    TooLarge {
        offset: usize,
        kind: u16,
        subtype: u16,
        declared: usize,
    },
    #[error("byte {offset}: MRT record of type {kind}/{subtype} cannot be read: {reason}")]
    Record {
        offset: usize,
        kind: u16,
        subtype: u16,
        reason: String,
    },
    #[error("the dump holds no RIB entries ({records} MRT records, none a TABLE_DUMP_V2 or TABLE_DUMP RIB entry); is it an updates file?")]
    NoRib { records: u64 },
    #[error("{count} distinct origin ASNs or prefixes, more than the {MAX_SLOT} a table holds")]
    TooMany { count: usize },
}

/// Counts of what a load read, for operators.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RibStats {
    /// MRT records read.
    pub records: u64,
    /// RIB entries read (one per prefix and peer).
    pub entries: u64,
    /// Prefixes left out: no entry with a single origin (empty AS path,
    /// AS_SET origin, or not unicast).
    pub skipped: u64,
    /// Prefixes whose peers disagree on the origin.
    pub multi_origin: u64,
    /// Records that are not RIB entries (peer tables, updates): ignored.
    pub other_records: u64,
}

/// A prefix and its origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub prefix: IpNet,
    pub origin: u32,
}

/// The prefix → origin ASN map of one RIB dump.
#[derive(Debug)]
pub struct RibMap {
    /// Sorted by (network, length), distinct.
    v4: Vec<(u32, u8, u32)>,
    v6: Vec<(u128, u8, u32)>,
    /// Slot i + 1 is entry i of `v4` / `v6`.
    lpm4: Lpm,
    lpm6: Lpm,
    /// Entry indices by origin: v4 entries as `i`, v6 entries as
    /// `v4.len() + i`; sorted by (origin, index).
    by_origin: Vec<(u32, u32)>,
    /// Packed prefixes per ASN, made on first use (see [`RibMap::packed`]).
    packed: Mutex<HashMap<u32, Packed>>,
}

/// The prefixes of one ASN, packed as the DNS config carries them: IPv4 as
/// 4 address bytes and the length, IPv6 as 16 and the length.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Packed {
    pub v4: Bytes,
    pub v6: Bytes,
}

impl Packed {
    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }
    pub fn len(&self) -> usize {
        self.v4.len() / 5 + self.v6.len() / 17
    }
}

/// Why stored bytes are not a map.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("stored RIB map is corrupt at byte {offset}: {reason}")]
pub struct CodecError {
    pub offset: usize,
    pub reason: &'static str,
}

const MAGIC: &[u8; 8] = b"SXRIBv1\n";

impl RibMap {
    /// A map of `routes` (a prefix listed twice keeps its first origin).
    pub fn from_routes(routes: impl IntoIterator<Item = Route>) -> Result<Self, MrtError> {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for r in routes {
            match r.prefix.trunc() {
                IpNet::V4(n) => v4.push((u32::from(n.network()), n.prefix_len(), r.origin)),
                IpNet::V6(n) => v6.push((u128::from(n.network()), n.prefix_len(), r.origin)),
            }
        }
        Self::build(v4, v6)
    }

    fn build(mut v4: Vec<(u32, u8, u32)>, mut v6: Vec<(u128, u8, u32)>) -> Result<Self, MrtError> {
        // Stable sort: of a prefix listed twice, the first stays.
        v4.sort_by_key(|e| (e.0, e.1));
        v4.dedup_by_key(|e| (e.0, e.1));
        v6.sort_by_key(|e| (e.0, e.1));
        v6.dedup_by_key(|e| (e.0, e.1));
        let count = v4.len().max(v6.len());
        if count > MAX_SLOT as usize {
            return Err(MrtError::TooMany { count });
        }
        let slots4: Vec<(u32, u8, u32)> = (0..)
            .zip(&v4)
            .map(|(i, &(a, l, _))| (a, l, i + 1))
            .collect();
        let slots6: Vec<(u128, u8, u32)> = (0..)
            .zip(&v6)
            .map(|(i, &(a, l, _))| (a, l, i + 1))
            .collect();
        let n4 = v4.len() as u32;
        let mut by_origin: Vec<(u32, u32)> = (0..)
            .zip(&v4)
            .map(|(i, e)| (e.2, i))
            .chain((0..).zip(&v6).map(|(i, e)| (e.2, n4 + i)))
            .collect();
        by_origin.sort_unstable();
        Ok(Self {
            lpm4: Lpm::v4(&slots4),
            lpm6: Lpm::v6(&slots6),
            v4,
            v6,
            by_origin,
            packed: Mutex::default(),
        })
    }

    /// IPv4 prefixes.
    pub fn v4_len(&self) -> usize {
        self.v4.len()
    }

    /// IPv6 prefixes.
    pub fn v6_len(&self) -> usize {
        self.v6.len()
    }

    /// Prefixes of both families.
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Distinct origin ASNs.
    pub fn origins(&self) -> usize {
        let mut n = 0;
        let mut last = None;
        for &(asn, _) in &self.by_origin {
            if last != Some(asn) {
                n += 1;
                last = Some(asn);
            }
        }
        n
    }

    /// Bytes held (entries, trie and index), for metrics and the bench.
    pub fn memory_bytes(&self) -> usize {
        self.v4.capacity() * 12
            + self.v6.capacity() * 24
            + self.by_origin.capacity() * 8
            + self.lpm4.memory_bytes()
            + self.lpm6.memory_bytes()
    }

    /// The longest prefix that covers `addr`, and its origin.
    pub fn lookup(&self, addr: IpAddr) -> Option<Route> {
        match addr {
            IpAddr::V4(a) => {
                let (slot, _) = self.lpm4.lookup_v4(u32::from(a));
                let &(net, len, origin) = self.v4.get((slot as usize).checked_sub(1)?)?;
                let prefix = Ipv4Net::new(net.into(), len).ok()?.into();
                Some(Route { prefix, origin })
            }
            IpAddr::V6(a) => {
                let (slot, _) = self.lpm6.lookup(u128::from(a));
                let &(net, len, origin) = self.v6.get((slot as usize).checked_sub(1)?)?;
                let prefix = Ipv6Net::new(net.into(), len).ok()?.into();
                Some(Route { prefix, origin })
            }
        }
    }

    /// Every route, IPv4 first, each family in address order.
    pub fn routes(&self) -> impl Iterator<Item = Route> + '_ {
        let v4 = self.v4.iter().filter_map(|&(a, l, origin)| {
            Some(Route {
                prefix: Ipv4Net::new(a.into(), l).ok()?.into(),
                origin,
            })
        });
        let v6 = self.v6.iter().filter_map(|&(a, l, origin)| {
            Some(Route {
                prefix: Ipv6Net::new(a.into(), l).ok()?.into(),
                origin,
            })
        });
        v4.chain(v6)
    }

    /// How many prefixes `asn` originates.
    pub fn count_of(&self, asn: u32) -> usize {
        let lo = self.by_origin.partition_point(|&(a, _)| a < asn);
        let hi = self.by_origin.partition_point(|&(a, _)| a <= asn);
        hi - lo
    }

    /// The prefixes `asn` originates, packed; made once per ASN and shared.
    pub fn packed(&self, asn: u32) -> Packed {
        if let Ok(cache) = self.packed.lock() {
            if let Some(p) = cache.get(&asn) {
                return p.clone();
            }
        }
        let lo = self.by_origin.partition_point(|&(a, _)| a < asn);
        let hi = self.by_origin.partition_point(|&(a, _)| a <= asn);
        let n4 = self.v4.len() as u32;
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for &(_, i) in &self.by_origin[lo..hi] {
            if i < n4 {
                let (a, l, _) = self.v4[i as usize];
                v4.extend_from_slice(&a.to_be_bytes());
                v4.push(l);
            } else {
                let (a, l, _) = self.v6[(i - n4) as usize];
                v6.extend_from_slice(&a.to_be_bytes());
                v6.push(l);
            }
        }
        let p = Packed {
            v4: v4.into(),
            v6: v6.into(),
        };
        if let Ok(mut cache) = self.packed.lock() {
            cache.insert(asn, p.clone());
        }
        p
    }

    /// The binary form for the store: a magic line, the counts, then the
    /// entries (IPv4: address, length, origin; IPv6 likewise), big-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24 + self.v4.len() * 9 + self.v6.len() * 21);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.v4.len() as u64).to_be_bytes());
        out.extend_from_slice(&(self.v6.len() as u64).to_be_bytes());
        for &(a, l, o) in &self.v4 {
            out.extend_from_slice(&a.to_be_bytes());
            out.push(l);
            out.extend_from_slice(&o.to_be_bytes());
        }
        for &(a, l, o) in &self.v6 {
            out.extend_from_slice(&a.to_be_bytes());
            out.push(l);
            out.extend_from_slice(&o.to_be_bytes());
        }
        out
    }

    /// Reads what [`RibMap::encode`] wrote.
    pub fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        let bad = |offset, reason| CodecError { offset, reason };
        if bytes.len() < 24 || &bytes[..8] != MAGIC {
            return Err(bad(0, "not a Sextant RIB map (bad magic or too short)"));
        }
        let count = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            usize::try_from(u64::from_be_bytes(b)).unwrap_or(usize::MAX)
        };
        let (n4, n6) = (count(8), count(16));
        let expected = n4
            .checked_mul(9)
            .and_then(|a| n6.checked_mul(21).and_then(|b| a.checked_add(b)))
            .and_then(|n| n.checked_add(24));
        if expected != Some(bytes.len()) {
            return Err(bad(8, "the counts do not match the length"));
        }
        let mut v4 = Vec::with_capacity(n4);
        let mut at = 24;
        for _ in 0..n4 {
            let e = &bytes[at..at + 9];
            let len = e[4];
            if len > 32 {
                return Err(bad(at + 4, "an IPv4 prefix longer than 32"));
            }
            v4.push((
                u32::from_be_bytes([e[0], e[1], e[2], e[3]]),
                len,
                u32::from_be_bytes([e[5], e[6], e[7], e[8]]),
            ));
            at += 9;
        }
        let mut v6 = Vec::with_capacity(n6);
        for _ in 0..n6 {
            let e = &bytes[at..at + 21];
            let mut a = [0u8; 16];
            a.copy_from_slice(&e[..16]);
            let len = e[16];
            if len > 128 {
                return Err(bad(at + 16, "an IPv6 prefix longer than 128"));
            }
            v6.push((
                u128::from_be_bytes(a),
                len,
                u32::from_be_bytes([e[17], e[18], e[19], e[20]]),
            ));
            at += 21;
        }
        Self::build(v4, v6).map_err(|_| bad(8, "more prefixes than a table holds"))
    }

    /// A digest of the map (of its binary form): equal maps have equal
    /// digests.
    pub fn digest(&self) -> String {
        digest(&self.encode())
    }
}

/// FNV-1a, 64 bits, in hex: to tell dumps and maps apart, not a security
/// hash.
pub fn digest(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Origin votes of one prefix, from its RIB entries.
fn pick_origin(entries: &[bgpkit_parser::models::RibEntry], stats: &mut RibStats) -> Option<u32> {
    stats.entries += entries.len() as u64;
    let mut votes: BTreeMap<u32, u32> = BTreeMap::new();
    for e in entries {
        let path = e
            .attributes
            .as4_path()
            .filter(|p| !p.is_empty())
            .or_else(|| e.attributes.as_path());
        if let Some(origin) = path.and_then(|p| p.get_origin_opt()) {
            *votes.entry(origin.to_u32()).or_default() += 1;
        }
    }
    if votes.len() > 1 {
        stats.multi_origin += 1;
    }
    // Most votes; on a tie the lowest ASN (BTreeMap order, max_by_key keeps
    // the last maximum, hence the reversed iteration).
    let best = votes
        .iter()
        .rev()
        .max_by_key(|(_, &n)| n)
        .map(|(&asn, _)| asn);
    if best.is_none() {
        stats.skipped += 1;
    }
    best
}

/// The origin of a legacy TABLE_DUMP entry.
fn legacy_origin(m: &TableDumpMessage, stats: &mut RibStats) -> Option<u32> {
    stats.entries += 1;
    let origin = m
        .attributes
        .as_path()
        .and_then(|p| p.get_origin_opt())
        .map(|a| a.to_u32());
    if origin.is_none() {
        stats.skipped += 1;
    }
    origin
}

/// Reads an MRT RIB dump. Refuses the whole dump, naming the byte offset,
/// if any record is truncated or cannot be decoded.
pub fn decode_mrt(data: Bytes) -> Result<(RibMap, RibStats), MrtError> {
    let mut stats = RibStats::default();
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    let mut ribs = 0u64;
    let mut offset = 0usize;
    while offset < data.len() {
        let rest = data.len() - offset;
        if rest < HEADER {
            return Err(MrtError::TruncatedHeader {
                offset,
                available: rest,
            });
        }
        let h = &data[offset..offset + HEADER];
        let kind = u16::from_be_bytes([h[4], h[5]]);
        let subtype = u16::from_be_bytes([h[6], h[7]]);
        let declared = u32::from_be_bytes([h[8], h[9], h[10], h[11]]) as usize;
        if declared > MAX_RECORD {
            return Err(MrtError::TooLarge {
                offset,
                kind,
                subtype,
                declared,
            });
        }
        if declared > rest - HEADER {
            return Err(MrtError::TruncatedRecord {
                offset,
                kind,
                subtype,
                declared,
                available: rest - HEADER,
            });
        }
        let start = offset + HEADER;
        let end = start + declared;
        stats.records += 1;
        let record_at = offset;
        offset = end;
        if kind != TABLE_DUMP && kind != TABLE_DUMP_V2 {
            stats.other_records += 1;
            continue;
        }
        let body = data.slice(start..end);
        let refuse = |e: bgpkit_parser::ParserError| MrtError::Record {
            offset: record_at,
            kind,
            subtype,
            reason: e.to_string(),
        };
        let mut add = |prefix: IpNet, origin: Option<u32>| {
            let Some(origin) = origin else { return };
            match prefix.trunc() {
                IpNet::V4(n) => v4.push((u32::from(n.network()), n.prefix_len(), origin)),
                IpNet::V6(n) => v6.push((u128::from(n.network()), n.prefix_len(), origin)),
            }
        };
        if kind == TABLE_DUMP {
            for m in parse_table_dump_messages(subtype, body).map_err(refuse)? {
                ribs += 1;
                add(m.prefix.prefix, legacy_origin(&m, &mut stats));
            }
            continue;
        }
        match parse_table_dump_v2_message(subtype, body).map_err(refuse)? {
            TableDumpV2Message::RibAfi(r) => {
                ribs += 1;
                use TableDumpV2Type as T;
                let unicast = matches!(
                    r.rib_type,
                    T::RibIpv4Unicast
                        | T::RibIpv6Unicast
                        | T::RibIpv4UnicastAddPath
                        | T::RibIpv6UnicastAddPath
                );
                if unicast {
                    let origin = pick_origin(&r.rib_entries, &mut stats);
                    add(r.prefix.prefix, origin);
                } else {
                    stats.skipped += 1;
                }
            }
            _ => stats.other_records += 1,
        }
    }
    if ribs == 0 {
        return Err(MrtError::NoRib {
            records: stats.records,
        });
    }
    Ok((RibMap::build(v4, v6)?, stats))
}

#[cfg(test)]
mod tests;
