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
    ///
    /// Built one root entry at a time: the child tables below a root entry
    /// are built uncompressed, given their scopes and compressed before the
    /// next root entry's, so the peak memory of a build is the compressed
    /// result plus the largest subtree (with a million scattered IPv6
    /// prefixes, building every uncompressed table at once took 0.6 GB).
    /// The subtrees are built twice: once to learn whether each is one
    /// group throughout (the root entries' scopes depend on that), then for
    /// good.
    fn build(width: u32, prefixes: &[(u128, u8, u32)]) -> Self {
        let mut sorted: Vec<(u128, u8, u32)> = prefixes.to_vec();
        // Short prefixes first, by length; then the rest by root entry and
        // length (a longer prefix is inserted after those around it).
        sorted.sort_unstable_by_key(|&(key, len, _)| {
            if u32::from(len) <= ROOT_BITS {
                (0u8, 0u32, len, key)
            } else {
                (1, (key >> (128 - ROOT_BITS)) as u32, len, key)
            }
        });
        let split = sorted.partition_point(|p| u32::from(p.1) <= ROOT_BITS);
        let mut root = vec![0u32; 1 << ROOT_BITS];
        for &(key, len, slot) in &sorted[..split] {
            let at = (key >> (128 - ROOT_BITS)) as usize;
            let n = 1usize << (ROOT_BITS - u32::from(len));
            root[at..at + n].fill(leaf(slot, 0));
        }
        let long = &sorted[split..];
        let mut buckets: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
        let mut i = 0;
        while i < long.len() {
            let r = (long[i].0 >> (128 - ROOT_BITS)) as usize;
            let mut j = i + 1;
            while j < long.len() && (long[j].0 >> (128 - ROOT_BITS)) as usize == r {
                j += 1;
            }
            buckets.push((r, i..j));
            i = j;
        }
        // Pass 1: is each subtree one group throughout?
        let mut uniform = Vec::with_capacity(buckets.len());
        let mut fills = Vec::with_capacity(buckets.len());
        for (b, (r, range)) in buckets.iter().enumerate() {
            let sub = Subtree::build(root[*r], &long[range.clone()]);
            uniform.push(sub.uniform[0]);
            fills.push(root[*r]);
            root[*r] = NODE | b as u32;
        }
        // The root entries' scopes.
        let slots: Vec<u32> = root.iter().map(|&e| entry_slot(e, &uniform)).collect();
        let scopes = scopes(&slots, 0, ROOT_BITS, 0);
        for (e, &scope) in root.iter_mut().zip(&scopes) {
            if *e & NODE == 0 {
                *e = leaf(*e >> 8, scope);
            }
        }
        // Pass 2: each mixed subtree, with its scopes, compressed.
        let mut packed = Vec::new();
        for (b, (r, range)) in buckets.iter().enumerate() {
            if uniform[b] != MIXED {
                root[*r] = leaf(uniform[b], scopes[*r]);
                continue;
            }
            let mut sub = Subtree::build(fills[b], &long[range.clone()]);
            sub.scope(0, ROOT_BITS, scopes[*r]);
            root[*r] = compress(&sub.nodes, 0, &mut packed);
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

/// The uncompressed child tables below one root entry, while building.
struct Subtree {
    /// Tables of 2^CHILD_BITS entries; table 0 is the one the root entry
    /// points to. Entries hold `slot << 8` (scope filled in by `scope`) or
    /// NODE | table index.
    nodes: Vec<u32>,
    /// Per table: its one slot, or MIXED.
    uniform: Vec<u32>,
}

impl Subtree {
    /// The subtree of `prefixes` (all longer than the root bits, under one
    /// root entry, by increasing length) over `fill`, the root entry's
    /// value before them.
    fn build(fill: u32, prefixes: &[(u128, u8, u32)]) -> Self {
        let mut t = Self {
            nodes: Vec::new(),
            uniform: Vec::new(),
        };
        t.new_node(fill);
        for &(key, len, slot) in prefixes {
            t.insert(key, u32::from(len), slot);
        }
        // Children always have a larger index than their parent: walk
        // backwards to know each table's uniform slot (or MIXED).
        let count = t.nodes.len() >> CHILD_BITS;
        let mut uniform = vec![MIXED; count];
        for n in (0..count).rev() {
            let entries = &t.nodes[n << CHILD_BITS..(n + 1) << CHILD_BITS];
            let first = entry_slot(entries[0], &uniform);
            uniform[n] =
                if first != MIXED && entries.iter().all(|&e| entry_slot(e, &uniform) == first) {
                    first
                } else {
                    MIXED
                };
        }
        t.uniform = uniform;
        t
    }

    fn new_node(&mut self, fill: u32) -> u32 {
        let index = (self.nodes.len() >> CHILD_BITS) as u32;
        self.nodes
            .extend(std::iter::repeat_n(fill, 1 << CHILD_BITS));
        NODE | index
    }

    /// Inserts in order of increasing length, so that a longer prefix always
    /// overrides the shorter ones around it.
    fn insert(&mut self, key: u128, len: u32, slot: u32) {
        let value = leaf(slot, 0);
        let mut node = 0usize;
        let mut depth = ROOT_BITS;
        loop {
            let base = node << CHILD_BITS;
            let idx = ((key << depth) >> (128 - CHILD_BITS)) as usize;
            if len <= depth + CHILD_BITS {
                let n = 1usize << (depth + CHILD_BITS - len);
                self.nodes[base + idx..base + idx + n].fill(value);
                return;
            }
            if self.nodes[base + idx] & NODE == 0 {
                let fill = self.nodes[base + idx];
                let child = self.new_node(fill);
                self.nodes[base + idx] = child;
            }
            node = (self.nodes[base + idx] & !NODE) as usize;
            depth += CHILD_BITS;
        }
    }

    /// Fills the scopes of table `node` at `depth` (and of its mixed
    /// children) and collapses uniform children into leaves. `outer` is the
    /// scope the parent found for the block this table covers.
    fn scope(&mut self, node: usize, depth: u32, outer: u8) {
        let range = node << CHILD_BITS..(node + 1) << CHILD_BITS;
        let slots: Vec<u32> = self.nodes[range.clone()]
            .iter()
            .map(|&e| entry_slot(e, &self.uniform))
            .collect();
        let scopes = scopes(&slots, depth, CHILD_BITS, outer);
        for (i, &scope) in scopes.iter().enumerate() {
            let e = self.nodes[range.start + i];
            if e & NODE != 0 {
                let child = (e & !NODE) as usize;
                let slot = self.uniform[child];
                if slot != MIXED {
                    // One group throughout: a leaf is enough.
                    self.nodes[range.start + i] = leaf(slot, scope);
                } else {
                    self.scope(child, depth + CHILD_BITS, scope);
                }
            } else {
                self.nodes[range.start + i] = leaf(e >> 8, scope);
            }
        }
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

/// The scope of each entry of a table at `depth` with `bits` bits of
/// entries, from each entry's uniform slot (MIXED for a mixed child
/// table). `outer` is the scope the parent found for the block this table
/// covers (used when the whole table is one group).
fn scopes(slots: &[u32], depth: u32, bits: u32, outer: u8) -> Vec<u8> {
    // levels[k] has 2^k values: the uniform slot of each aligned block of
    // depth + k bits (MIXED when not uniform).
    let mut levels: Vec<Vec<u32>> = Vec::with_capacity(bits as usize + 1);
    levels.resize_with(bits as usize + 1, Vec::new);
    levels[bits as usize] = slots.to_vec();
    for k in (0..bits as usize).rev() {
        let this: Vec<u32> = levels[k + 1]
            .chunks_exact(2)
            .map(|p| if p[0] == p[1] { p[0] } else { MIXED })
            .collect();
        levels[k] = this;
    }
    (0..slots.len())
        .map(|i| {
            // The smallest k whose block around entry i is uniform.
            let k = levels
                .iter()
                .enumerate()
                .find(|(k, level)| level[i >> (bits as usize - k)] != MIXED)
                .map(|(k, _)| k as u32);
            match k {
                Some(0) if depth > 0 => outer,
                Some(k) => (depth + k) as u8,
                // The entry itself is a mixed child table.
                None => (depth + bits) as u8,
            }
        })
        .collect()
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
