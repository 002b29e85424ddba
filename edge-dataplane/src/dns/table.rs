//! The serving structure, built once per config version: names, zones,
//! client-group prefix tables, and per (service, group, address family) a
//! weighted picker over answers prepared in wire form and as hickory
//! records. Answering a query only reads it.
//!
//! Choices a GeoDNS has to make, and the ones made here:
//! - **Which row answers.** The client's group (ECS, else the resolver's
//!   address) by longest prefix; no match → the service's default group. A
//!   row with no usable edge (no weight, all drained: `unserved` = 1) falls
//!   back to the default group's row; if that is unusable too, the service
//!   fails open over every edge any of its rows uses (principle 3), and as a
//!   last resort over every answerable edge. Never an empty answer. A row
//!   with `unserved` < 1 is answered from its weighted edges, renormalised.
//! - **Address families.** An A query picks among the row's edges that have
//!   an IPv4 address or a CNAME; AAAA among those with IPv6 or a CNAME. A
//!   row none of whose edges has the asked family gets NODATA (clients then
//!   use the other family) rather than the default group's edges: sending
//!   IPv6 users of a group to another region because its PoPs are IPv4-only
//!   would be the worse mis-steering.
//! - **Several answers.** `answer_count` distinct edges, the first by weight
//!   and the rest by weight among the remaining ones; each picked edge
//!   contributes all its addresses of the asked family. A CNAME answers
//!   alone (RFC 1034 §3.6.2); at a zone apex CNAME edges are not eligible.
//! - **ECS scope.** The length of the largest block around the client
//!   prefix that maps to the same group (see [`super::lpm`]): the matched
//!   prefix length when nothing more specific sits inside it.
//! - **SOA serial** is the config version (mod 2³²); NS TTL is one hour;
//!   the SOA record's TTL (and so negative caching) is the SOA minimum.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::rr::rdata::{A, AAAA, CNAME, NS, SOA};
use hickory_proto::rr::{Name, RData, Record};
use ipnet::IpNet;
use sextant_proto::v1 as pb;

use super::geo::GeoMap;
use super::lpm::{Lpm, MAX_SLOT};
use super::pick::{Picker, MAX_ANSWERS};

/// Record types the resolver distinguishes.
pub const TYPE_A: u16 = 1;
pub const TYPE_NS: u16 = 2;
pub const TYPE_CNAME: u16 = 5;
pub const TYPE_SOA: u16 = 6;
pub const TYPE_AAAA: u16 = 28;
pub const TYPE_ANY: u16 = 255;

const NS_TTL: u32 = 3600;
/// Marks a slot's route as a fallback (the group's own row was unusable).
const FALLBACK: u32 = 1 << 31;

/// A small, fast hasher for the name map (keys are short and trusted only
/// as far as the map's own collision handling goes).
#[derive(Debug, Default, Clone, Copy)]
pub struct Fx(u64);

impl Hasher for Fx {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            self.add(u64::from_le_bytes(b));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            b[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(b));
        }
    }
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

impl Fx {
    #[inline]
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

/// What a name in the map is.
#[derive(Debug, Clone, Copy)]
struct NameEntry {
    zone: u32,
    /// The steered service at this name, if any.
    service: Option<u32>,
    apex: bool,
}

/// A zone served authoritatively.
#[derive(Debug)]
pub struct Zone {
    pub name: Name,
    /// Lowercase wire form.
    pub wire: Box<[u8]>,
    pub soa: Record,
    pub ns: Vec<Record>,
    /// The SOA record after its owner name, in wire form (for the fast path,
    /// which points the owner at the question).
    pub soa_tail: Box<[u8]>,
}

/// An answer for one (service, edge, family), prepared in both forms.
#[derive(Debug)]
pub struct Prepared {
    pub edge: u32,
    pub cname: bool,
    /// Resource records with the owner compressed to the question name
    /// (offset 12).
    pub wire: Box<[u8]>,
    pub rr_count: u16,
    pub records: Box<[Record]>,
}

/// One address family of a route.
#[derive(Debug)]
pub struct FamilyPick {
    pub picker: Picker,
    /// Per candidate: index into the service's prepared answers.
    pub prepared: Box<[u32]>,
}

/// Why a route answers a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    /// The group's own routing row.
    Row,
    /// Every edge the service's rows use (no usable row at all).
    FailOpen,
    /// Every answerable edge (the service has no usable row).
    AllEdges,
}

/// A weighted set of edges that answers one or more groups.
#[derive(Debug)]
pub struct Route {
    /// The group slot whose row this is (0 for fail-open routes).
    pub group: u32,
    pub kind: RouteKind,
    /// (edge index, normalised weight), for explanations.
    pub weights: Vec<(u32, f64)>,
    pub unserved: f64,
    /// [A, AAAA].
    pub family: [FamilyPick; 2],
}

/// A steered hostname.
#[derive(Debug)]
pub struct Service {
    pub id: String,
    pub name: Name,
    pub zone: u32,
    pub ttl: u32,
    pub answer_count: usize,
    pub apex: bool,
    /// Group slot → route index (| FALLBACK when not the group's own row).
    by_slot: Box<[u32]>,
    pub routes: Vec<Route>,
    pub prepared: Vec<Prepared>,
}

/// An edge as DNS sees it.
#[derive(Debug)]
pub struct EdgeInfo {
    pub id: String,
    pub v4: Vec<Ipv4Addr>,
    pub v6: Vec<Ipv6Addr>,
    pub cname: Option<Name>,
}

/// A client group, with its prefixes kept compactly (for explanations).
#[derive(Debug)]
pub struct GroupInfo {
    pub id: String,
    pub v4: Vec<(u32, u8)>,
    pub v6: Vec<(u128, u8)>,
}

impl GroupInfo {
    fn new(id: &str) -> Self {
        Self {
            id: id.to_owned(),
            v4: Vec::new(),
            v6: Vec::new(),
        }
    }

    fn push(&mut self, net: IpNet) {
        match net {
            IpNet::V4(n) => self.v4.push((u32::from(n.network()), n.prefix_len())),
            IpNet::V6(n) => self.v6.push((u128::from(n.network()), n.prefix_len())),
        }
    }

    /// The group's longest prefix that contains `addr`.
    pub fn longest_match(&self, addr: IpAddr) -> Option<IpNet> {
        let contains = |net: u128, len: u8, a: u128, width: u32| {
            len == 0 || (net ^ a) >> (width - u32::from(len)) == 0
        };
        match key_of(addr) {
            (false, k) => {
                let a = (k >> 96) as u32;
                self.v4
                    .iter()
                    .filter(|(n, l)| contains(u128::from(*n), *l, u128::from(a), 32))
                    .max_by_key(|(_, l)| *l)
                    .and_then(|(n, l)| IpNet::new(IpAddr::from(Ipv4Addr::from(*n)), *l).ok())
            }
            (true, a) => self
                .v6
                .iter()
                .filter(|(n, l)| contains(*n, *l, a, 128))
                .max_by_key(|(_, l)| *l)
                .and_then(|(n, l)| IpNet::new(IpAddr::from(Ipv6Addr::from(*n)), *l).ok()),
        }
    }
}

/// Everything a query needs, for one config version.
#[derive(Debug)]
pub struct Tables {
    pub version: u64,
    names: HashMap<Box<[u8]>, NameEntry, BuildHasherDefault<Fx>>,
    pub zones: Vec<Zone>,
    pub services: Vec<Service>,
    /// Slot s ≥ 1 is `groups[s - 1]`.
    pub groups: Vec<GroupInfo>,
    pub edges: Vec<EdgeInfo>,
    v4: Lpm,
    v6: Lpm,
    /// Things worth an operator's attention (fallbacks, fail-open).
    pub warnings: Vec<String>,
    /// How long building took (set by the builder).
    pub build_time: std::time::Duration,
}

/// The response code of a resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rcode {
    NoError,
    FormErr,
    ServFail,
    NxDomain,
    NotImp,
    Refused,
    BadVers,
}

impl Rcode {
    pub fn code(self) -> u16 {
        match self {
            Rcode::NoError => 0,
            Rcode::FormErr => 1,
            Rcode::ServFail => 2,
            Rcode::NxDomain => 3,
            Rcode::NotImp => 4,
            Rcode::Refused => 5,
            Rcode::BadVers => 16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Rcode::NoError => "NOERROR",
            Rcode::FormErr => "FORMERR",
            Rcode::ServFail => "SERVFAIL",
            Rcode::NxDomain => "NXDOMAIN",
            Rcode::NotImp => "NOTIMP",
            Rcode::Refused => "REFUSED",
            Rcode::BadVers => "BADVERS",
        }
    }

    pub const ALL: [Rcode; 7] = [
        Rcode::NoError,
        Rcode::FormErr,
        Rcode::ServFail,
        Rcode::NxDomain,
        Rcode::NotImp,
        Rcode::Refused,
        Rcode::BadVers,
    ];

    pub fn index(self) -> usize {
        self as usize
    }
}

/// What the answer section holds.
#[derive(Debug, Clone, Copy)]
pub enum Answer {
    None,
    Steered {
        service: u32,
        family: u8,
        route: u32,
        picks: [u16; MAX_ANSWERS],
        count: u8,
    },
    Soa,
    Ns,
}

/// The client a query is steered for.
#[derive(Debug, Clone, Copy)]
pub struct Client {
    pub addr: IpAddr,
}

/// The outcome of a query, before encoding.
#[derive(Debug, Clone, Copy)]
pub struct Resolution {
    pub rcode: Rcode,
    pub authoritative: bool,
    pub answer: Answer,
    /// Zone whose SOA goes in the authority section (NODATA, NXDOMAIN).
    pub soa_zone: Option<u32>,
    /// The zone of the name (for the fast path's owner compression).
    pub zone: Option<u32>,
    /// ECS scope prefix length (0 when the answer is not tailored).
    pub scope: u8,
    /// For metrics: the client's group slot (when steering happened).
    pub slot: Option<u32>,
    /// The client group's own row was unusable (default group or fail-open).
    pub fallback: bool,
}

impl Resolution {
    fn simple(rcode: Rcode) -> Self {
        Self {
            rcode,
            authoritative: false,
            answer: Answer::None,
            soa_zone: None,
            zone: None,
            scope: 0,
            slot: None,
            fallback: false,
        }
    }

    /// REFUSED: not a name of ours.
    pub fn refused() -> Self {
        Self::simple(Rcode::Refused)
    }

    /// SERVFAIL: no config yet.
    pub fn servfail() -> Self {
        Self::simple(Rcode::ServFail)
    }

    fn negative(rcode: Rcode, zone: u32) -> Self {
        Self {
            rcode,
            authoritative: true,
            answer: Answer::None,
            soa_zone: Some(zone),
            zone: Some(zone),
            scope: 0,
            slot: None,
            fallback: false,
        }
    }
}

/// Left-aligned lookup key of an address, and whether it is IPv6.
#[inline]
pub fn key_of(addr: IpAddr) -> (bool, u128) {
    match addr {
        IpAddr::V4(a) => (false, u128::from(u32::from(a)) << 96),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => (false, u128::from(u32::from(v4)) << 96),
            None => (true, u128::from(a)),
        },
    }
}

/// Lowercase wire form of a dotted name (trailing dot optional).
pub fn wire_name(name: &str) -> Result<Vec<u8>, String> {
    let n = name.strip_suffix('.').unwrap_or(name);
    let mut out = Vec::with_capacity(n.len() + 2);
    if !n.is_empty() {
        for label in n.split('.') {
            if label.is_empty() || label.len() > 63 {
                return Err(format!("{name:?} has an empty or over-long label"));
            }
            if let Some(c) = label
                .bytes()
                .find(|c| !(c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_'))
            {
                return Err(format!("{name:?} contains {:?}", c as char));
            }
            out.push(label.len() as u8);
            out.extend(label.bytes().map(|b| b.to_ascii_lowercase()));
        }
    }
    out.push(0);
    if out.len() > 255 {
        return Err(format!("{name:?} is longer than 255 octets"));
    }
    Ok(out)
}

fn hickory_name(name: &str) -> Result<Name, String> {
    wire_name(name)?;
    let fq = if name.ends_with('.') {
        name.to_owned()
    } else {
        format!("{name}.")
    };
    Name::from_ascii(&fq)
        .map(|n| n.to_lowercase())
        .map_err(|e| format!("{name:?}: {e}"))
}

/// Offsets at which the labels of a wire name start (the name itself first).
fn suffixes(wire: &[u8]) -> impl Iterator<Item = usize> + '_ {
    let mut at = Some(0usize);
    std::iter::from_fn(move || {
        let i = at?;
        let len = usize::from(*wire.get(i)?);
        at = if len == 0 { None } else { Some(i + 1 + len) };
        Some(i)
    })
}

/// Problems found while building, reported together as the NACK reason.
#[derive(Debug, Default)]
struct Problems(Vec<String>);

impl Problems {
    fn add(&mut self, p: impl Into<String>) {
        self.0.push(p.into());
    }
    fn finish(self) -> Result<(), String> {
        if self.0.is_empty() {
            return Ok(());
        }
        let n = self.0.len();
        let mut s = self.0.into_iter().take(10).collect::<Vec<_>>().join("; ");
        if n > 10 {
            s.push_str(&format!("; and {} more", n - 10));
        }
        Err(s)
    }
}

fn rr_header(out: &mut Vec<u8>, rtype: u16, ttl: u32, rdlen: usize) {
    out.extend_from_slice(&rtype.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&ttl.to_be_bytes());
    out.extend_from_slice(&(rdlen as u16).to_be_bytes());
}

impl Tables {
    /// Builds the tables of one config, or says everything that is wrong
    /// with it.
    pub fn build(version: u64, c: &pb::NodeConfig, geo: Option<&GeoMap>) -> Result<Self, String> {
        let mut problems = Problems::default();
        let mut warnings = Vec::new();

        // Edges.
        let mut edges = Vec::with_capacity(c.edges.len());
        let mut edge_index = HashMap::new();
        for e in &c.edges {
            let mut info = EdgeInfo {
                id: e.id.clone(),
                v4: vec![],
                v6: vec![],
                cname: None,
            };
            if !e.cname.is_empty() {
                match hickory_name(&e.cname) {
                    Ok(n) => info.cname = Some(n),
                    Err(err) => problems.add(format!("edge {}: cname {err}", e.id)),
                }
            } else {
                for a in &e.addresses {
                    match a.parse::<IpAddr>() {
                        Ok(IpAddr::V4(v4)) => info.v4.push(v4),
                        Ok(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
                            Some(v4) => info.v4.push(v4),
                            None => info.v6.push(v6),
                        },
                        Err(_) => problems
                            .add(format!("edge {}: address {a:?} is not an IP address", e.id)),
                    }
                }
                if e.addresses.is_empty() {
                    warnings.push(format!(
                        "edge {} has neither addresses nor a cname; never answered",
                        e.id
                    ));
                }
            }
            if edge_index
                .insert(e.id.clone(), edges.len() as u32)
                .is_some()
            {
                problems.add(format!("edge {} is listed twice", e.id));
            }
            edges.push(info);
        }

        // Groups and their prefixes.
        if c.groups.len() > MAX_SLOT as usize {
            problems.add(format!(
                "{} client groups, more than {MAX_SLOT}",
                c.groups.len()
            ));
        }
        let mut groups = Vec::with_capacity(c.groups.len());
        let mut group_slot = HashMap::new();
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        let mut owner: HashMap<IpNet, u32> = HashMap::new();
        for (i, g) in c.groups.iter().enumerate() {
            let slot = (i + 1) as u32;
            if group_slot.insert(g.id.clone(), slot).is_some() {
                problems.add(format!("group {} is listed twice", g.id));
            }
            let mut info = GroupInfo::new(&g.id);
            for p in &g.prefixes {
                let net: IpNet = match p.parse() {
                    Ok(n) => n,
                    Err(_) => {
                        problems.add(format!("group {}: {p:?} is not a CIDR prefix", g.id));
                        continue;
                    }
                };
                if net.trunc() != net {
                    problems.add(format!(
                        "group {}: {p:?} has host bits set (network is {})",
                        g.id,
                        net.trunc()
                    ));
                    continue;
                }
                if let Some(other) = owner.insert(net, slot) {
                    let other = c
                        .groups
                        .get(other as usize - 1)
                        .map_or("", |o| o.id.as_str());
                    problems.add(format!("prefix {net} is in groups {other} and {}", g.id));
                    continue;
                }
                push_prefix(&mut v4, &mut v6, net, slot);
                info.push(net);
            }
            groups.push(info);
        }
        // ASN groups resolve through the same tables: their prefixes come
        // from the control plane's BGP RIB (pushed as `asn_prefixes`), then
        // country and ASN groups from the local geo map, all below explicit
        // prefixes (an exact prefix already claimed by a group keeps its
        // group).
        let mut by_asn: HashMap<u32, u32> = HashMap::new();
        for (i, g) in c.groups.iter().enumerate() {
            for a in &g.asns {
                by_asn.entry(*a).or_insert((i + 1) as u32);
            }
        }
        for p in &c.asn_prefixes {
            let Some(&slot) = by_asn.get(&p.asn) else {
                // Sent for a group that this config no longer has.
                continue;
            };
            if p.v4.len() % 5 != 0 || p.v6.len() % 17 != 0 {
                problems.add(format!(
                    "prefixes of AS{} part {}: {} IPv4 and {} IPv6 bytes are not whole prefixes",
                    p.asn,
                    p.part,
                    p.v4.len(),
                    p.v6.len()
                ));
                continue;
            }
            let v4_nets = p.v4.chunks_exact(5).map(|e| {
                let a = std::net::Ipv4Addr::new(e[0], e[1], e[2], e[3]);
                ipnet::Ipv4Net::new(a, e[4]).map(IpNet::V4)
            });
            let v6_nets = p.v6.chunks_exact(17).map(|e| {
                let mut a = [0u8; 16];
                a.copy_from_slice(&e[..16]);
                ipnet::Ipv6Net::new(a.into(), e[16]).map(IpNet::V6)
            });
            for net in v4_nets.chain(v6_nets) {
                let Ok(net) = net else {
                    problems.add(format!(
                        "prefixes of AS{}: a prefix length out of range",
                        p.asn
                    ));
                    break;
                };
                let net = net.trunc();
                if owner.contains_key(&net) {
                    continue;
                }
                owner.insert(net, slot);
                push_prefix(&mut v4, &mut v6, net, slot);
                groups[slot as usize - 1].push(net);
            }
        }
        if let Some(geo) = geo {
            let mut by_country: HashMap<&str, u32> = HashMap::new();
            for (i, g) in c.groups.iter().enumerate() {
                let slot = (i + 1) as u32;
                for cc in &g.countries {
                    by_country.entry(cc.as_str()).or_insert(slot);
                }
            }
            for entry in geo.entries() {
                let slot = entry.asn.and_then(|a| by_asn.get(&a).copied()).or_else(|| {
                    entry
                        .country
                        .as_deref()
                        .and_then(|cc| by_country.get(cc).copied())
                });
                let Some(slot) = slot else { continue };
                if owner.contains_key(&entry.net) {
                    continue;
                }
                owner.insert(entry.net, slot);
                push_prefix(&mut v4, &mut v6, entry.net, slot);
                groups[slot as usize - 1].push(entry.net);
            }
        }
        drop(owner);

        // Zones (SOA and NS from the first service of each zone, by id).
        let mut zones: Vec<Zone> = Vec::new();
        let mut zone_index: HashMap<Vec<u8>, u32> = HashMap::new();
        let serial = (version & 0xffff_ffff) as u32;
        for s in &c.services {
            let wire = match wire_name(&s.zone) {
                Ok(w) => w,
                Err(e) => {
                    problems.add(format!("service {}: zone {e}", s.id));
                    continue;
                }
            };
            if zone_index.contains_key(&wire) {
                continue;
            }
            match build_zone(s, &wire, serial) {
                Ok(z) => {
                    zone_index.insert(wire, zones.len() as u32);
                    zones.push(z);
                }
                Err(e) => problems.add(format!("service {}: {e}", s.id)),
            }
        }

        // Routing rows by (service, group).
        let mut rows: HashMap<(&str, &str), &pb::GroupRouting> = HashMap::new();
        for r in &c.routing {
            if !group_slot.contains_key(&r.group) {
                problems.add(format!(
                    "route {}/{} names an unknown group",
                    r.service, r.group
                ));
            }
            if !c.services.iter().any(|s| s.id == r.service) {
                problems.add(format!(
                    "route {}/{} names an unknown service",
                    r.service, r.group
                ));
            }
            for w in &r.weights {
                if !edge_index.contains_key(&w.edge) {
                    problems.add(format!(
                        "route {}/{} names an unknown edge {}",
                        r.service, r.group, w.edge
                    ));
                }
                if !(w.weight.is_finite() && w.weight >= 0.0) {
                    problems.add(format!(
                        "route {}/{}: weight {} of edge {}",
                        r.service, r.group, w.weight, w.edge
                    ));
                }
            }
            rows.insert((r.service.as_str(), r.group.as_str()), r);
        }

        // Services.
        let mut names: HashMap<Box<[u8]>, NameEntry, BuildHasherDefault<Fx>> = HashMap::default();
        for (wire, &z) in &zone_index {
            names.insert(
                wire.clone().into_boxed_slice(),
                NameEntry {
                    zone: z,
                    service: None,
                    apex: true,
                },
            );
        }
        let mut services = Vec::with_capacity(c.services.len());
        for s in &c.services {
            let (Ok(zwire), Ok(hwire), Ok(name)) = (
                wire_name(&s.zone),
                wire_name(&s.hostname),
                hickory_name(&s.hostname),
            ) else {
                problems.add(format!(
                    "service {}: hostname {:?} is not a valid DNS name",
                    s.id, s.hostname
                ));
                continue;
            };
            let Some(&zone) = zone_index.get(&zwire) else {
                continue;
            };
            if !suffixes(&hwire).any(|i| hwire[i..] == zwire[..]) {
                problems.add(format!(
                    "service {}: {} is not inside zone {}",
                    s.id, s.hostname, s.zone
                ));
                continue;
            }
            let Some(&default_slot) = group_slot.get(&s.default_group) else {
                problems.add(format!(
                    "service {}: unknown default group {:?}",
                    s.id, s.default_group
                ));
                continue;
            };
            let apex = hwire == zwire;
            let svc_index = services.len() as u32;
            match names.get_mut(hwire.as_slice()) {
                Some(e) if e.service.is_some() => {
                    problems.add(format!(
                        "service {}: hostname {} is used twice",
                        s.id, s.hostname
                    ));
                    continue;
                }
                Some(e) => e.service = Some(svc_index),
                None => {
                    names.insert(
                        hwire.clone().into_boxed_slice(),
                        NameEntry {
                            zone,
                            service: Some(svc_index),
                            apex: false,
                        },
                    );
                }
            }
            // Empty non-terminals between the name and its zone: NODATA.
            for i in suffixes(&hwire).skip(1) {
                if hwire[i..] == zwire[..] {
                    break;
                }
                names
                    .entry(hwire[i..].to_vec().into_boxed_slice())
                    .or_insert(NameEntry {
                        zone,
                        service: None,
                        apex: false,
                    });
            }
            let built = ServiceBuild {
                s,
                name: &name,
                apex,
                edges: &edges,
                rows: &rows,
                groups: &c.groups,
                default_slot,
            }
            .build(zone, &mut warnings);
            match built {
                Ok(svc) => services.push(svc),
                Err(e) => problems.add(e),
            }
        }
        problems.finish()?;
        Ok(Tables {
            version,
            names,
            zones,
            services,
            groups,
            edges,
            v4: Lpm::v4(&v4),
            v6: Lpm::v6(&v6),
            warnings,
            build_time: std::time::Duration::ZERO,
        })
    }

    /// The group slot and ECS scope of a client address.
    #[inline]
    pub fn classify(&self, addr: IpAddr) -> (u32, u8) {
        match key_of(addr) {
            (false, k) => self.v4.lookup(k),
            (true, k) => self.v6.lookup(k),
        }
    }

    /// Prefixes in the lookup tables (IPv4, IPv6).
    pub fn prefix_counts(&self) -> (usize, usize) {
        (self.v4.len(), self.v6.len())
    }

    /// Bytes held by the lookup tables.
    pub fn lpm_bytes(&self) -> usize {
        self.v4.memory_bytes() + self.v6.memory_bytes()
    }

    /// Id of a group slot ("" for 0).
    pub fn group_id(&self, slot: u32) -> &str {
        if slot == 0 {
            ""
        } else {
            self.groups
                .get(slot as usize - 1)
                .map_or("", |g| g.id.as_str())
        }
    }

    /// Resolves one question. `qname` is the lowercase wire form.
    pub fn resolve(
        &self,
        qname: &[u8],
        qtype: u16,
        client: Client,
        rng: &mut fastrand::Rng,
    ) -> Resolution {
        let Some(entry) = self.names.get(qname).copied() else {
            // Below a name of ours, or outside every zone?
            for i in suffixes(qname).skip(1) {
                if let Some(e) = self.names.get(&qname[i..]) {
                    return Resolution::negative(Rcode::NxDomain, e.zone);
                }
            }
            return Resolution::refused();
        };
        let zone = entry.zone;
        let mut res = Resolution::negative(Rcode::NoError, zone);
        if entry.apex {
            match qtype {
                TYPE_SOA => {
                    res.answer = Answer::Soa;
                    res.soa_zone = None;
                    return res;
                }
                TYPE_NS => {
                    res.answer = Answer::Ns;
                    res.soa_zone = None;
                    return res;
                }
                _ => {}
            }
        }
        let Some(si) = entry.service else {
            return res;
        };
        let family = match qtype {
            TYPE_A | TYPE_ANY | TYPE_CNAME => 0u8,
            TYPE_AAAA => 1,
            _ => return res,
        };
        let svc = &self.services[si as usize];
        let (slot, scope) = self.classify(client.addr);
        let by_slot = svc.by_slot[slot as usize];
        let route_index = by_slot & !FALLBACK;
        let route = &svc.routes[route_index as usize];
        let fam = &route.family[usize::from(family)];
        let mut picks = [0u16; MAX_ANSWERS];
        let count = fam.picker.pick(svc.answer_count, rng, &mut picks);
        res.scope = scope;
        res.slot = Some(slot);
        res.fallback = by_slot & FALLBACK != 0;
        if count == 0 {
            // No edge of this row has the family: NODATA, tailored.
            return res;
        }
        if qtype == TYPE_CNAME && !svc.prepared[fam.prepared[usize::from(picks[0])] as usize].cname
        {
            return res;
        }
        res.soa_zone = None;
        res.answer = Answer::Steered {
            service: si,
            family,
            route: route_index,
            picks,
            count: count as u8,
        };
        res
    }

    /// The prepared answers of a steered resolution, in order.
    pub fn steered<'a, 'p>(
        &'a self,
        service: u32,
        family: u8,
        route: u32,
        picks: &'p [u16],
    ) -> impl Iterator<Item = &'a Prepared> + 'p
    where
        'a: 'p,
    {
        let svc = &self.services[service as usize];
        let fam = &svc.routes[route as usize].family[usize::from(family)];
        picks
            .iter()
            .map(move |&p| &svc.prepared[fam.prepared[usize::from(p)] as usize])
    }

    /// Route index of (service, slot), and whether it is a fallback.
    pub fn route_of(&self, service: u32, slot: u32) -> (u32, bool) {
        let v = self.services[service as usize].by_slot[slot as usize];
        (v & !FALLBACK, v & FALLBACK != 0)
    }

    /// Index of the service answering a lowercase wire name.
    pub fn service_at(&self, qname: &[u8]) -> Option<u32> {
        self.names.get(qname).and_then(|e| e.service)
    }

    /// Why a client gets what it gets for a name: the group, the scope,
    /// the row and its weights, and one sample answer.
    pub fn explain(
        &self,
        name: &str,
        client: IpAddr,
        source: Option<u8>,
        qtype: u16,
        rng: &mut fastrand::Rng,
    ) -> serde_json::Value {
        use serde_json::json;
        let wire = match wire_name(name) {
            Ok(w) => w,
            Err(e) => return json!({ "error": e }),
        };
        let masked = match source {
            Some(len) => match IpNet::new(client, len) {
                Ok(n) => n.network(),
                Err(e) => return json!({ "error": e.to_string() }),
            },
            None => client,
        };
        let res = self.resolve(&wire, qtype, Client { addr: masked }, rng);
        let mut out = json!({
            "version": self.version,
            "name": name,
            "client": masked.to_string(),
            "ecs_source": source,
            "rcode": res.rcode.name(),
        });
        let Some(si) = self.service_at(&wire) else {
            return out;
        };
        let svc = &self.services[si as usize];
        let (slot, scope) = self.classify(masked);
        let (ri, fallback) = self.route_of(si, slot);
        let route = &svc.routes[ri as usize];
        let matched = (slot != 0).then(|| {
            self.groups[slot as usize - 1]
                .longest_match(masked)
                .map(|p| p.to_string())
        });
        let weights: Vec<serde_json::Value> = route
            .weights
            .iter()
            .map(|&(e, w)| {
                let edge = &self.edges[e as usize];
                json!({
                    "edge": edge.id,
                    "weight": w,
                    "target": match &edge.cname {
                        Some(c) => json!({ "cname": c.to_string() }),
                        None => json!({
                            "a": edge.v4.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                            "aaaa": edge.v6.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                        }),
                    },
                })
            })
            .collect();
        let sample: Vec<String> = match res.answer {
            Answer::Steered {
                service,
                family,
                route,
                picks,
                count,
            } => self
                .steered(service, family, route, &picks[..usize::from(count)])
                .map(|p| self.edges[p.edge as usize].id.clone())
                .collect(),
            _ => vec![],
        };
        let obj = out.as_object_mut();
        if let Some(o) = obj {
            o.insert("service".into(), json!(svc.id));
            o.insert(
                "client_group".into(),
                json!(if slot == 0 {
                    None
                } else {
                    Some(self.group_id(slot))
                }),
            );
            o.insert("matched_prefix".into(), json!(matched.flatten()));
            o.insert("scope".into(), json!(scope));
            o.insert(
                "answered_by_group".into(),
                json!(match route.kind {
                    RouteKind::Row => Some(self.group_id(route.group)),
                    _ => None,
                }),
            );
            o.insert(
                "route".into(),
                json!(match (route.kind, fallback, slot) {
                    (RouteKind::Row, false, 0) => "default group (no prefix matched)",
                    (RouteKind::Row, false, _) => "the client group's own row",
                    (RouteKind::Row, true, _) =>
                        "fallback to the default group (the client group's row has no usable edge)",
                    (RouteKind::FailOpen, ..) =>
                        "fail open: no usable row for the group nor the default group",
                    (RouteKind::AllEdges, ..) => "fail open over every answerable edge",
                }),
            );
            o.insert("weights".into(), json!(weights));
            o.insert("unserved".into(), json!(route.unserved));
            o.insert("ttl".into(), json!(svc.ttl));
            o.insert("answer_count".into(), json!(svc.answer_count));
            o.insert("sample_answer".into(), json!(sample));
        }
        out
    }
}

fn push_prefix(v4: &mut Vec<(u32, u8, u32)>, v6: &mut Vec<(u128, u8, u32)>, net: IpNet, slot: u32) {
    match net {
        IpNet::V4(n) => v4.push((u32::from(n.network()), n.prefix_len(), slot)),
        IpNet::V6(n) => v6.push((u128::from(n.network()), n.prefix_len(), slot)),
    }
}

fn build_zone(s: &pb::ServiceConfig, wire: &[u8], serial: u32) -> Result<Zone, String> {
    let zname = hickory_name(&s.zone)?;
    let mname_s = if s.soa_mname.is_empty() {
        s.nameservers
            .first()
            .cloned()
            .unwrap_or_else(|| format!("ns1.{}", s.zone))
    } else {
        s.soa_mname.clone()
    };
    let rname_s = if s.soa_rname.is_empty() {
        format!("hostmaster.{}", s.zone)
    } else {
        s.soa_rname.clone()
    };
    let mname = hickory_name(&mname_s).map_err(|e| format!("soa mname {e}"))?;
    let rname = hickory_name(&rname_s).map_err(|e| format!("soa rname {e}"))?;
    let refresh = if s.soa_refresh == 0 {
        3600
    } else {
        s.soa_refresh
    };
    let retry = if s.soa_retry == 0 { 600 } else { s.soa_retry };
    let expire = if s.soa_expire == 0 {
        604_800
    } else {
        s.soa_expire
    };
    let minimum = if s.soa_minimum == 0 {
        60
    } else {
        s.soa_minimum
    };
    let as_i32 = |v: u32| i32::try_from(v).unwrap_or(i32::MAX);
    let soa = Record::from_rdata(
        zname.clone(),
        minimum,
        RData::SOA(SOA::new(
            mname,
            rname,
            serial,
            as_i32(refresh),
            as_i32(retry),
            as_i32(expire),
            minimum,
        )),
    );
    let mut rdata = wire_name(&mname_s)?;
    rdata.extend(wire_name(&rname_s)?);
    for v in [serial, refresh, retry, expire, minimum] {
        rdata.extend_from_slice(&v.to_be_bytes());
    }
    let mut soa_tail = Vec::with_capacity(rdata.len() + 10);
    rr_header(&mut soa_tail, TYPE_SOA, minimum, rdata.len());
    soa_tail.extend(rdata);
    let mut ns = Vec::new();
    for n in &s.nameservers {
        let target = hickory_name(n).map_err(|e| format!("nameserver {e}"))?;
        ns.push(Record::from_rdata(
            zname.clone(),
            NS_TTL,
            RData::NS(NS(target)),
        ));
    }
    Ok(Zone {
        name: zname,
        wire: wire.to_vec().into_boxed_slice(),
        soa,
        ns,
        soa_tail: soa_tail.into_boxed_slice(),
    })
}

struct ServiceBuild<'a> {
    s: &'a pb::ServiceConfig,
    name: &'a Name,
    apex: bool,
    edges: &'a [EdgeInfo],
    rows: &'a HashMap<(&'a str, &'a str), &'a pb::GroupRouting>,
    groups: &'a [pb::GroupMatch],
    default_slot: u32,
}

impl ServiceBuild<'_> {
    fn answerable(&self, e: &EdgeInfo) -> bool {
        match e.cname {
            Some(_) => !self.apex,
            None => !e.v4.is_empty() || !e.v6.is_empty(),
        }
    }

    /// The usable (edge, weight) pairs of a row, if any.
    fn usable(
        &self,
        row: &pb::GroupRouting,
        index: &HashMap<&str, u32>,
    ) -> Option<Vec<(u32, f64)>> {
        let ws: Vec<(u32, f64)> = row
            .weights
            .iter()
            .filter(|w| w.weight.is_finite() && w.weight > 0.0)
            .filter_map(|w| index.get(w.edge.as_str()).map(|&e| (e, w.weight)))
            .filter(|&(e, _)| self.answerable(&self.edges[e as usize]))
            .collect();
        (!ws.is_empty()).then_some(ws)
    }

    fn build(self, zone: u32, warnings: &mut Vec<String>) -> Result<Service, String> {
        let s = self.s;
        let index: HashMap<&str, u32> = self
            .edges
            .iter()
            .enumerate()
            .map(|(i, e)| (e.id.as_str(), i as u32))
            .collect();
        let mut svc = Service {
            id: s.id.clone(),
            name: self.name.clone(),
            zone,
            ttl: s.ttl_seconds,
            answer_count: (s.answer_count as usize).clamp(1, MAX_ANSWERS),
            apex: self.apex,
            by_slot: Box::new([]),
            routes: Vec::new(),
            prepared: Vec::new(),
        };
        let mut prepared_index: HashMap<(u32, u8), u32> = HashMap::new();
        let mut route_of_group: HashMap<u32, Option<u32>> = HashMap::new();
        let mut fail_open: Option<u32> = None;

        // The route of a group's own row, if usable.
        let mut own = |slot: u32, svc: &mut Service, pi: &mut HashMap<(u32, u8), u32>| {
            *route_of_group.entry(slot).or_insert_with(|| {
                let g = &self.groups[slot as usize - 1];
                let row = self.rows.get(&(s.id.as_str(), g.id.as_str()))?;
                let ws = self.usable(row, &index)?;
                Some(self.add_route(svc, pi, slot, RouteKind::Row, ws, row.unserved))
            })
        };
        let mut by_slot = vec![0u32; self.groups.len() + 1];
        let default = own(self.default_slot, &mut svc, &mut prepared_index);
        for (slot, out) in by_slot.iter_mut().enumerate() {
            let slot = slot as u32;
            let mine = if slot == 0 {
                None
            } else {
                own(slot, &mut svc, &mut prepared_index)
            };
            *out = match (mine, default) {
                (Some(r), _) => r,
                (None, Some(d)) => d | if slot == 0 { 0 } else { FALLBACK },
                (None, None) => {
                    let r = match fail_open {
                        Some(r) => r,
                        None => {
                            let r =
                                self.fail_open(&mut svc, &mut prepared_index, &index, warnings)?;
                            fail_open = Some(r);
                            r
                        }
                    };
                    r | FALLBACK
                }
            };
        }
        // A group whose own row is unusable is worth a warning.
        for (slot, r) in by_slot.iter().enumerate().skip(1) {
            if r & FALLBACK != 0
                && self
                    .rows
                    .contains_key(&(s.id.as_str(), self.groups[slot - 1].id.as_str()))
            {
                warnings.push(format!(
                    "service {}: group {} has no usable edge; answered by {}",
                    s.id,
                    self.groups[slot - 1].id,
                    if default.is_some() {
                        "the default group"
                    } else {
                        "fail-open"
                    }
                ));
            }
        }
        svc.by_slot = by_slot.into_boxed_slice();
        Ok(svc)
    }

    fn fail_open(
        &self,
        svc: &mut Service,
        pi: &mut HashMap<(u32, u8), u32>,
        index: &HashMap<&str, u32>,
        warnings: &mut Vec<String>,
    ) -> Result<u32, String> {
        let s = self.s;
        let mut sum: BTreeMap<u32, f64> = BTreeMap::new();
        for ((service, _), row) in self.rows.iter() {
            if *service != s.id {
                continue;
            }
            for w in &row.weights {
                if let Some(&e) = index.get(w.edge.as_str()) {
                    if self.answerable(&self.edges[e as usize]) {
                        *sum.entry(e).or_insert(0.0) += 1.0;
                    }
                }
            }
        }
        if !sum.is_empty() {
            warnings.push(format!(
                "service {}: neither the client groups nor the default group {} have a usable edge; failing open over the {} edges its rows name",
                s.id, s.default_group, sum.len()
            ));
            return Ok(self.add_route(
                svc,
                pi,
                0,
                RouteKind::FailOpen,
                sum.into_iter().collect(),
                0.0,
            ));
        }
        let all: Vec<(u32, f64)> = self
            .edges
            .iter()
            .enumerate()
            .filter(|(_, e)| self.answerable(e))
            .map(|(i, _)| (i as u32, 1.0))
            .collect();
        if all.is_empty() {
            return Err(format!("service {}: no edge can answer for it", s.id));
        }
        warnings.push(format!(
            "service {}: no routing row names a usable edge; failing open over all {} edges",
            s.id,
            all.len()
        ));
        Ok(self.add_route(svc, pi, 0, RouteKind::AllEdges, all, 0.0))
    }

    fn add_route(
        &self,
        svc: &mut Service,
        pi: &mut HashMap<(u32, u8), u32>,
        group: u32,
        kind: RouteKind,
        weights: Vec<(u32, f64)>,
        unserved: f64,
    ) -> u32 {
        let total: f64 = weights.iter().map(|w| w.1).sum();
        let weights: Vec<(u32, f64)> = weights.into_iter().map(|(e, w)| (e, w / total)).collect();
        let family = [0u8, 1].map(|fam| {
            let mut ws = Vec::new();
            let mut cn = Vec::new();
            let mut prepared = Vec::new();
            for &(e, w) in &weights {
                let edge = &self.edges[e as usize];
                let ok = match (&edge.cname, fam) {
                    (Some(_), _) => !self.apex,
                    (None, 0) => !edge.v4.is_empty(),
                    (None, _) => !edge.v6.is_empty(),
                };
                if !ok {
                    continue;
                }
                let idx = *pi.entry((e, fam)).or_insert_with(|| {
                    svc.prepared.push(self.prepare(e, fam));
                    (svc.prepared.len() - 1) as u32
                });
                ws.push(w);
                cn.push(edge.cname.is_some());
                prepared.push(idx);
            }
            FamilyPick {
                picker: Picker::new(&ws, &cn),
                prepared: prepared.into_boxed_slice(),
            }
        });
        svc.routes.push(Route {
            group,
            kind,
            weights,
            unserved,
            family,
        });
        (svc.routes.len() - 1) as u32
    }

    fn prepare(&self, e: u32, fam: u8) -> Prepared {
        let edge = &self.edges[e as usize];
        let ttl = self.s.ttl_seconds;
        let mut wire = Vec::new();
        let mut records = Vec::new();
        let rr = |wire: &mut Vec<u8>, rtype: u16, rdata: &[u8]| {
            wire.extend_from_slice(&[0xc0, 0x0c]);
            rr_header(wire, rtype, ttl, rdata.len());
            wire.extend_from_slice(rdata);
        };
        if let Some(target) = &edge.cname {
            let tw = wire_name(&target.to_ascii()).unwrap_or_else(|_| vec![0]);
            rr(&mut wire, TYPE_CNAME, &tw);
            records.push(Record::from_rdata(
                self.name.clone(),
                ttl,
                RData::CNAME(CNAME(target.clone())),
            ));
        } else if fam == 0 {
            for a in &edge.v4 {
                rr(&mut wire, TYPE_A, &a.octets());
                records.push(Record::from_rdata(self.name.clone(), ttl, RData::A(A(*a))));
            }
        } else {
            for a in &edge.v6 {
                rr(&mut wire, TYPE_AAAA, &a.octets());
                records.push(Record::from_rdata(
                    self.name.clone(),
                    ttl,
                    RData::AAAA(AAAA(*a)),
                ));
            }
        }
        Prepared {
            edge: e,
            cname: edge.cname.is_some(),
            rr_count: records.len() as u16,
            wire: wire.into_boxed_slice(),
            records: records.into_boxed_slice(),
        }
    }
}
