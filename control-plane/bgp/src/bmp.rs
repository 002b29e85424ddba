//! BMP (RFC 7854, and RFC 9069's Loc-RIB peers): framing, decoding and the
//! route state of one monitored router.
//!
//! A BMP station reads a TCP stream of messages from a router. [`Framer`]
//! cuts the stream into messages by their common header (version 3, a
//! length of 6 bytes to [`MAX_MESSAGE`]); [`decode`] reads one message into
//! a [`Message`]. Only what anycast health needs is decoded: Initiation
//! (sysName, sysDescr), Termination, Peer Up, Peer Down, and Route
//! Monitoring carrying a BGP UPDATE (IPv4 NLRI and withdrawn routes, and
//! MP_REACH_NLRI / MP_UNREACH_NLRI for IPv4 and IPv6 unicast). Statistics
//! and Route Mirroring messages are framed and skipped.
//!
//! This is a decoder of our own rather than bgpkit-parser's `parse_bmp_msg`
//! so that every refusal names what was wrong and the byte offset in the
//! stream where it is, and so that nothing can panic on garbage (fuzzed:
//! `fuzz/fuzz_targets/bmp.rs`). Not supported: ADD-PATH NLRI (path
//! identifiers; a peer that negotiated ADD-PATH is misread or refused),
//! SAFIs other than unicast (skipped).
//!
//! [`Session`] keeps what one router says about a set of *watched*
//! prefixes (only those: a router may send a full table) per BGP peer and
//! RIB it monitors, and the last change of each, for verdict reasons.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bytes::{Buf, Bytes, BytesMut};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// The BMP version this station speaks.
pub const VERSION: u8 = 3;
/// The common header: version (1), length (4), type (1).
pub const HEADER: usize = 6;
/// A message longer than this is refused (a BGP UPDATE is at most 64 KiB).
pub const MAX_MESSAGE: usize = 1 << 20;
/// The per-peer header.
const PEER_HEADER: usize = 42;
/// Longest text kept from a TLV.
const MAX_TEXT: usize = 255;

/// Why bytes are not BMP. `offset` is the position in the stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BmpError {
    #[error("byte {offset}: BMP version {version}, expected {VERSION} (is this a BMP stream?)")]
    Version { offset: u64, version: u8 },
    #[error("byte {offset}: BMP message length {length} is shorter than its {HEADER}-byte header")]
    TooShort { offset: u64, length: u64 },
    #[error(
        "byte {offset}: BMP message length {length} is more than the {MAX_MESSAGE}-byte limit"
    )]
    TooLong { offset: u64, length: u64 },
    #[error("byte {offset}: {what} is truncated: needs {need} bytes, {have} left")]
    Truncated {
        offset: u64,
        what: &'static str,
        need: usize,
        have: usize,
    },
    #[error("byte {offset}: {what}: {reason}")]
    Invalid {
        offset: u64,
        what: &'static str,
        reason: String,
    },
}

impl BmpError {
    /// Where in the stream the fault is.
    pub fn offset(&self) -> u64 {
        match self {
            Self::Version { offset, .. }
            | Self::TooShort { offset, .. }
            | Self::TooLong { offset, .. }
            | Self::Truncated { offset, .. }
            | Self::Invalid { offset, .. } => *offset,
        }
    }
}

/// Cuts a byte stream into BMP messages.
#[derive(Debug, Default)]
pub struct Framer {
    buf: BytesMut,
    /// Stream offset of `buf[0]`.
    at: u64,
}

impl Framer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole message and its stream offset, `None` when more bytes
    /// are needed. A bad header is an error (the stream cannot be re-synced:
    /// drop the connection).
    pub fn next_message(&mut self) -> Result<Option<(u64, Bytes)>, BmpError> {
        if self.buf.len() < HEADER {
            // Refuse a wrong version as soon as its byte is there.
            if let Some(&v) = self.buf.first() {
                check_version(self.at, v)?;
            }
            return Ok(None);
        }
        let len = message_len(self.at, &self.buf)?;
        if self.buf.len() < len {
            return Ok(None);
        }
        let at = self.at;
        self.at += len as u64;
        Ok(Some((at, self.buf.split_to(len).freeze())))
    }

    /// Bytes held that are not a whole message yet.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Stream offset of the next byte to be framed.
    pub fn offset(&self) -> u64 {
        self.at
    }

    /// At the end of the stream: an error if a message was cut short.
    pub fn finish(&self) -> Result<(), BmpError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let need = if self.buf.len() < HEADER {
            HEADER
        } else {
            message_len(self.at, &self.buf)?
        };
        Err(BmpError::Truncated {
            offset: self.at,
            what: "BMP message",
            need,
            have: self.buf.len(),
        })
    }
}

fn check_version(offset: u64, version: u8) -> Result<(), BmpError> {
    if version != VERSION {
        return Err(BmpError::Version { offset, version });
    }
    Ok(())
}

/// The length a common header declares, checked (`h` has ≥ 6 bytes).
fn message_len(offset: u64, h: &[u8]) -> Result<usize, BmpError> {
    check_version(offset, h[0])?;
    let length = u64::from(u32::from_be_bytes([h[1], h[2], h[3], h[4]]));
    if length < HEADER as u64 {
        return Err(BmpError::TooShort {
            offset: offset + 1,
            length,
        });
    }
    if length > MAX_MESSAGE as u64 {
        return Err(BmpError::TooLong {
            offset: offset + 1,
            length,
        });
    }
    Ok(length as usize)
}

/// Decodes every message of a whole stream (a file, a test); a message cut
/// short at the end is refused.
pub fn decode_stream(data: &[u8]) -> Result<Vec<Message>, BmpError> {
    let mut f = Framer::new();
    f.push(data);
    let mut out = Vec::new();
    while let Some((at, msg)) = f.next_message()? {
        out.push(decode(&msg, at)?);
    }
    f.finish()?;
    Ok(out)
}

/// The kind of a monitored BGP peer (RFC 7854 §4.2, RFC 9069).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PeerType {
    Global,
    RdInstance,
    LocalInstance,
    /// The router's own Loc-RIB (RFC 9069).
    LocRib,
    Other(u8),
}

impl PeerType {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Global,
            1 => Self::RdInstance,
            2 => Self::LocalInstance,
            3 => Self::LocRib,
            o => Self::Other(o),
        }
    }
}

/// The per-peer header: which peer, and which of its RIBs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerHeader {
    pub peer_type: PeerType,
    pub flags: u8,
    pub distinguisher: u64,
    pub address: IpAddr,
    pub asn: u32,
    pub bgp_id: Ipv4Addr,
    /// Seconds and microseconds when the router saw it (0 if not given).
    pub timestamp: (u32, u32),
}

impl PeerHeader {
    /// Whether the routes are after the router's import policy.
    pub fn post_policy(&self) -> bool {
        self.peer_type != PeerType::LocRib && self.flags & 0x40 != 0
    }

    /// Whether AS_PATHs use 2-byte ASNs (the A flag).
    pub fn two_byte_as(&self) -> bool {
        self.peer_type != PeerType::LocRib && self.flags & 0x20 != 0
    }

    /// The RIB in words: `Loc-RIB`, `pre-policy Adj-RIB-In` ...
    pub fn rib(&self) -> &'static str {
        match self.peer_type {
            PeerType::LocRib => "Loc-RIB",
            _ if self.post_policy() => "post-policy Adj-RIB-In",
            _ => "pre-policy Adj-RIB-In",
        }
    }

    /// The key a route is kept under (the timestamp left out).
    pub fn key(&self) -> PeerKey {
        PeerKey {
            peer_type: self.peer_type,
            distinguisher: self.distinguisher,
            address: self.address,
            post_policy: self.post_policy(),
            asn: self.asn,
        }
    }
}

/// One monitored RIB of one peer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerKey {
    pub peer_type: PeerType,
    pub distinguisher: u64,
    pub address: IpAddr,
    pub post_policy: bool,
    pub asn: u32,
}

impl fmt::Display for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.peer_type {
            PeerType::LocRib => write!(f, "Loc-RIB (AS{})", self.asn),
            _ => write!(
                f,
                "peer {} AS{} ({}-policy)",
                self.address,
                self.asn,
                if self.post_policy { "post" } else { "pre" }
            ),
        }
    }
}

/// The routes a BGP UPDATE carries (unicast only).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Update {
    pub announced: Vec<IpNet>,
    pub withdrawn: Vec<IpNet>,
    /// An empty UPDATE, or an empty MP_UNREACH_NLRI: End-of-RIB.
    pub end_of_rib: bool,
}

/// One decoded BMP message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Initiation {
        sys_name: Option<String>,
        sys_descr: Option<String>,
    },
    Termination {
        reason: String,
    },
    PeerUp {
        peer: PeerHeader,
        local_address: IpAddr,
        /// The router's own BGP identifier (from the OPEN it sent).
        local_bgp_id: Option<Ipv4Addr>,
    },
    PeerDown {
        peer: PeerHeader,
        reason: String,
    },
    RouteMonitoring {
        peer: PeerHeader,
        update: Update,
    },
    /// Statistics Report: not used.
    Statistics {
        peer: PeerHeader,
    },
    /// Route Mirroring: not used.
    Mirroring {
        peer: PeerHeader,
    },
    /// A message type this station does not know (skipped).
    Unknown {
        kind: u8,
    },
}

impl Message {
    /// The type name, for counters and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Initiation { .. } => "initiation",
            Self::Termination { .. } => "termination",
            Self::PeerUp { .. } => "peer_up",
            Self::PeerDown { .. } => "peer_down",
            Self::RouteMonitoring { .. } => "route_monitoring",
            Self::Statistics { .. } => "statistics",
            Self::Mirroring { .. } => "route_mirroring",
            Self::Unknown { .. } => "unknown",
        }
    }
}

/// A bounded reader that knows its stream offset.
struct Cur<'a> {
    buf: &'a [u8],
    pos: usize,
    base: u64,
}

impl<'a> Cur<'a> {
    fn new(buf: &'a [u8], base: u64) -> Self {
        Self { buf, pos: 0, base }
    }

    fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    fn left(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], BmpError> {
        if self.left() < n {
            return Err(BmpError::Truncated {
                offset: self.offset(),
                what,
                need: n,
                have: self.left(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// A sub-reader over the next `n` bytes.
    fn sub(&mut self, n: usize, what: &'static str) -> Result<Cur<'a>, BmpError> {
        let base = self.offset();
        let s = self.take(n, what)?;
        Ok(Cur::new(s, base))
    }

    fn rest(&mut self) -> Cur<'a> {
        let base = self.offset();
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        Cur::new(s, base)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, BmpError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, BmpError> {
        let mut s = self.take(2, what)?;
        Ok(s.get_u16())
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, BmpError> {
        let mut s = self.take(4, what)?;
        Ok(s.get_u32())
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, BmpError> {
        let mut s = self.take(8, what)?;
        Ok(s.get_u64())
    }

    fn invalid(&self, at: u64, what: &'static str, reason: impl Into<String>) -> BmpError {
        BmpError::Invalid {
            offset: at,
            what,
            reason: reason.into(),
        }
    }
}

/// Decodes one whole message (common header included) found at stream
/// offset `offset`.
pub fn decode(msg: &[u8], offset: u64) -> Result<Message, BmpError> {
    let mut c = Cur::new(msg, offset);
    let head = c.take(HEADER, "BMP common header")?;
    let len = message_len(offset, head)?;
    if len != msg.len() {
        return Err(BmpError::Invalid {
            offset: offset + 1,
            what: "BMP message length",
            reason: format!("declares {len} bytes, the message has {}", msg.len()),
        });
    }
    let kind = head[5];
    let mut body = c.rest();
    Ok(match kind {
        0 => {
            let peer = peer_header(&mut body)?;
            let update = bgp_update(&mut body)?;
            Message::RouteMonitoring { peer, update }
        }
        1 => Message::Statistics {
            peer: peer_header(&mut body)?,
        },
        2 => {
            let peer = peer_header(&mut body)?;
            let reason = peer_down_reason(&mut body)?;
            Message::PeerDown { peer, reason }
        }
        3 => peer_up(&mut body)?,
        4 => {
            let (mut sys_name, mut sys_descr) = (None, None);
            for (t, v) in tlvs(&mut body, "Initiation TLV")? {
                match t {
                    1 => sys_descr = Some(text(v)),
                    2 => sys_name = Some(text(v)),
                    _ => {}
                }
            }
            Message::Initiation {
                sys_name,
                sys_descr,
            }
        }
        5 => {
            let mut words = Vec::new();
            for (t, v) in tlvs(&mut body, "Termination TLV")? {
                match (t, v) {
                    (0, v) => words.push(text(v)),
                    (1, [a, b]) => words.push(
                        match u16::from_be_bytes([*a, *b]) {
                            0 => "session administratively closed",
                            1 => "unspecified reason",
                            2 => "out of resources",
                            3 => "redundant connection",
                            4 => "session permanently administratively closed",
                            _ => "unknown reason",
                        }
                        .to_owned(),
                    ),
                    _ => {}
                }
            }
            Message::Termination {
                reason: words.join("; "),
            }
        }
        6 => Message::Mirroring {
            peer: peer_header(&mut body)?,
        },
        kind => Message::Unknown { kind },
    })
}

fn text(v: &[u8]) -> String {
    String::from_utf8_lossy(&v[..v.len().min(MAX_TEXT)])
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Type-length-value entries to the end of `c`.
fn tlvs<'a>(c: &mut Cur<'a>, what: &'static str) -> Result<Vec<(u16, &'a [u8])>, BmpError> {
    let mut out = Vec::new();
    while c.left() > 0 {
        let t = c.u16(what)?;
        let n = c.u16(what)?;
        out.push((t, c.take(usize::from(n), what)?));
    }
    Ok(out)
}

fn peer_header(c: &mut Cur<'_>) -> Result<PeerHeader, BmpError> {
    let mut h = c.sub(PEER_HEADER, "per-peer header")?;
    let peer_type = PeerType::from_u8(h.u8("peer type")?);
    let flags = h.u8("peer flags")?;
    let distinguisher = h.u64("peer distinguisher")?;
    let a = h.take(16, "peer address")?;
    let mut b = [0u8; 16];
    b.copy_from_slice(a);
    let v6 = peer_type != PeerType::LocRib && flags & 0x80 != 0;
    let address = if v6 {
        IpAddr::V6(Ipv6Addr::from(b))
    } else {
        IpAddr::V4(Ipv4Addr::new(b[12], b[13], b[14], b[15]))
    };
    let asn = h.u32("peer AS")?;
    let bgp_id = Ipv4Addr::from(h.u32("peer BGP ID")?);
    let secs = h.u32("timestamp")?;
    let usecs = h.u32("timestamp")?;
    Ok(PeerHeader {
        peer_type,
        flags,
        distinguisher,
        address,
        asn,
        bgp_id,
        timestamp: (secs, usecs),
    })
}

fn peer_down_reason(c: &mut Cur<'_>) -> Result<String, BmpError> {
    let at = c.offset();
    let code = c.u8("Peer Down reason")?;
    Ok(match code {
        1 => "the router closed the session with a NOTIFICATION".to_owned(),
        2 => "the router closed the session (no NOTIFICATION)".to_owned(),
        3 => "the peer closed the session with a NOTIFICATION".to_owned(),
        4 => "the peer closed the session (no NOTIFICATION)".to_owned(),
        5 => "peer de-configured (monitoring stopped)".to_owned(),
        6 => "Loc-RIB no longer monitored".to_owned(),
        0 => return Err(c.invalid(at, "Peer Down reason", "reason code 0 is reserved")),
        n => format!("reason code {n}"),
    })
}

fn peer_up(c: &mut Cur<'_>) -> Result<Message, BmpError> {
    let peer = peer_header(c)?;
    let a = c.take(16, "Peer Up local address")?;
    let mut b = [0u8; 16];
    b.copy_from_slice(a);
    let v6 = peer.peer_type != PeerType::LocRib && peer.flags & 0x80 != 0;
    let local_address = if v6 {
        IpAddr::V6(Ipv6Addr::from(b))
    } else {
        IpAddr::V4(Ipv4Addr::new(b[12], b[13], b[14], b[15]))
    };
    c.take(4, "Peer Up ports")?;
    // The OPEN the router sent: marker, length, type 1, version, AS, hold
    // time, BGP identifier. (A Loc-RIB Peer Up may carry a fabricated one.)
    let mut local_bgp_id = None;
    if c.left() > 0 {
        let at = c.offset();
        let marker = c.take(16, "sent OPEN marker")?;
        if marker.iter().any(|&b| b != 0xff) {
            return Err(c.invalid(at, "sent OPEN", "BGP marker is not 16 bytes of 0xff"));
        }
        let len_at = c.offset();
        let len = usize::from(c.u16("sent OPEN length")?);
        if len < 29 {
            return Err(c.invalid(len_at, "sent OPEN", format!("length {len} < 29")));
        }
        let mut open = c.sub(len - 18, "sent OPEN")?;
        let t_at = open.offset();
        if open.u8("sent OPEN type")? != 1 {
            return Err(open.invalid(t_at, "sent OPEN", "not an OPEN message"));
        }
        open.take(5, "sent OPEN")?;
        local_bgp_id = Some(Ipv4Addr::from(open.u32("sent OPEN BGP identifier")?));
        // The received OPEN and information TLVs are not needed.
    }
    Ok(Message::PeerUp {
        peer,
        local_address,
        local_bgp_id,
    })
}

/// A BGP UPDATE as Route Monitoring carries it.
fn bgp_update(c: &mut Cur<'_>) -> Result<Update, BmpError> {
    let at = c.offset();
    let marker = c.take(16, "BGP marker")?;
    if marker.iter().any(|&b| b != 0xff) {
        return Err(c.invalid(at, "BGP message", "marker is not 16 bytes of 0xff"));
    }
    let len_at = c.offset();
    let len = usize::from(c.u16("BGP length")?);
    if len < 23 || len - 18 != c.left() {
        return Err(c.invalid(
            len_at,
            "BGP length",
            format!(
                "declares {len} bytes, {} are left in the BMP message (an UPDATE has at least 23)",
                c.left() + 18
            ),
        ));
    }
    let t_at = c.offset();
    let t = c.u8("BGP type")?;
    if t != 2 {
        return Err(c.invalid(
            t_at,
            "BGP type",
            format!("Route Monitoring carries an UPDATE (2), got type {t}"),
        ));
    }
    let mut u = Update::default();
    let wlen = usize::from(c.u16("withdrawn routes length")?);
    let mut w = c.sub(wlen, "withdrawn routes")?;
    while w.left() > 0 {
        u.withdrawn.push(prefix(&mut w, false)?);
    }
    let alen = usize::from(c.u16("path attributes length")?);
    let mut attrs = c.sub(alen, "path attributes")?;
    let mut empty_unreach = false;
    let mut any_attr = false;
    while attrs.left() > 0 {
        any_attr = true;
        let flags = attrs.u8("attribute flags")?;
        let code = attrs.u8("attribute type")?;
        let n = if flags & 0x10 != 0 {
            usize::from(attrs.u16("attribute length")?)
        } else {
            usize::from(attrs.u8("attribute length")?)
        };
        let mut a = attrs.sub(n, "attribute value")?;
        match code {
            14 => {
                let afi = a.u16("MP_REACH_NLRI AFI")?;
                let safi = a.u8("MP_REACH_NLRI SAFI")?;
                let nh = usize::from(a.u8("MP_REACH_NLRI next hop length")?);
                a.take(nh, "MP_REACH_NLRI next hop")?;
                a.u8("MP_REACH_NLRI reserved byte")?;
                if let Some(v6) = unicast(afi, safi) {
                    while a.left() > 0 {
                        u.announced.push(prefix(&mut a, v6)?);
                    }
                }
            }
            15 => {
                let afi = a.u16("MP_UNREACH_NLRI AFI")?;
                let safi = a.u8("MP_UNREACH_NLRI SAFI")?;
                empty_unreach = a.left() == 0;
                if let Some(v6) = unicast(afi, safi) {
                    while a.left() > 0 {
                        u.withdrawn.push(prefix(&mut a, v6)?);
                    }
                }
            }
            _ => {}
        }
    }
    let mut nlri = c.rest();
    let had_nlri = nlri.left() > 0;
    while nlri.left() > 0 {
        u.announced.push(prefix(&mut nlri, false)?);
    }
    u.end_of_rib = (wlen == 0 && !any_attr && !had_nlri) || (empty_unreach && !had_nlri);
    Ok(u)
}

/// `Some(is_v6)` for IPv4 and IPv6 unicast.
fn unicast(afi: u16, safi: u8) -> Option<bool> {
    match (afi, safi) {
        (1, 1) => Some(false),
        (2, 1) => Some(true),
        _ => None,
    }
}

/// One NLRI prefix: a length in bits and as many bytes as it needs.
fn prefix(c: &mut Cur<'_>, v6: bool) -> Result<IpNet, BmpError> {
    let at = c.offset();
    let bits = c.u8("prefix length")?;
    let max = if v6 { 128 } else { 32 };
    if bits > max {
        return Err(c.invalid(
            at,
            "prefix length",
            format!(
                "/{bits} is longer than an IPv{} prefix can be",
                if v6 { 6 } else { 4 }
            ),
        ));
    }
    let bytes = c.take(usize::from(bits).div_ceil(8), "prefix")?;
    let net = if v6 {
        let mut b = [0u8; 16];
        b[..bytes.len()].copy_from_slice(bytes);
        Ipv6Net::new(Ipv6Addr::from(b), bits)
            .map(|n| IpNet::V6(n.trunc()))
            .map_err(|e| e.to_string())
    } else {
        let mut b = [0u8; 4];
        b[..bytes.len()].copy_from_slice(bytes);
        Ipv4Net::new(Ipv4Addr::from(b), bits)
            .map(|n| IpNet::V4(n.trunc()))
            .map_err(|e| e.to_string())
    };
    net.map_err(|e| c.invalid(at, "prefix", e))
}

// ---------------------------------------------------------------------------
// The route state of one monitored router.
// ---------------------------------------------------------------------------

/// The last change of a watched prefix at a router.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub announced: bool,
    /// Who: a peer and RIB, or the session.
    pub by: String,
    pub at_ms: i64,
    /// Why, for a loss: `withdrawn`, `peer down: ...`.
    pub why: String,
}

/// Counts of what a session received.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub messages: u64,
    pub by_kind: BTreeMap<&'static str, u64>,
    pub announced: u64,
    pub withdrawn: u64,
}

/// What one router has said over one BMP session, about watched prefixes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Session {
    pub sys_name: Option<String>,
    pub sys_descr: Option<String>,
    /// The router's own BGP identifier, from a Loc-RIB per-peer header or
    /// the OPEN of a Peer Up.
    pub bgp_id: Option<Ipv4Addr>,
    /// Monitored peers that are up (a Peer Up seen, no Peer Down since).
    pub peers_up: BTreeSet<PeerKey>,
    /// Watched prefix → the peers (RIBs) that have a route for it.
    routes: BTreeMap<IpNet, BTreeSet<PeerKey>>,
    /// Watched prefix → its last change.
    pub last: BTreeMap<IpNet, Change>,
    /// Whether the router's initial table has been seen: an End-of-RIB, or
    /// a watched prefix announced. Until then a missing prefix may be one
    /// not sent yet.
    pub synced: bool,
    pub counts: Counts,
    /// A Termination's reason.
    pub terminated: Option<String>,
}

impl Session {
    /// Takes in one message received at `at_ms`; `watched` are the
    /// prefixes to keep. Says whether a watched prefix changed state.
    pub fn apply(&mut self, msg: &Message, at_ms: i64, watched: &BTreeSet<IpNet>) -> bool {
        self.counts.messages += 1;
        *self.counts.by_kind.entry(msg.kind()).or_default() += 1;
        match msg {
            Message::Initiation {
                sys_name,
                sys_descr,
            } => {
                self.sys_name.clone_from(sys_name);
                self.sys_descr.clone_from(sys_descr);
                false
            }
            Message::Termination { reason } => {
                self.terminated = Some(reason.clone());
                false
            }
            Message::PeerUp {
                peer, local_bgp_id, ..
            } => {
                if self.bgp_id.is_none() {
                    self.bgp_id = *local_bgp_id;
                }
                self.peers_up.insert(peer.key());
                false
            }
            Message::PeerDown { peer, reason } => {
                let key = peer.key();
                self.peers_up.remove(&key);
                let mut changed = false;
                for (p, peers) in &mut self.routes {
                    if peers.remove(&key) && peers.is_empty() {
                        self.last.insert(
                            *p,
                            Change {
                                announced: false,
                                by: key.to_string(),
                                at_ms,
                                why: format!("peer down: {reason}"),
                            },
                        );
                        changed = true;
                    }
                }
                changed
            }
            Message::RouteMonitoring { peer, update } => {
                if peer.peer_type == PeerType::LocRib && self.bgp_id.is_none() {
                    self.bgp_id = Some(peer.bgp_id);
                }
                if update.end_of_rib {
                    self.synced = true;
                }
                self.counts.announced += update.announced.len() as u64;
                self.counts.withdrawn += update.withdrawn.len() as u64;
                let key = peer.key();
                let mut changed = false;
                for p in update.withdrawn.iter().filter(|p| watched.contains(p)) {
                    let peers = self.routes.entry(*p).or_default();
                    if peers.remove(&key) && peers.is_empty() {
                        self.last.insert(
                            *p,
                            Change {
                                announced: false,
                                by: key.to_string(),
                                at_ms,
                                why: "withdrawn".to_owned(),
                            },
                        );
                        changed = true;
                    }
                }
                for p in update.announced.iter().filter(|p| watched.contains(p)) {
                    self.synced = true;
                    let peers = self.routes.entry(*p).or_default();
                    let was = !peers.is_empty();
                    peers.insert(key.clone());
                    if !was {
                        self.last.insert(
                            *p,
                            Change {
                                announced: true,
                                by: key.to_string(),
                                at_ms,
                                why: String::new(),
                            },
                        );
                        changed = true;
                    }
                }
                changed
            }
            Message::Statistics { .. } | Message::Mirroring { .. } | Message::Unknown { .. } => {
                false
            }
        }
    }

    /// Whether some monitored RIB has a route for `prefix`.
    pub fn announces(&self, prefix: &IpNet) -> bool {
        self.routes.get(prefix).is_some_and(|p| !p.is_empty())
    }

    /// Who has a route for `prefix`.
    pub fn announced_by(&self, prefix: &IpNet) -> impl Iterator<Item = &PeerKey> {
        self.routes.get(prefix).into_iter().flatten()
    }

    /// Forgets routes of prefixes no longer watched.
    pub fn retain(&mut self, watched: &BTreeSet<IpNet>) {
        self.routes.retain(|p, _| watched.contains(p));
        self.last.retain(|p, _| watched.contains(p));
    }
}

pub mod write;

#[cfg(test)]
mod tests;
