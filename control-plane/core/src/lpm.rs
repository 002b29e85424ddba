//! Longest-prefix match over client prefixes, with the ECS scope of each
//! answer.
//!
//! A multibit trie with controlled prefix expansion: a root table indexed by
//! the first 16 bits of the address, then child tables of 8 bits. Every
//! entry is either a leaf (the group slot and its scope) or a child table.
//! A lookup visits at most 3 tables for IPv4 (16-8-8) and stops at the first
//! leaf, so its cost does not depend on how many prefixes the table holds.
//!
//! Child tables are stored run-length compressed (as in Poptrie): a 256-bit
//! map of where a new run of equal entries starts, and the runs' values.
//! Entry i is the value of run popcount(map[..=i]). With a million random
//! /24s this keeps the IPv4 tables near 10 MB instead of 64 MB, which keeps
//! them in cache and the lookup as cheap as with a thousand prefixes.
//!
//! The scope of a leaf is the length of the largest aligned block around the
//! address in which every address maps to the same group: the
//! SCOPE PREFIX-LENGTH of RFC 7871 that lets a resolver reuse the answer for
//! exactly the clients that would get the same one. For an address in
//! `10.1.0.0/16` with nothing more specific inside it, that is 16; for an
//! address that matches no prefix, it is the depth at which it leaves every
//! prefix (0 when the table is empty). It is computed once, when the table
//! is built.

/// Marks an entry as a child table (the low bits are its index).
const NODE: u32 = 1 << 31;
/// The largest group slot a leaf can hold.
pub const MAX_SLOT: u32 = (1 << 23) - 1;
const MIXED: u32 = u32::MAX;

/// A built, read-only table. Slot 0 means "no prefix matched".
#[derive(Debug, Clone)]
pub struct Lpm {
    /// Bits in an address: 32 or 128.
    width: u32,
    root: Box<[u32]>,
    /// Compressed child tables: at a table's offset, 8 words of run map
    /// (4 × u64, low word first), 1 word of the runs counted before each
    /// 64-bit word (4 × u8), then the runs' values.
    nodes: Box<[u32]>,
    prefixes: usize,
}

const ROOT_BITS: u32 = 16;
const CHILD_BITS: u32 = 8;
/// Words of a compressed table before its runs.
const HEADER: usize = 9;

fn leaf(slot: u32, scope: u8) -> u32 {
    (slot << 8) | u32::from(scope)
}

impl Lpm {
    /// An IPv4 table (strides 16-8-8).
    pub fn v4(prefixes: &[(u32, u8, u32)]) -> Self {
        let v: Vec<(u128, u8, u32)> = prefixes
            .iter()
            .map(|&(a, l, s)| (u128::from(a) << 96, l, s))
            .collect();
        Self::build(32, &v)
    }

    /// An IPv6 table (strides 16-8-8-…).
    pub fn v6(prefixes: &[(u128, u8, u32)]) -> Self {
        Self::build(128, prefixes)
    }

    /// How many prefixes it was built from.
    pub fn len(&self) -> usize {
        self.prefixes
    }

    pub fn is_empty(&self) -> bool {
        self.prefixes == 0
    }

    /// Bytes held by the tables.
    pub fn memory_bytes(&self) -> usize {
        (self.root.len() + self.nodes.len()) * 4
    }

    /// Looks up a left-aligned address (IPv4 in the top 32 bits): the group
    /// slot (0: none) and the scope prefix length.
    #[inline]
    pub fn lookup(&self, key: u128) -> (u32, u8) {
        let mut e = self.root[(key >> (128 - ROOT_BITS)) as usize];
        let mut depth = ROOT_BITS;
        while e & NODE != 0 {
            let at = (e & !NODE) as usize;
            let i = ((key << depth) >> (128 - CHILD_BITS)) as usize;
            let w = i >> 6;
            let map =
                u64::from(self.nodes[at + 2 * w]) | u64::from(self.nodes[at + 2 * w + 1]) << 32;
            let before = (self.nodes[at + 8] >> (8 * w)) & 0xff;
            let rank = before + (map & (u64::MAX >> (63 - (i & 63)))).count_ones();
            e = self.nodes[at + HEADER + rank as usize - 1];
            depth += CHILD_BITS;
        }
        (e >> 8, (e & 0xff) as u8)
    }

    /// Looks up an IPv4 address.
    #[inline]
    pub fn lookup_v4(&self, a: u32) -> (u32, u8) {
        self.lookup(u128::from(a) << 96)
    }

    /// `prefixes`: (left-aligned address, length, slot ≥ 1). The caller
    /// guarantees no duplicate (address, length) pairs, host bits zero,
    /// lengths ≤ width and slots ≤ [`MAX_SLOT`].
    fn build(width: u32, prefixes: &[(u128, u8, u32)]) -> Self {
        let mut sorted: Vec<(u128, u8, u32)> = prefixes.to_vec();
        sorted.sort_by_key(|p| p.1);
        let mut b = Build {
            root_bits: ROOT_BITS,
            child_bits: CHILD_BITS,
            root: vec![0; 1 << ROOT_BITS],
            nodes: Vec::new(),
        };
        for &(key, len, slot) in &sorted {
            b.insert(key, u32::from(len), slot);
        }
        drop(sorted);
        let (mut root, nodes) = b.finish();
        let mut packed = Vec::new();
        for e in root.iter_mut() {
            if *e & NODE != 0 {
                *e = compress(&nodes, (*e & !NODE) as usize, &mut packed);
            }
        }
        Self {
            width,
            root: root.into_boxed_slice(),
            nodes: packed.into_boxed_slice(),
            prefixes: prefixes.len(),
        }
    }

    /// Address width in bits.
    pub fn width(&self) -> u32 {
        self.width
    }
}

struct Build {
    root_bits: u32,
    child_bits: u32,
    /// Entries hold `slot << 8` (scope filled in by `finish`) or NODE|index.
    root: Vec<u32>,
    nodes: Vec<u32>,
}

impl Build {
    fn new_node(&mut self, fill: u32) -> u32 {
        let index = (self.nodes.len() >> self.child_bits) as u32;
        self.nodes
            .extend(std::iter::repeat_n(fill, 1 << self.child_bits));
        NODE | index
    }

    /// Inserts in order of increasing length, so that a longer prefix always
    /// overrides the shorter ones around it.
    fn insert(&mut self, key: u128, len: u32, slot: u32) {
        let value = leaf(slot, 0);
        let rb = self.root_bits;
        let ridx = (key >> (128 - rb)) as usize;
        if len <= rb {
            let n = 1usize << (rb - len);
            self.root[ridx..ridx + n].fill(value);
            return;
        }
        if self.root[ridx] & NODE == 0 {
            let fill = self.root[ridx];
            self.root[ridx] = self.new_node(fill);
        }
        let mut node = self.root[ridx] & !NODE;
        let mut depth = rb;
        let cb = self.child_bits;
        loop {
            let base = (node as usize) << cb;
            let idx = ((key << depth) >> (128 - cb)) as usize;
            if len <= depth + cb {
                let n = 1usize << (depth + cb - len);
                self.nodes[base + idx..base + idx + n].fill(value);
                return;
            }
            if self.nodes[base + idx] & NODE == 0 {
                let fill = self.nodes[base + idx];
                let child = self.new_node(fill);
                self.nodes[base + idx] = child;
            }
            node = self.nodes[base + idx] & !NODE;
            depth += cb;
        }
    }

    /// Computes every leaf's scope and collapses uniform child tables.
    fn finish(mut self) -> (Vec<u32>, Vec<u32>) {
        let cb = self.child_bits;
        let count = self.nodes.len() >> cb;
        // Children always have a larger index than their parent: walk
        // backwards to know each table's uniform slot (or MIXED).
        let mut uniform = vec![MIXED; count];
        for n in (0..count).rev() {
            let entries = &self.nodes[n << cb..(n + 1) << cb];
            let first = entry_slot(entries[0], &uniform);
            uniform[n] =
                if first != MIXED && entries.iter().all(|&e| entry_slot(e, &uniform) == first) {
                    first
                } else {
                    MIXED
                };
        }
        let mut root = std::mem::take(&mut self.root);
        scope_table(&mut root, 0, self.root_bits, 0, &uniform, &mut self);
        (root, self.nodes)
    }
}

/// Writes child table `node` (and, first, its children) in compressed form
/// at the end of `out`; returns its entry (NODE | offset).
fn compress(nodes: &[u32], node: usize, out: &mut Vec<u32>) -> u32 {
    let size = 1usize << CHILD_BITS;
    let mut entries: Vec<u32> = nodes[node * size..(node + 1) * size].to_vec();
    for e in entries.iter_mut() {
        if *e & NODE != 0 {
            *e = compress(nodes, (*e & !NODE) as usize, out);
        }
    }
    let at = out.len();
    let mut map = [0u64; 4];
    let mut runs = Vec::new();
    for (i, &e) in entries.iter().enumerate() {
        if i == 0 || e != entries[i - 1] {
            map[i >> 6] |= 1 << (i & 63);
            runs.push(e);
        }
    }
    for m in map {
        out.push(m as u32);
        out.push((m >> 32) as u32);
    }
    let mut before = 0u32;
    let mut packed = 0u32;
    for (w, m) in map.iter().enumerate() {
        packed |= before << (8 * w);
        before += m.count_ones();
    }
    out.push(packed);
    out.extend(runs);
    NODE | at as u32
}

fn entry_slot(e: u32, uniform: &[u32]) -> u32 {
    if e & NODE != 0 {
        uniform[(e & !NODE) as usize]
    } else {
        e >> 8
    }
}

/// Fills the scopes of one table at `depth` with `bits` entries. `outer` is
/// the scope the parent found for the block this table covers (used when
/// the whole table is one group).
fn scope_table(
    entries: &mut [u32],
    depth: u32,
    bits: u32,
    outer: u8,
    uniform: &[u32],
    b: &mut Build,
) {
    // levels[k] has 2^k values: the uniform slot of each aligned block of
    // depth + k bits (MIXED when not uniform).
    let mut levels: Vec<Vec<u32>> = Vec::with_capacity(bits as usize + 1);
    levels.resize_with(bits as usize + 1, Vec::new);
    levels[bits as usize] = entries.iter().map(|&e| entry_slot(e, uniform)).collect();
    for k in (0..bits as usize).rev() {
        let below = &levels[k + 1];
        let this: Vec<u32> = below
            .chunks_exact(2)
            .map(|p| if p[0] == p[1] { p[0] } else { MIXED })
            .collect();
        levels[k] = this;
    }
    for (i, e) in entries.iter_mut().enumerate() {
        // The smallest k whose block around entry i is uniform.
        let mut scope = None;
        for (k, level) in levels.iter().enumerate() {
            if level[i >> (bits as usize - k)] != MIXED {
                scope = Some(k as u32);
                break;
            }
        }
        let scope = match scope {
            Some(0) if depth > 0 => outer,
            Some(k) => (depth + k) as u8,
            // The entry itself is a mixed child table.
            None => (depth + bits) as u8,
        };
        if *e & NODE != 0 {
            let child = (*e & !NODE) as usize;
            let slot = uniform[child];
            if slot != MIXED {
                // One group throughout: a leaf is enough.
                *e = leaf(slot, scope);
                continue;
            }
            let cb = b.child_bits;
            let mut table = b.nodes[child << cb..(child + 1) << cb].to_vec();
            scope_table(&mut table, depth + bits, cb, scope, uniform, b);
            b.nodes[child << cb..(child + 1) << cb].copy_from_slice(&table);
        } else {
            *e = leaf(*e >> 8, scope);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v4(s: &str) -> u32 {
        u32::from(s.parse::<std::net::Ipv4Addr>().expect("addr"))
    }

    /// The reference: longest match by linear scan, scope by brute force
    /// over the block sizes.
    fn naive(prefixes: &[(u32, u8, u32)], a: u32) -> (u32, u8) {
        let slot_of = |a: u32| {
            prefixes
                .iter()
                .filter(|(p, l, _)| *l == 0 || (a ^ p) >> (32 - u32::from(*l)) == 0)
                .max_by_key(|(_, l, _)| *l)
                .map_or(0, |(_, _, s)| *s)
        };
        let slot = slot_of(a);
        // Scope: the shortest L such that every address of a/L has `slot`.
        // A block is uniform iff no prefix that changes the slot starts
        // inside it or covers it differently; check with its boundaries
        // and every prefix start inside it.
        for l in 0..=32u32 {
            let mask = if l == 0 { 0 } else { u32::MAX << (32 - l) };
            let base = a & mask;
            let end = base | !mask;
            let mut ok = slot_of(base) == slot && slot_of(end) == slot;
            for (p, pl, _) in prefixes {
                let pm = if *pl == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(*pl))
                };
                let pend = p | !pm;
                for probe in [*p, pend, p.wrapping_sub(1), pend.wrapping_add(1)] {
                    if probe >= base && probe <= end && slot_of(probe) != slot {
                        ok = false;
                    }
                }
            }
            if ok {
                return (slot, l as u8);
            }
        }
        (slot, 32)
    }

    #[test]
    fn nested_prefixes_and_scopes() {
        let p = [
            (v4("10.1.0.0"), 16, 1),
            (v4("10.2.0.0"), 16, 2),
            (v4("10.1.2.0"), 24, 3),
            (v4("10.1.2.128"), 25, 1),
        ];
        let t = Lpm::v4(&p);
        assert_eq!(t.lookup_v4(v4("10.1.7.9")), (1, 22));
        assert_eq!(t.lookup_v4(v4("10.1.200.0")), (1, 17));
        assert_eq!(t.lookup_v4(v4("10.1.2.3")), (3, 25));
        assert_eq!(t.lookup_v4(v4("10.1.2.200")), (1, 25));
        assert_eq!(t.lookup_v4(v4("10.2.9.9")), (2, 16));
        assert_eq!(t.lookup_v4(v4("11.0.0.1")), (0, 8));
        assert_eq!(t.lookup_v4(v4("192.0.2.1")), (0, 1));
        assert_eq!(t.lookup_v4(v4("10.3.0.0")), (0, 16));
        let only = Lpm::v4(&[(v4("10.1.0.0"), 16, 1)]);
        assert_eq!(only.lookup_v4(v4("10.1.2.0")), (1, 16));
        let empty = Lpm::v4(&[]);
        assert_eq!(empty.lookup_v4(v4("10.1.2.0")), (0, 0));
        let all = Lpm::v4(&[(0, 0, 5)]);
        assert_eq!(all.lookup_v4(v4("10.1.2.0")), (5, 0));
        // Two halves of one group merge into one block.
        let halves = Lpm::v4(&[(v4("10.0.0.0"), 9, 4), (v4("10.128.0.0"), 9, 4)]);
        assert_eq!(halves.lookup_v4(v4("10.200.0.0")), (4, 8));
    }

    #[test]
    fn ipv6() {
        let a = |s: &str| u128::from(s.parse::<std::net::Ipv6Addr>().expect("addr"));
        let t = Lpm::v6(&[(a("2001:db8:1::"), 48, 1), (a("2001:db8:1:ff00::"), 56, 2)]);
        assert_eq!(t.lookup(a("2001:db8:1:1::")), (1, 49));
        assert_eq!(t.lookup(a("2001:db8:1:ff00::1")), (2, 56));
        assert_eq!(t.lookup(a("2001:db8:2::")), (0, 47));
    }

    proptest! {
        #[test]
        fn matches_the_reference(
            raw in proptest::collection::vec((any::<u32>(), 0u8..=32, 1u32..4), 0..12),
            probes in proptest::collection::vec(any::<u32>(), 1..20),
        ) {
            // Cluster the prefixes so that they nest and touch.
            let mut seen = std::collections::BTreeSet::new();
            let prefixes: Vec<(u32, u8, u32)> = raw
                .into_iter()
                .map(|(a, l, s)| {
                    let a = (a & 0x0f0f_ffff) | 0x0a00_0000;
                    let mask = if l == 0 { 0 } else { u32::MAX << (32 - u32::from(l)) };
                    (a & mask, l, s)
                })
                .filter(|(a, l, _)| seen.insert((*a, *l)))
                .collect();
            let t = Lpm::v4(&prefixes);
            for p in probes {
                let p = (p & 0x0f0f_ffff) | 0x0a00_0000;
                prop_assert_eq!(t.lookup_v4(p), naive(&prefixes, p), "address {:#x}", p);
            }
        }
    }
}
