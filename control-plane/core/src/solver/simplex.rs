//! A primal network simplex for minimum-cost flow, in integers.
//!
//! The classic algorithm (Dantzig; Ahuja, Magnanti and Orlin, ch. 11) with
//! the spanning-tree data structure of LEMON's `NetworkSimplex` (parent,
//! predecessor arc, preorder thread and its reverse, subtree size and last
//! successor), block-search pricing, and the strongly-feasible leaving-arc
//! rule, which rules out cycling on degenerate pivots.
//!
//! What is particular here:
//! - flows, capacities and costs are `i64`, so that reduced costs are exact
//!   and every run takes the same pivots (determinism without float
//!   tolerances);
//! - the caller supplies the starting basis (a feasible flow and, for every
//!   node, its tree arc). The steering solver builds it from a greedy
//!   assignment or from the previous routing table, which is what makes a
//!   re-solve after a small change take few pivots. A start that is not a
//!   strongly feasible basis is refused and the textbook artificial start is
//!   used instead, so a bad hint costs time, never correctness.

/// Capacity meaning "unbounded".
pub(crate) const INF: i64 = i64::MAX / 4;
const NONE: u32 = u32::MAX;

const STATE_LOWER: i8 = 1;
const STATE_TREE: i8 = 0;
const STATE_UPPER: i8 = -1;
/// The node is the source of its tree arc (the arc points to the parent).
const DIR_UP: i8 = 1;
const DIR_DOWN: i8 = -1;

/// A min-cost flow network. Every arc has a lower bound of 0.
#[derive(Debug, Clone, Default)]
pub(crate) struct Network {
    pub source: Vec<u32>,
    pub target: Vec<u32>,
    /// Upper bound; `INF` for none. Must be > 0.
    pub cap: Vec<i64>,
    pub cost: Vec<i64>,
    /// Supply per node (positive: produces flow); sums to 0.
    pub supply: Vec<i64>,
    /// The node the tree hangs from (absorbs the flow in our graphs).
    pub root: u32,
}

impl Network {
    pub fn with_nodes(nodes: usize, root: u32) -> Self {
        Self {
            supply: vec![0; nodes],
            root,
            ..Self::default()
        }
    }

    pub fn reserve(&mut self, nodes: usize, arcs: usize) {
        self.supply.reserve(nodes);
        self.source.reserve(arcs);
        self.target.reserve(arcs);
        self.cap.reserve(arcs);
        self.cost.reserve(arcs);
    }

    pub fn add_node(&mut self) -> u32 {
        self.supply.push(0);
        (self.supply.len() - 1) as u32
    }

    pub fn add_arc(&mut self, from: u32, to: u32, cap: i64, cost: i64) -> u32 {
        debug_assert!(cap > 0, "arcs must have a positive capacity");
        self.source.push(from);
        self.target.push(to);
        self.cap.push(cap);
        self.cost.push(cost);
        (self.source.len() - 1) as u32
    }

    pub fn nodes(&self) -> usize {
        self.supply.len()
    }

    pub fn arcs(&self) -> usize {
        self.source.len()
    }
}

/// A starting basis: a feasible flow on every arc and, for every node but
/// the root, the arc that links it to its parent in the spanning tree.
/// Arcs outside the tree must be at a bound (0 or their capacity).
#[derive(Debug, Clone, Default)]
pub(crate) struct Start {
    pub flow: Vec<i64>,
    /// Per node: its tree arc; ignored for the root.
    pub pred: Vec<u32>,
}

/// An optimal flow and node potentials (duals).
#[derive(Debug, Clone)]
pub(crate) struct Solution {
    pub flow: Vec<i64>,
    /// Potentials, with the root at 0: `cost + pi[source] - pi[target] >= 0`
    /// on every arc that can carry more flow.
    pub pi: Vec<i64>,
    pub pivots: u64,
    /// Whether the caller's start was used (false: artificial start).
    pub warm: bool,
}

/// Why no optimum was found; both mean a bug in the caller's network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SimplexError {
    #[error("the network is infeasible")]
    Infeasible,
    #[error("the network has a negative cycle of unbounded capacity")]
    Unbounded,
}

pub(crate) struct Simplex {
    supply: Vec<i64>,
    root: u32,
    /// Real arcs, then artificial arcs (one per node in the artificial start).
    source: Vec<u32>,
    target: Vec<u32>,
    cap: Vec<i64>,
    cost: Vec<i64>,
    flow: Vec<i64>,
    state: Vec<i8>,
    real_arcs: usize,

    pi: Vec<i64>,
    parent: Vec<u32>,
    pred: Vec<u32>,
    pred_dir: Vec<i8>,
    thread: Vec<u32>,
    rev_thread: Vec<u32>,
    succ_num: Vec<u32>,
    last_succ: Vec<u32>,
    dirty_revs: Vec<u32>,

    // The current pivot.
    in_arc: usize,
    join: u32,
    u_in: u32,
    v_in: u32,
    u_out: u32,
    delta: i64,

    block_size: usize,
    next_arc: usize,

    /// Arcs incident to each node (real arcs only), for local pricing.
    adj_start: Vec<u32>,
    adj: Vec<u32>,
    /// First node and size of the subtree whose potentials the last pivot
    /// changed.
    moved_root: u32,
    moved_size: u32,
    /// Violating arcs found by the last sparse pass, to try first.
    candidates: Vec<u32>,
    /// Arcs in the adjacency index (arcs added later are priced by block
    /// search only).
    adj_arcs: usize,
    warm: bool,
    pivots: u64,
    /// Price around the last moved subtree first (pays off when re-solving
    /// from a near-optimal basis, not from a crash basis).
    local_pricing: bool,
    /// Runs so far, and per node the last run that changed its potential.
    runs: u32,
    moved_in: Vec<u32>,
}

/// Local pricing looks at about this many blocks' worth of arcs around the
/// subtree that moved.
const LOCAL_PRICING_BLOCKS: usize = 2;
/// A block search that needs more blocks than this to find a violating arc
/// collects all of them (see `block_search`).
const SPARSE_BLOCKS: usize = 16;

/// Solves `net` from `start` if it is a strongly feasible basis, else from
/// the artificial basis.
#[cfg(test)]
pub(crate) fn solve(
    net: Network,
    start: Option<&Start>,
) -> Result<(Solution, Network), SimplexError> {
    let mut s = Simplex::start(net, start);
    s.run()?;
    s.finish()
}

impl Simplex {
    /// A simplex on `net`, at `start` if it is a strongly feasible basis,
    /// else at the artificial basis.
    pub(crate) fn start(net: Network, start: Option<&Start>) -> Self {
        let mut s = Simplex::new(net);
        s.warm = match start {
            Some(st) if s.start_from(st) => true,
            _ => {
                s.reset();
                s.start_artificial();
                false
            }
        };
        s
    }

    /// Turns local pricing on or off (off by default).
    pub(crate) fn set_local_pricing(&mut self, on: bool) {
        self.local_pricing = on;
    }

    /// Whether the caller's start was used (arcs can then be added).
    pub(crate) fn is_warm(&self) -> bool {
        self.warm
    }

    /// Reduced-cost potentials of the current basis (not shifted).
    pub(crate) fn potentials(&self) -> &[i64] {
        &self.pi
    }

    /// Adds an arc at its lower bound (no flow, outside the tree): the
    /// basis stays strongly feasible, and the next [`Simplex::run`]
    /// continues from it. Only after a warm start (no artificial arcs).
    pub(crate) fn add_arc(&mut self, from: u32, to: u32, cap: i64, cost: i64) -> u32 {
        debug_assert!(self.warm && self.real_arcs == self.source.len());
        debug_assert!(cap > 0);
        self.source.push(from);
        self.target.push(to);
        self.cap.push(cap);
        self.cost.push(cost);
        self.flow.push(0);
        self.state.push(STATE_LOWER);
        self.real_arcs += 1;
        self.block_size = ((self.real_arcs as f64).sqrt() as usize).max(10);
        (self.real_arcs - 1) as u32
    }

    /// Runs to optimality; returns the pivots of this run.
    pub(crate) fn run(&mut self) -> Result<u64, SimplexError> {
        self.runs += 1;
        self.pivots_run()
    }

    /// The solution, and the network handed back.
    pub(crate) fn finish(self) -> Result<(Solution, Network), SimplexError> {
        let s = self;
        // Artificial arcs must end empty.
        if s.flow[s.real_arcs..].iter().any(|&f| f != 0) {
            return Err(SimplexError::Infeasible);
        }
        let root = s.root as usize;
        let base = s.pi[root];
        let mut pi = s.pi;
        for p in &mut pi {
            *p -= base;
        }
        let m = s.real_arcs;
        let mut flow = s.flow;
        flow.truncate(m);
        let (mut source, mut target, mut cap, mut cost) = (s.source, s.target, s.cap, s.cost);
        source.truncate(m);
        target.truncate(m);
        cap.truncate(m);
        cost.truncate(m);
        Ok((
            Solution {
                flow,
                pi,
                pivots: s.pivots,
                warm: s.warm,
            },
            Network {
                source,
                target,
                cap,
                cost,
                supply: s.supply,
                root: s.root,
            },
        ))
    }
}

impl Simplex {
    fn new(net: Network) -> Self {
        let n = net.nodes();
        let m = net.arcs();
        Self {
            supply: net.supply,
            root: net.root,
            source: net.source,
            target: net.target,
            cap: net.cap,
            cost: net.cost,
            flow: vec![0; m],
            state: vec![STATE_LOWER; m],
            real_arcs: m,
            pi: vec![0; n],
            parent: vec![NONE; n],
            pred: vec![NONE; n],
            pred_dir: vec![DIR_UP; n],
            thread: vec![0; n],
            rev_thread: vec![0; n],
            succ_num: vec![1; n],
            last_succ: vec![0; n],
            dirty_revs: Vec::new(),
            in_arc: 0,
            join: 0,
            u_in: 0,
            v_in: 0,
            u_out: 0,
            delta: 0,
            block_size: ((m as f64).sqrt() as usize).max(10),
            next_arc: 0,
            adj_start: Vec::new(),
            adj: Vec::new(),
            moved_root: NONE,
            moved_size: 0,
            candidates: Vec::new(),
            adj_arcs: 0,
            warm: false,
            pivots: 0,
            local_pricing: false,
            runs: 0,
            moved_in: vec![0; n],
        }
    }

    fn nodes(&self) -> usize {
        self.supply.len()
    }

    /// Back to no flow and no tree (after a refused start).
    fn reset(&mut self) {
        self.flow.iter_mut().for_each(|f| *f = 0);
        self.state.iter_mut().for_each(|s| *s = STATE_LOWER);
        self.pi.iter_mut().for_each(|p| *p = 0);
        self.parent.iter_mut().for_each(|p| *p = NONE);
        self.pred.iter_mut().for_each(|p| *p = NONE);
        self.pred_dir.iter_mut().for_each(|d| *d = DIR_UP);
    }

    fn build_adjacency(&mut self) {
        let n = self.nodes();
        let m = self.real_arcs;
        let mut start = vec![0u32; n + 1];
        for e in 0..m {
            start[self.source[e] as usize + 1] += 1;
            start[self.target[e] as usize + 1] += 1;
        }
        for i in 0..n {
            start[i + 1] += start[i];
        }
        let mut fill = start.clone();
        let mut adj = vec![0u32; 2 * m];
        for e in 0..m {
            for v in [self.source[e], self.target[e]] {
                let slot = &mut fill[v as usize];
                adj[*slot as usize] = e as u32;
                *slot += 1;
            }
        }
        self.adj_start = start;
        self.adj = adj;
    }

    /// The textbook start: every node hangs from the root by an artificial
    /// arc of prohibitive cost.
    fn start_artificial(&mut self) {
        let s = self;
        let n = s.nodes();
        let root = s.root as usize;
        let max_cost = s.cost.iter().map(|c| c.abs()).max().unwrap_or(0);
        let art = max_cost
            .saturating_add(1)
            .saturating_mul(n as i64 + 1)
            .min(INF);
        // Remaining supply of the root after real arcs (all at 0).
        for u in 0..n {
            if u == root {
                continue;
            }
            let sup = s.supply[u];
            let e = s.source.len();
            if sup >= 0 {
                s.source.push(u as u32);
                s.target.push(root as u32);
                s.flow.push(sup);
                s.pred_dir[u] = DIR_UP;
                s.pi[u] = -art;
            } else {
                s.source.push(root as u32);
                s.target.push(u as u32);
                s.flow.push(-sup);
                s.pred_dir[u] = DIR_DOWN;
                s.pi[u] = art;
            }
            s.cap.push(INF);
            s.cost.push(art);
            s.state.push(STATE_TREE);
            s.pred[u] = e as u32;
            s.parent[u] = root as u32;
        }
        // Thread: root, then every other node in index order.
        let order: Vec<u32> = std::iter::once(root as u32)
            .chain((0..n as u32).filter(|&u| u as usize != root))
            .collect();
        s.set_thread(&order);
    }

    /// Starts from the caller's basis; false if it is not a strongly
    /// feasible spanning tree with conserved flow.
    fn start_from(&mut self, start: &Start) -> bool {
        let n = self.nodes();
        let m = self.real_arcs;
        if start.flow.len() != m || start.pred.len() != n {
            return false;
        }
        let s = self;
        let root = s.root as usize;
        s.flow.copy_from_slice(&start.flow);
        // Conservation and bounds.
        let mut balance = s.supply.clone();
        for e in 0..m {
            let f = s.flow[e];
            if f < 0 || f > s.cap[e] {
                return false;
            }
            balance[s.source[e] as usize] -= f;
            balance[s.target[e] as usize] += f;
        }
        if balance.iter().any(|&b| b != 0) {
            return false;
        }
        // Tree arcs and parents.
        for u in 0..n {
            if u == root {
                continue;
            }
            let e = start.pred[u];
            if e as usize >= m || s.state[e as usize] == STATE_TREE {
                return false;
            }
            let e = e as usize;
            let (dir, p) = if s.source[e] as usize == u {
                (DIR_UP, s.target[e])
            } else if s.target[e] as usize == u {
                (DIR_DOWN, s.source[e])
            } else {
                return false;
            };
            // Strong feasibility: a positive amount can be pushed from u
            // towards the root along its tree arc.
            let ok = if dir == DIR_UP {
                s.flow[e] < s.cap[e]
            } else {
                s.flow[e] > 0
            };
            if !ok || p as usize == u {
                return false;
            }
            s.state[e] = STATE_TREE;
            s.pred[u] = e as u32;
            s.pred_dir[u] = dir;
            s.parent[u] = p;
        }
        // Every other arc at a bound.
        for e in 0..m {
            if s.state[e] == STATE_TREE {
                continue;
            }
            s.state[e] = if s.flow[e] == 0 {
                STATE_LOWER
            } else if s.flow[e] == s.cap[e] {
                STATE_UPPER
            } else {
                return false;
            };
        }
        // Preorder from the root; a node never reached is on a cycle.
        let mut first_child = vec![NONE; n];
        let mut next_sibling = vec![NONE; n];
        // Insert children in reverse index order so that they come out in
        // index order.
        for u in (0..n).rev() {
            if u == root {
                continue;
            }
            let p = s.parent[u] as usize;
            next_sibling[u] = first_child[p];
            first_child[p] = u as u32;
        }
        let mut order = Vec::with_capacity(n);
        let mut stack = vec![root as u32];
        while let Some(u) = stack.pop() {
            order.push(u);
            // Push children in reverse so that the first child is visited first.
            let mut kids = Vec::new();
            let mut c = first_child[u as usize];
            while c != NONE {
                kids.push(c);
                c = next_sibling[c as usize];
            }
            stack.extend(kids.into_iter().rev());
        }
        if order.len() != n {
            return false;
        }
        for &u in &order[1..] {
            let u = u as usize;
            let p = s.parent[u] as usize;
            let e = s.pred[u] as usize;
            s.pi[u] = if s.pred_dir[u] == DIR_UP {
                s.pi[p] - s.cost[e]
            } else {
                s.pi[p] + s.cost[e]
            };
        }
        s.set_thread(&order);
        true
    }

    /// Sets thread, rev_thread, succ_num and last_succ from a preorder
    /// (parents must be set).
    fn set_thread(&mut self, order: &[u32]) {
        let n = order.len();
        for i in 0..n {
            let u = order[i];
            let next = order[(i + 1) % n];
            self.thread[u as usize] = next;
            self.rev_thread[next as usize] = u;
        }
        for &u in order {
            self.succ_num[u as usize] = 1;
            self.last_succ[u as usize] = u;
        }
        // Children come after their parent in a preorder: accumulate in
        // reverse. The last successor of a node is the last successor of
        // its last child in preorder, which is the first child met in
        // reverse order.
        let mut last_set = vec![false; n];
        for &u in order.iter().rev() {
            let p = self.parent[u as usize];
            if p == NONE {
                continue;
            }
            let p = p as usize;
            self.succ_num[p] += self.succ_num[u as usize];
            if !last_set[p] {
                last_set[p] = true;
                self.last_succ[p] = self.last_succ[u as usize];
            }
        }
    }

    fn pivots_run(&mut self) -> Result<u64, SimplexError> {
        let mut pivots = 0u64;
        if self.adj_arcs == 0 {
            self.build_adjacency();
            self.adj_arcs = self.real_arcs.max(1);
        }
        while self.find_entering_arc() {
            self.find_join_node();
            let change = self.find_leaving_arc();
            if self.delta >= INF {
                return Err(SimplexError::Unbounded);
            }
            self.change_flow(change);
            if change {
                self.update_tree_structure();
                self.update_potential();
            }
            pivots += 1;
        }
        self.pivots += pivots;
        Ok(pivots)
    }

    /// Local pricing first: the arcs around the subtree whose potentials
    /// the last pivot changed are where new violations appear (a re-solve
    /// after a small change is a chain of such local pivots); then block
    /// search.
    fn find_entering_arc(&mut self) -> bool {
        if self.moved_root != NONE && self.local_pricing {
            let mut min = 0i64;
            let mut best = usize::MAX;
            let mut u = self.moved_root;
            let mut budget = if self.local_pricing {
                LOCAL_PRICING_BLOCKS * self.block_size
            } else {
                0
            };
            for _ in 0..self.moved_size {
                if budget == 0 {
                    break;
                }
                let (a, b) = (
                    self.adj_start[u as usize] as usize,
                    self.adj_start[u as usize + 1] as usize,
                );
                budget = budget.saturating_sub(b - a);
                for &e in &self.adj[a..b] {
                    let e = e as usize;
                    let st = self.state[e];
                    if st == STATE_TREE {
                        continue;
                    }
                    let rc = self.cost[e] + self.pi[self.source[e] as usize]
                        - self.pi[self.target[e] as usize];
                    let c = i64::from(st) * rc;
                    if c < min || (c == min && c < 0 && e < best) {
                        min = c;
                        best = e;
                    }
                }
                u = self.thread[u as usize];
            }
            self.moved_root = NONE;
            if min < 0 {
                self.in_arc = best;
                return true;
            }
        }
        self.block_search()
    }

    /// The most violating arc in `from..to` if it beats `min`.
    fn scan(&self, from: usize, to: usize, min: &mut i64, best: &mut usize) {
        let pi = &self.pi;
        let arcs = self.state[from..to]
            .iter()
            .zip(&self.cost[from..to])
            .zip(self.source[from..to].iter().zip(&self.target[from..to]));
        for (i, ((&st, &cost), (&u, &v))) in arcs.enumerate() {
            if st != STATE_TREE {
                let c = i64::from(st) * (cost + pi[u as usize] - pi[v as usize]);
                if c < *min {
                    *min = c;
                    *best = from + i;
                }
            }
        }
    }

    fn violation(&self, e: usize) -> i64 {
        let st = self.state[e];
        if st == STATE_TREE {
            return 0;
        }
        i64::from(st)
            * (self.cost[e] + self.pi[self.source[e] as usize] - self.pi[self.target[e] as usize])
    }

    /// Block search: scan blocks of arcs from where the last search ended
    /// and take the most violating arc of the first block that has one.
    /// When violations are sparse (many blocks scanned for one), every
    /// violating arc of a full pass is kept as a candidate list, consumed
    /// before the next scan: a warm start then pays one pass for many
    /// pivots instead of one pass per pivot.
    fn block_search(&mut self) -> bool {
        while let Some(e) = self.candidates.pop() {
            if self.violation(e as usize) < 0 {
                self.in_arc = e as usize;
                return true;
            }
        }
        let m = self.real_arcs;
        if m == 0 {
            return false;
        }
        let mut min = 0i64;
        let mut best = 0usize;
        let mut start = self.next_arc;
        let mut scanned = 0usize;
        let mut blocks = 0usize;
        while scanned < m {
            let end = (start + self.block_size).min(m).min(start + (m - scanned));
            self.scan(start, end, &mut min, &mut best);
            scanned += end - start;
            blocks += 1;
            start = if end == m { 0 } else { end };
            if min < 0 {
                break;
            }
        }
        if min >= 0 {
            return false;
        }
        self.next_arc = start;
        self.in_arc = best;
        if blocks > SPARSE_BLOCKS {
            // Sparse: collect every other violating arc, in reverse index
            // order so that `pop` takes them in index order.
            for e in (0..m).rev() {
                if e != best && self.violation(e) < 0 {
                    self.candidates.push(e as u32);
                }
            }
        }
        true
    }

    fn find_join_node(&mut self) {
        let mut u = self.source[self.in_arc];
        let mut v = self.target[self.in_arc];
        while u != v {
            if self.succ_num[u as usize] < self.succ_num[v as usize] {
                u = self.parent[u as usize];
            } else {
                v = self.parent[v as usize];
            }
        }
        self.join = u;
    }

    fn residual(&self, e: usize, forward: bool) -> i64 {
        if forward {
            if self.cap[e] >= INF {
                INF
            } else {
                self.cap[e] - self.flow[e]
            }
        } else {
            self.flow[e]
        }
    }

    /// Finds the blocking arc of the cycle closed by the entering arc: the
    /// last one met from the join node in the cycle's direction, which
    /// keeps the tree strongly feasible. Returns whether it is a tree arc.
    fn find_leaving_arc(&mut self) -> bool {
        let e_in = self.in_arc;
        let (first, second) = if self.state[e_in] == STATE_LOWER {
            (self.source[e_in], self.target[e_in])
        } else {
            (self.target[e_in], self.source[e_in])
        };
        let mut delta = if self.cap[e_in] >= INF {
            INF
        } else {
            self.cap[e_in]
        };
        let mut result = 0;
        let join = self.join;
        let mut u = first;
        while u != join {
            let e = self.pred[u as usize] as usize;
            // The cycle runs from the parent down to u here.
            let d = self.residual(e, self.pred_dir[u as usize] == DIR_DOWN);
            if d < delta {
                delta = d;
                self.u_out = u;
                result = 1;
            }
            u = self.parent[u as usize];
        }
        let mut u = second;
        while u != join {
            let e = self.pred[u as usize] as usize;
            // The cycle runs from u up to the parent here.
            let d = self.residual(e, self.pred_dir[u as usize] == DIR_UP);
            if d <= delta {
                delta = d;
                self.u_out = u;
                result = 2;
            }
            u = self.parent[u as usize];
        }
        self.delta = delta;
        if result == 1 {
            self.u_in = first;
            self.v_in = second;
        } else {
            self.u_in = second;
            self.v_in = first;
        }
        result != 0
    }

    fn change_flow(&mut self, change: bool) {
        let e_in = self.in_arc;
        if self.delta > 0 {
            let val = i64::from(self.state[e_in]) * self.delta;
            self.flow[e_in] += val;
            let join = self.join;
            let mut u = self.source[e_in];
            while u != join {
                let e = self.pred[u as usize] as usize;
                self.flow[e] -= i64::from(self.pred_dir[u as usize]) * val;
                u = self.parent[u as usize];
            }
            let mut u = self.target[e_in];
            while u != join {
                let e = self.pred[u as usize] as usize;
                self.flow[e] += i64::from(self.pred_dir[u as usize]) * val;
                u = self.parent[u as usize];
            }
        }
        if change {
            self.state[e_in] = STATE_TREE;
            let e_out = self.pred[self.u_out as usize] as usize;
            self.state[e_out] = if self.flow[e_out] == 0 {
                STATE_LOWER
            } else {
                STATE_UPPER
            };
        } else {
            self.state[e_in] = -self.state[e_in];
        }
    }

    /// Re-hangs the subtree cut off by the leaving arc below the entering
    /// arc (LEMON's update of the threaded tree).
    fn update_tree_structure(&mut self) {
        let u_in = self.u_in;
        let v_in = self.v_in;
        let u_out = self.u_out;
        let join = self.join;
        let in_arc = self.in_arc as u32;

        let old_rev_thread = self.rev_thread[u_out as usize];
        let old_succ_num = self.succ_num[u_out as usize];
        let old_last_succ = self.last_succ[u_out as usize];
        let v_out = self.parent[u_out as usize];

        if u_in == u_out {
            self.parent[u_in as usize] = v_in;
            self.pred[u_in as usize] = in_arc;
            self.pred_dir[u_in as usize] = if u_in == self.source[in_arc as usize] {
                DIR_UP
            } else {
                DIR_DOWN
            };
            if self.thread[v_in as usize] != u_out {
                let mut after = self.thread[old_last_succ as usize];
                self.thread[old_rev_thread as usize] = after;
                self.rev_thread[after as usize] = old_rev_thread;
                after = self.thread[v_in as usize];
                self.thread[v_in as usize] = u_out;
                self.rev_thread[u_out as usize] = v_in;
                self.thread[old_last_succ as usize] = after;
                self.rev_thread[after as usize] = old_last_succ;
            }
        } else {
            let thread_continue = if old_rev_thread == v_in {
                self.thread[old_last_succ as usize]
            } else {
                self.thread[v_in as usize]
            };
            let mut stem = u_in;
            let mut par_stem = v_in;
            let mut last = self.last_succ[u_in as usize];
            let mut after = self.thread[last as usize];
            self.thread[v_in as usize] = u_in;
            self.dirty_revs.clear();
            self.dirty_revs.push(v_in);
            while stem != u_out {
                let next_stem = self.parent[stem as usize];
                self.thread[last as usize] = next_stem;
                self.dirty_revs.push(last);
                let before = self.rev_thread[stem as usize];
                self.thread[before as usize] = after;
                self.rev_thread[after as usize] = before;
                self.parent[stem as usize] = par_stem;
                par_stem = stem;
                stem = next_stem;
                last = if self.last_succ[stem as usize] == self.last_succ[par_stem as usize] {
                    self.rev_thread[par_stem as usize]
                } else {
                    self.last_succ[stem as usize]
                };
                after = self.thread[last as usize];
            }
            self.parent[u_out as usize] = par_stem;
            self.thread[last as usize] = thread_continue;
            self.rev_thread[thread_continue as usize] = last;
            self.last_succ[u_out as usize] = last;
            if old_rev_thread != v_in {
                self.thread[old_rev_thread as usize] = after;
                self.rev_thread[after as usize] = old_rev_thread;
            }
            for i in 0..self.dirty_revs.len() {
                let u = self.dirty_revs[i];
                let t = self.thread[u as usize];
                self.rev_thread[t as usize] = u;
            }
            let mut tmp_sc = 0u32;
            let tmp_ls = self.last_succ[u_out as usize];
            let mut u = u_out;
            let mut p = self.parent[u as usize];
            while u != u_in {
                self.pred[u as usize] = self.pred[p as usize];
                self.pred_dir[u as usize] = -self.pred_dir[p as usize];
                tmp_sc = tmp_sc + self.succ_num[u as usize] - self.succ_num[p as usize];
                self.succ_num[u as usize] = tmp_sc;
                self.last_succ[p as usize] = tmp_ls;
                u = p;
                p = self.parent[u as usize];
            }
            self.pred[u_in as usize] = in_arc;
            self.pred_dir[u_in as usize] = if u_in == self.source[in_arc as usize] {
                DIR_UP
            } else {
                DIR_DOWN
            };
            self.succ_num[u_in as usize] = old_succ_num;
        }

        let up_limit_out = if self.last_succ[join as usize] == v_in {
            join
        } else {
            NONE
        };
        let last_succ_out = self.last_succ[u_out as usize];
        let mut u = v_in;
        while u != NONE && self.last_succ[u as usize] == v_in {
            self.last_succ[u as usize] = last_succ_out;
            u = self.parent[u as usize];
        }
        if join != old_rev_thread && v_in != old_rev_thread {
            let mut u = v_out;
            while u != up_limit_out && u != NONE && self.last_succ[u as usize] == old_last_succ {
                self.last_succ[u as usize] = old_rev_thread;
                u = self.parent[u as usize];
            }
        } else if last_succ_out != old_last_succ {
            let mut u = v_out;
            while u != up_limit_out && u != NONE && self.last_succ[u as usize] == old_last_succ {
                self.last_succ[u as usize] = last_succ_out;
                u = self.parent[u as usize];
            }
        }
        let mut u = v_in;
        while u != join {
            self.succ_num[u as usize] += old_succ_num;
            u = self.parent[u as usize];
        }
        let mut u = v_out;
        while u != join {
            self.succ_num[u as usize] -= old_succ_num;
            u = self.parent[u as usize];
        }
    }

    fn update_potential(&mut self) {
        let u_in = self.u_in as usize;
        let in_arc = self.in_arc;
        let sigma = self.pi[self.v_in as usize]
            - self.pi[u_in]
            - i64::from(self.pred_dir[u_in]) * self.cost[in_arc];
        if sigma == 0 {
            return;
        }
        self.moved_root = u_in as u32;
        self.moved_size = self.succ_num[u_in];
        let end = self.thread[self.last_succ[u_in] as usize];
        let mut u = u_in as u32;
        let run = self.runs;
        while u != end {
            self.pi[u as usize] += sigma;
            self.moved_in[u as usize] = run;
            u = self.thread[u as usize];
        }
    }

    /// Whether a node's potential changed during the last run.
    pub(crate) fn moved_in_last_run(&self, u: u32) -> bool {
        self.moved_in[u as usize] == self.runs
    }
}

impl std::fmt::Debug for Simplex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simplex")
            .field("nodes", &self.nodes())
            .field("arcs", &self.real_arcs)
            .finish()
    }
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Min-cost flow by successive shortest paths with Bellman-Ford: slow,
    /// obviously correct, for checking the simplex on small networks.
    #[allow(clippy::needless_range_loop)]
    fn reference_cost(net: &Network) -> Option<i64> {
        let n = net.nodes();
        let m = net.arcs();
        let mut flow = vec![0i64; m];
        let mut excess = net.supply.clone();
        while let Some(s) = (0..n).find(|&u| excess[u] > 0) {
            // Bellman-Ford from s over the residual graph.
            let mut dist = vec![i64::MAX; n];
            let mut via: Vec<Option<(usize, bool)>> = vec![None; n];
            dist[s] = 0;
            for _ in 0..n {
                let mut changed = false;
                for e in 0..m {
                    let (u, v) = (net.source[e] as usize, net.target[e] as usize);
                    if flow[e] < net.cap[e]
                        && dist[u] != i64::MAX
                        && dist[u] + net.cost[e] < dist[v]
                    {
                        dist[v] = dist[u] + net.cost[e];
                        via[v] = Some((e, true));
                        changed = true;
                    }
                    if flow[e] > 0 && dist[v] != i64::MAX && dist[v] - net.cost[e] < dist[u] {
                        dist[u] = dist[v] - net.cost[e];
                        via[u] = Some((e, false));
                        changed = true;
                    }
                }
                if !changed {
                    break;
                }
            }
            let t = (0..n)
                .filter(|&u| excess[u] < 0 && dist[u] != i64::MAX)
                .min_by_key(|&u| (dist[u], u))?;
            let mut amount = excess[s].min(-excess[t]);
            let mut v = t;
            while v != s {
                let (e, fwd) = via[v].expect("path");
                amount = amount.min(if fwd { net.cap[e] - flow[e] } else { flow[e] });
                v = if fwd { net.source[e] } else { net.target[e] } as usize;
            }
            let mut v = t;
            while v != s {
                let (e, fwd) = via[v].expect("path");
                if fwd {
                    flow[e] += amount;
                } else {
                    flow[e] -= amount;
                }
                v = if fwd { net.source[e] } else { net.target[e] } as usize;
            }
            excess[s] -= amount;
            excess[t] += amount;
        }
        Some((0..m).map(|e| flow[e] * net.cost[e]).sum())
    }

    /// A random transportation-like network: sources → middles → root,
    /// with a costly direct arc from every source to the root so that it
    /// is always feasible.
    fn random_net(seed: u64) -> Network {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut rnd = move |k: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % k
        };
        let sources = 1 + rnd(6) as usize;
        let middles = 1 + rnd(5) as usize;
        let mut net = Network::with_nodes(1 + sources + middles, 0);
        let mut total = 0;
        for s in 0..sources {
            let sup = 1 + rnd(20) as i64;
            net.supply[1 + s] = sup;
            total += sup;
            net.add_arc(1 + s as u32, 0, INF, 1000);
            for m in 0..middles {
                if rnd(3) > 0 {
                    let cap = if rnd(2) == 0 { INF } else { 1 + rnd(15) as i64 };
                    net.add_arc(1 + s as u32, (1 + sources + m) as u32, cap, rnd(50) as i64);
                }
            }
        }
        for m in 0..middles {
            let node = (1 + sources + m) as u32;
            net.add_arc(node, 0, 1 + rnd(20) as i64, 0);
            net.add_arc(node, 0, 1 + rnd(20) as i64, 1 + rnd(30) as i64);
            if rnd(2) == 0 && middles > 1 {
                let other = (1 + sources + (m + 1) % middles) as u32;
                net.add_arc(node, other, 1 + rnd(10) as i64, rnd(5) as i64);
            }
        }
        net.supply[0] = -total;
        net
    }

    fn cost_of(net: &Network, flow: &[i64]) -> i64 {
        flow.iter().zip(&net.cost).map(|(f, c)| f * c).sum()
    }

    fn check_optimal(net: &Network, sol: &Solution) {
        // Conservation and bounds.
        let mut bal = net.supply.clone();
        for e in 0..net.arcs() {
            assert!(sol.flow[e] >= 0 && sol.flow[e] <= net.cap[e]);
            bal[net.source[e] as usize] -= sol.flow[e];
            bal[net.target[e] as usize] += sol.flow[e];
        }
        assert!(bal.iter().all(|&b| b == 0), "{bal:?}");
        // Complementary slackness.
        for e in 0..net.arcs() {
            let rc = net.cost[e] + sol.pi[net.source[e] as usize] - sol.pi[net.target[e] as usize];
            if sol.flow[e] < net.cap[e] {
                assert!(rc >= 0, "arc {e} can carry more at reduced cost {rc}");
            }
            if sol.flow[e] > 0 {
                assert!(rc <= 0, "arc {e} carries flow at reduced cost {rc}");
            }
        }
    }

    proptest! {
        #[test]
        fn matches_the_reference_from_the_artificial_start(seed in any::<u64>()) {
            let net = random_net(seed);
            let (sol, _) = solve(net.clone(), None).expect("solve");
            check_optimal(&net, &sol);
            prop_assert_eq!(Some(cost_of(&net, &sol.flow)), reference_cost(&net));
        }

        #[test]
        fn a_warm_start_from_an_optimum_takes_no_pivot_and_a_bad_one_is_refused(seed in any::<u64>()) {
            let net = random_net(seed);
            let (sol, _) = solve(net.clone(), None).expect("solve");
            // Rebuild a start from the optimum by re-solving with the
            // direct arcs as tree arcs: that is the greedy start below.
            let mut flow = vec![0; net.arcs()];
            let mut pred = vec![0u32; net.nodes()];
            // Sources hang from the root by their direct arc (first arc of
            // each source), carrying their whole supply; middles hang from
            // the root by their first arc to it with no flow.
            for u in 1..net.nodes() {
                let e = (0..net.arcs())
                    .find(|&e| net.source[e] as usize == u && net.target[e] == 0)
                    .expect("arc to the root");
                pred[u] = e as u32;
                flow[e] = net.supply[u].max(0);
            }
            let start = Start { flow, pred };
            let (warm, _) = solve(net.clone(), Some(&start)).expect("warm solve");
            prop_assert!(warm.warm);
            check_optimal(&net, &warm);
            prop_assert_eq!(cost_of(&net, &warm.flow), cost_of(&net, &sol.flow));
            // A start whose flow is not conserved is refused.
            let mut bad = start.clone();
            bad.flow[0] += 1;
            let (cold, _) = solve(net.clone(), Some(&bad)).expect("cold solve");
            prop_assert!(!cold.warm);
            prop_assert_eq!(cost_of(&net, &cold.flow), cost_of(&net, &sol.flow));
        }
    }

    #[test]
    fn same_network_same_pivots() {
        let net = random_net(42);
        let (a, _) = solve(net.clone(), None).expect("a");
        let (b, _) = solve(net.clone(), None).expect("b");
        assert_eq!(a.flow, b.flow);
        assert_eq!(a.pi, b.pi);
        assert_eq!(a.pivots, b.pivots);
    }
}
