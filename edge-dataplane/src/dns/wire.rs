//! DNS wire handling for the UDP fast path: a bounds-checked scan of a
//! query (header, questions, records, the OPT record and its ECS option)
//! and a response writer that copies the question and appends answers
//! prepared when the config arrived. No allocation per query.
//!
//! The scan is also the one place that validates ECS (RFC 7871 §6: wrong
//! address length, bits set beyond the source prefix, unknown family →
//! FORMERR) for every transport, since hickory's decoder is lenient there.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::table::{Answer, Rcode, Resolution, Tables};

/// Largest UDP response we send (DNS flag day 2020).
pub const MAX_UDP: usize = 1232;
/// EDNS option code of Client Subnet.
const OPT_ECS: u16 = 8;
const TYPE_OPT: u16 = 41;

/// An ECS option, validated; `addr` has no bits beyond `source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ecs {
    pub source: u8,
    pub scope: u8,
    pub addr: IpAddr,
}

impl Ecs {
    pub fn family(&self) -> u16 {
        match self.addr {
            IpAddr::V4(_) => 1,
            IpAddr::V6(_) => 2,
        }
    }
}

/// The OPT record of a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edns {
    pub udp_size: u16,
    pub version: u8,
    pub dnssec_ok: bool,
    pub ecs: Option<Ecs>,
}

/// What the scan learned.
#[derive(Debug, Clone, Copy)]
pub struct Scan {
    pub id: u16,
    /// The second 16 bits of the header.
    pub flags: u16,
    pub qdcount: u16,
    /// End of the first question (0 when there is none).
    pub question_end: usize,
    /// Length of the first question's name in the caller's buffer
    /// (lowercase wire form); 0 when it is compressed or absent.
    pub qname_len: usize,
    pub qtype: u16,
    pub qclass: u16,
    pub edns: Option<Edns>,
    /// The hot shape: one uncompressed question, no answer or authority
    /// records, at most one additional record (the OPT), nothing after it.
    pub simple: bool,
}

impl Scan {
    pub fn opcode(&self) -> u8 {
        ((self.flags >> 11) & 0xf) as u8
    }

    pub fn max_udp(&self) -> usize {
        match self.edns {
            Some(e) => usize::from(e.udp_size).clamp(512, MAX_UDP),
            None => 512,
        }
    }
}

/// Why a packet is not answered normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanError {
    /// Not worth an answer: shorter than a header, or a response.
    Drop,
    /// Malformed: answer FORMERR.
    FormErr,
}

#[inline]
fn u16_at(raw: &[u8], i: usize) -> Result<u16, ScanError> {
    match raw.get(i..i + 2) {
        Some(b) => Ok(u16::from_be_bytes([b[0], b[1]])),
        None => Err(ScanError::FormErr),
    }
}

/// Skips a (possibly compressed) name; returns the offset after it.
fn skip_name(raw: &[u8], mut i: usize) -> Result<usize, ScanError> {
    let mut total = 0usize;
    loop {
        let len = *raw.get(i).ok_or(ScanError::FormErr)?;
        match len & 0xc0 {
            0x00 if len == 0 => return Ok(i + 1),
            0x00 => {
                total += usize::from(len) + 1;
                if total > 255 {
                    return Err(ScanError::FormErr);
                }
                i += 1 + usize::from(len);
            }
            0xc0 => {
                raw.get(i + 1).ok_or(ScanError::FormErr)?;
                return Ok(i + 2);
            }
            _ => return Err(ScanError::FormErr),
        }
    }
}

/// Reads the first question's name lowercased into `name`; returns the
/// offset after it and the name's length (0 if it uses compression).
fn read_qname(raw: &[u8], name: &mut [u8; 256]) -> Result<(usize, usize), ScanError> {
    let mut i = 12;
    let mut n = 0usize;
    loop {
        let len = *raw.get(i).ok_or(ScanError::FormErr)?;
        if len == 0 {
            name[n] = 0;
            return Ok((i + 1, n + 1));
        }
        if len & 0xc0 == 0xc0 {
            // Compression in a question: legal but unusual; the general
            // path handles it.
            raw.get(i + 1).ok_or(ScanError::FormErr)?;
            return Ok((i + 2, 0));
        }
        if len & 0xc0 != 0 {
            return Err(ScanError::FormErr);
        }
        let l = usize::from(len);
        if n + l + 2 > 255 {
            return Err(ScanError::FormErr);
        }
        let label = raw.get(i + 1..i + 1 + l).ok_or(ScanError::FormErr)?;
        name[n] = len;
        for (d, s) in name[n + 1..n + 1 + l].iter_mut().zip(label) {
            *d = s.to_ascii_lowercase();
        }
        n += 1 + l;
        i += 1 + l;
    }
}

fn parse_ecs(data: &[u8]) -> Result<Ecs, ScanError> {
    if data.len() < 4 {
        return Err(ScanError::FormErr);
    }
    let family = u16::from_be_bytes([data[0], data[1]]);
    let source = data[2];
    let scope = data[3];
    let bytes = &data[4..];
    let max = match family {
        1 => 32,
        2 => 128,
        _ => return Err(ScanError::FormErr),
    };
    if source > max || bytes.len() != usize::from(source).div_ceil(8) {
        return Err(ScanError::FormErr);
    }
    // No bits beyond the source prefix.
    if let Some(last) = bytes.last() {
        let used = source % 8;
        if used != 0 && last & (0xffu8 >> used) != 0 {
            return Err(ScanError::FormErr);
        }
    }
    let addr = if family == 1 {
        let mut o = [0u8; 4];
        o[..bytes.len()].copy_from_slice(bytes);
        IpAddr::V4(Ipv4Addr::from(o))
    } else {
        let mut o = [0u8; 16];
        o[..bytes.len()].copy_from_slice(bytes);
        IpAddr::V6(Ipv6Addr::from(o))
    };
    Ok(Ecs {
        source,
        scope,
        addr,
    })
}

fn parse_opt(raw: &[u8], i: usize) -> Result<(Edns, usize), ScanError> {
    // Owner must be the root; type already checked by the caller.
    if raw.get(i) != Some(&0) {
        return Err(ScanError::FormErr);
    }
    let udp_size = u16_at(raw, i + 3)?;
    let ext = raw.get(i + 5..i + 9).ok_or(ScanError::FormErr)?;
    let rdlen = usize::from(u16_at(raw, i + 9)?);
    let start = i + 11;
    let data = raw.get(start..start + rdlen).ok_or(ScanError::FormErr)?;
    let mut edns = Edns {
        udp_size,
        version: ext[1],
        dnssec_ok: ext[2] & 0x80 != 0,
        ecs: None,
    };
    let mut j = 0;
    while j < data.len() {
        let code = u16_at(data, j)?;
        let len = usize::from(u16_at(data, j + 2)?);
        let value = data.get(j + 4..j + 4 + len).ok_or(ScanError::FormErr)?;
        if code == OPT_ECS {
            if edns.ecs.is_some() {
                return Err(ScanError::FormErr);
            }
            edns.ecs = Some(parse_ecs(value)?);
        }
        j += 4 + len;
    }
    Ok((edns, start + rdlen))
}

/// Scans a query. `name` receives the first question's name, lowercased.
pub fn scan(raw: &[u8], name: &mut [u8; 256]) -> Result<Scan, ScanError> {
    if raw.len() < 12 {
        return Err(ScanError::Drop);
    }
    let flags = u16::from_be_bytes([raw[2], raw[3]]);
    if flags & 0x8000 != 0 {
        // A response: never answer one (reflection loops).
        return Err(ScanError::Drop);
    }
    let count = |k: usize| u16::from_be_bytes([raw[4 + 2 * k], raw[5 + 2 * k]]);
    let (qd, an, ns, ar) = (count(0), count(1), count(2), count(3));
    let mut s = Scan {
        id: u16::from_be_bytes([raw[0], raw[1]]),
        flags,
        qdcount: qd,
        question_end: 0,
        qname_len: 0,
        qtype: 0,
        qclass: 0,
        edns: None,
        simple: false,
    };
    let mut i = 12;
    for q in 0..qd {
        if q == 0 {
            let (end, len) = read_qname(raw, name)?;
            i = end;
            s.qname_len = len;
            s.qtype = u16_at(raw, i)?;
            s.qclass = u16_at(raw, i + 2)?;
            i += 4;
            s.question_end = i;
        } else {
            i = skip_name(raw, i)?;
            u16_at(raw, i + 2)?;
            i += 4;
        }
    }
    for _ in 0..u32::from(an) + u32::from(ns) {
        i = skip_name(raw, i)?;
        let rdlen = usize::from(u16_at(raw, i + 8)?);
        i += 10 + rdlen;
        if i > raw.len() {
            return Err(ScanError::FormErr);
        }
    }
    for _ in 0..ar {
        let end = skip_name(raw, i)?;
        if u16_at(raw, end)? == TYPE_OPT {
            if s.edns.is_some() {
                // RFC 6891 §6.1.1: more than one OPT is FORMERR.
                return Err(ScanError::FormErr);
            }
            let (edns, next) = parse_opt(raw, i)?;
            s.edns = Some(edns);
            i = next;
        } else {
            let rdlen = usize::from(u16_at(raw, end + 8)?);
            i = end + 10 + rdlen;
            if i > raw.len() {
                return Err(ScanError::FormErr);
            }
        }
    }
    s.simple = qd == 1
        && an == 0
        && ns == 0
        && (ar == 0 || (ar == 1 && s.edns.is_some()))
        && s.qname_len > 0
        && i == raw.len()
        && s.opcode() == 0;
    Ok(s)
}

/// Writes the response header for `scan` (QR, opcode, RD and CD copied).
fn header(out: &mut Vec<u8>, scan: &Scan, rcode: Rcode, aa: bool) {
    let mut flags = 0x8000 | (scan.flags & 0x7800) | (scan.flags & 0x0100) | (scan.flags & 0x0010);
    if aa {
        flags |= 0x0400;
    }
    flags |= rcode.code() & 0xf;
    out.extend_from_slice(&scan.id.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&[0; 8]);
}

fn set_count(out: &mut [u8], k: usize, v: u16) {
    out[4 + 2 * k..6 + 2 * k].copy_from_slice(&v.to_be_bytes());
}

/// The response OPT record (ECS echoed with `scope`).
fn opt(out: &mut Vec<u8>, edns: &Edns, rcode: Rcode, scope: u8) {
    out.push(0);
    out.extend_from_slice(&TYPE_OPT.to_be_bytes());
    out.extend_from_slice(&(MAX_UDP as u16).to_be_bytes());
    out.push((rcode.code() >> 4) as u8);
    out.push(0);
    out.extend_from_slice(&[if edns.dnssec_ok { 0x80 } else { 0 }, 0]);
    match edns.ecs {
        Some(ecs) => {
            let n = usize::from(ecs.source).div_ceil(8);
            out.extend_from_slice(&((8 + n) as u16).to_be_bytes());
            out.extend_from_slice(&OPT_ECS.to_be_bytes());
            out.extend_from_slice(&((4 + n) as u16).to_be_bytes());
            out.extend_from_slice(&ecs.family().to_be_bytes());
            out.push(ecs.source);
            out.push(scope);
            match ecs.addr {
                IpAddr::V4(a) => out.extend_from_slice(&a.octets()[..n]),
                IpAddr::V6(a) => out.extend_from_slice(&a.octets()[..n]),
            }
        }
        None => out.extend_from_slice(&[0, 0]),
    }
}

/// Writes the response to a simple query from its resolution. Returns
/// false (and leaves `out` undefined) when the resolution needs records
/// this writer does not prepare (the general path then answers).
pub fn write(
    out: &mut Vec<u8>,
    raw: &[u8],
    scan: &Scan,
    res: &Resolution,
    tables: &Tables,
) -> bool {
    out.clear();
    header(out, scan, res.rcode, res.authoritative);
    out.extend_from_slice(&raw[12..scan.question_end]);
    set_count(out, 0, 1);
    let mut answers = 0u16;
    match res.answer {
        Answer::None => {}
        Answer::Steered {
            service,
            family,
            route,
            picks,
            count,
        } => {
            for p in tables.steered(service, family, route, &picks[..usize::from(count)]) {
                out.extend_from_slice(&p.wire);
                answers += p.rr_count;
            }
        }
        Answer::Soa | Answer::Ns => return false,
    }
    set_count(out, 1, answers);
    if let Some(z) = res.soa_zone {
        let zone = &tables.zones[z as usize];
        // The owner is the zone: a suffix of the question name.
        let Some(off) = (12 + scan.qname_len).checked_sub(zone.wire.len()) else {
            return false;
        };
        out.extend_from_slice(&(0xc000u16 | off as u16).to_be_bytes());
        out.extend_from_slice(&zone.soa_tail);
        set_count(out, 2, 1);
    }
    if let Some(edns) = &scan.edns {
        opt(out, edns, res.rcode, res.scope);
        set_count(out, 3, 1);
    }
    if out.len() > scan.max_udp() {
        truncated(out, scan, res);
    }
    true
}

/// Replaces the response with an empty one that has TC set: the client
/// retries over TCP.
fn truncated(out: &mut Vec<u8>, scan: &Scan, res: &Resolution) {
    out.truncate(scan.question_end);
    out[2] |= 0x02;
    set_count(out, 1, 0);
    set_count(out, 2, 0);
    set_count(out, 3, 0);
    if let Some(edns) = &scan.edns {
        opt(out, edns, res.rcode, res.scope);
        set_count(out, 3, 1);
    }
}

/// A header-only error response (FORMERR for packets that cannot be
/// parsed): id, opcode and RD copied from whatever header there is.
pub fn write_error(out: &mut Vec<u8>, raw: &[u8], rcode: Rcode) {
    out.clear();
    let flags = raw
        .get(2..4)
        .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
    let id = raw
        .get(0..2)
        .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
    let scan = Scan {
        id,
        flags,
        qdcount: 0,
        question_end: 12,
        qname_len: 0,
        qtype: 0,
        qclass: 0,
        edns: None,
        simple: false,
    };
    header(out, &scan, rcode, false);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query like dnsperf's and dig's.
    pub fn query(name: &str, qtype: u16, ecs: Option<(u8, &[u8], u8)>) -> Vec<u8> {
        let mut m = vec![
            0x12,
            0x34,
            0x01,
            0x00,
            0,
            1,
            0,
            0,
            0,
            0,
            0,
            u8::from(ecs.is_some()),
        ];
        for l in name.split('.').filter(|l| !l.is_empty()) {
            m.push(l.len() as u8);
            m.extend_from_slice(l.as_bytes());
        }
        m.push(0);
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&[0, 1]);
        if let Some((family, addr, source)) = ecs {
            let opt_data_len = 4 + addr.len();
            m.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0]);
            m.extend_from_slice(&((4 + opt_data_len) as u16).to_be_bytes());
            m.extend_from_slice(&[0, 8]);
            m.extend_from_slice(&(opt_data_len as u16).to_be_bytes());
            m.extend_from_slice(&[0, family, source, 0]);
            m.extend_from_slice(addr);
        }
        m
    }

    #[test]
    fn scans_the_hot_shape() {
        let mut name = [0u8; 256];
        let q = query("WWW.Example.test", 1, Some((1, &[10, 1, 2], 24)));
        let s = scan(&q, &mut name).expect("scan");
        assert!(s.simple);
        assert_eq!(&name[..s.qname_len], b"\x03www\x07example\x04test\x00");
        assert_eq!(s.qtype, 1);
        let ecs = s.edns.and_then(|e| e.ecs).expect("ecs");
        assert_eq!(ecs.addr, IpAddr::from([10, 1, 2, 0]));
        assert_eq!(ecs.source, 24);
        assert_eq!(s.max_udp(), 1232);
    }

    #[test]
    fn bad_ecs_is_formerr() {
        let mut name = [0u8; 256];
        // Too many address octets for /16.
        let q = query("www.example.test", 1, Some((1, &[10, 1, 2], 16)));
        assert_eq!(scan(&q, &mut name).err(), Some(ScanError::FormErr));
        // Bits beyond the source prefix.
        let q = query("www.example.test", 1, Some((1, &[10, 1, 3], 23)));
        assert_eq!(scan(&q, &mut name).err(), Some(ScanError::FormErr));
        // Source longer than the family.
        let q = query("www.example.test", 1, Some((1, &[10, 1, 3, 4, 5], 40)));
        assert_eq!(scan(&q, &mut name).err(), Some(ScanError::FormErr));
        // Unknown family.
        let q = query("www.example.test", 1, Some((3, &[10], 8)));
        assert_eq!(scan(&q, &mut name).err(), Some(ScanError::FormErr));
        // Truncated packets.
        let q = query("www.example.test", 1, Some((1, &[10, 1, 2], 24)));
        for cut in 12..q.len() {
            assert_eq!(
                scan(&q[..cut], &mut name).err(),
                Some(ScanError::FormErr),
                "cut at {cut}"
            );
        }
        assert_eq!(scan(&q[..11], &mut name).err(), Some(ScanError::Drop));
    }
}
