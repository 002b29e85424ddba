//! Synthetic MRT RIB dumps for benches and tests: RFC 6396 TABLE_DUMP_V2
//! records (a peer index table, then one RIB record per prefix with ORIGIN,
//! AS_PATH and, for IPv4, NEXT_HOP), with a full table's shape (mostly
//! IPv4 /24s, IPv6 /32 to /48) and random origins, streamed to a writer.
//! Deterministic: the same sizes give the same dump.

use std::io::Write;

/// xorshift64*: deterministic, fast.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn record(out: &mut Vec<u8>, subtype: u16, body: &[u8]) {
    out.extend_from_slice(&1_700_000_000u32.to_be_bytes());
    out.extend_from_slice(&13u16.to_be_bytes());
    out.extend_from_slice(&subtype.to_be_bytes());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
}

fn peer_table(peers: u16) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&[192, 0, 2, 1]);
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&peers.to_be_bytes());
    for p in 0..peers {
        // IPv4 peer address, 4-byte AS.
        b.push(0b10);
        b.extend_from_slice(&[192, 0, 2, p as u8]);
        b.extend_from_slice(&[192, 0, 2, p as u8]);
        b.extend_from_slice(&(65000 + u32::from(p)).to_be_bytes());
    }
    b
}

fn attributes(path: &[u32], v6: bool) -> Vec<u8> {
    let mut a = vec![0x40, 1, 1, 0];
    let seg_len = 2 + 4 * path.len();
    a.extend_from_slice(&[0x40, 2, seg_len as u8, 2, path.len() as u8]);
    for asn in path {
        a.extend_from_slice(&asn.to_be_bytes());
    }
    if !v6 {
        a.extend_from_slice(&[0x40, 3, 4, 192, 0, 2, 1]);
    }
    a
}

fn rib_record(
    seq: u32,
    addr: &[u8],
    len: u8,
    origin: u32,
    peers: u16,
    rng: &mut Rng,
) -> (u16, Vec<u8>) {
    let v6 = addr.len() == 16;
    let mut b = Vec::with_capacity(64);
    b.extend_from_slice(&seq.to_be_bytes());
    b.push(len);
    b.extend_from_slice(&addr[..usize::from(len).div_ceil(8)]);
    b.extend_from_slice(&peers.to_be_bytes());
    for p in 0..peers {
        let transit = 64000 + (rng.next_u64() % 500) as u32;
        let attrs = attributes(&[65000 + u32::from(p), transit, origin], v6);
        b.extend_from_slice(&p.to_be_bytes());
        b.extend_from_slice(&1_700_000_000u32.to_be_bytes());
        b.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
        b.extend_from_slice(&attrs);
    }
    (if v6 { 4 } else { 2 }, b)
}

/// What a dump holds.
#[derive(Debug, Clone)]
pub struct Spec {
    pub v4: usize,
    pub v6: usize,
    /// Peers per prefix (each RIB record has one entry per peer).
    pub peers: u16,
    /// Origins are drawn from 1..=origins.
    pub origins: u32,
}

/// Writes a dump of `spec` to `path`; returns its IPv4 prefixes (address,
/// length) and its size in bytes.
pub fn write(path: &std::path::Path, spec: &Spec) -> std::io::Result<(Vec<(u32, u8)>, u64)> {
    let (n4, n6, peers) = (spec.v4, spec.v6, spec.peers.max(1));
    let mut rng = Rng(0x5eed_cafe_f00d_0001);
    // Distinct prefixes, mostly /24s as in the real table.
    let mut v4: Vec<(u32, u8)> = Vec::with_capacity(n4 + n4 / 8);
    while v4.len() < n4 + n4 / 8 {
        let r = rng.next_u64();
        let len = match r % 100 {
            0..=59 => 24,
            60..=74 => 23,
            75..=84 => 22,
            85..=94 => 20 + (r >> 8) as u8 % 2,
            _ => 16 + (r >> 8) as u8 % 4,
        };
        let a = (r >> 32) as u32 & (u32::MAX << (32 - len));
        // Keep out of 0/8, 127/8, multicast and above.
        if (1..224).contains(&(a >> 24)) && a >> 24 != 127 {
            v4.push((a, len));
        }
    }
    v4.sort_unstable();
    v4.dedup();
    v4.truncate(n4);
    let mut v6: Vec<(u128, u8)> = Vec::with_capacity(n6 + n6 / 8);
    while v6.len() < n6 + n6 / 8 {
        let r = rng.next_u64();
        let len = [32u8, 40, 44, 48, 48, 48][(r % 6) as usize];
        let hi = 0x2000u128 | (u128::from(r >> 48) & 0x0fff);
        let a = (hi << 112 | u128::from(rng.next_u64()) << 48) & (u128::MAX << (128 - len));
        v6.push((a, len));
    }
    v6.sort_unstable();
    v6.dedup();
    v6.truncate(n6);

    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut buf = Vec::with_capacity(1 << 20);
    record(&mut buf, 1, &peer_table(peers));
    let mut seq = 0u32;
    for &(a, l) in &v4 {
        let origin = 1 + (rng.next_u64() % u64::from(spec.origins.max(1))) as u32;
        let (subtype, body) = rib_record(seq, &a.to_be_bytes(), l, origin, peers, &mut rng);
        record(&mut buf, subtype, &body);
        seq += 1;
        if buf.len() > 1 << 20 {
            file.write_all(&buf)?;
            buf.clear();
        }
    }
    for &(a, l) in &v6 {
        let origin = 1 + (rng.next_u64() % u64::from(spec.origins.max(1))) as u32;
        let (subtype, body) = rib_record(seq, &a.to_be_bytes(), l, origin, peers, &mut rng);
        record(&mut buf, subtype, &body);
        seq += 1;
        if buf.len() > 1 << 20 {
            file.write_all(&buf)?;
            buf.clear();
        }
    }
    file.write_all(&buf)?;
    file.flush()?;
    let size = std::fs::metadata(path)?.len();
    Ok((v4, size))
}
