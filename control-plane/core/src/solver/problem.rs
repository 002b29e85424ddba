//! The steering problem in solver terms, its min-cost-flow network, and the
//! solution read back.
//!
//! A [`Problem`] is what a fleet, its signals, drains, policies and the
//! previous table reduce to: demand units (one per (service, group) with
//! demand), each with candidate arcs to edges and a cost per rps on each;
//! and edges with a planned capacity (`limit`), a hard capacity, and for
//! third parties a commit and an overage price. The bench reads the same
//! structure from the HiGHS anchor's instance format.
//!
//! # The network
//!
//! ```text
//!   unit ─┬─ keep arcs (cap = previous flow) ─────────────> entry
//!         └─ [budget | emergency] ─> hub ─┬─> [domain] ──> entry ─> [commit pool] ─> edge ─> sink
//!                                         └─ unserved (penalty) ───────────────────────────> sink
//! ```
//!
//! - A unit supplies its demand. Its flow reaches the sink through an
//!   edge's *entry* node, or through its *unserved* arc, whose cost is a
//!   penalty above every other cost (it leaves from the hub: dropping
//!   traffic is a move like any other).
//! - Without a previous table the hub is the unit itself. With one, *keep*
//!   arcs carry up to the previous flow on each edge at the plain cost;
//!   moving flow goes through the hub and pays a small `move_cost` (the
//!   tolerance within which the previous table is preferred). With a shift
//!   limit the hub is a node of its own, reached by a *budget* arc (the
//!   share that may move, plus the share that must: weight that no longer
//!   has a usable edge) and an *emergency* arc with a penalty above every
//!   latency or cost gain, as large as what the unit keeps on edges now
//!   above their limit: a drain step, a capacity drop or more demand move
//!   traffic at once, nothing else does.
//! - Resilience: `max_edge_share < 1` caps each (unit, edge) arc and
//!   `max_domain_share < 1` adds a node per (unit, domain) with a capped
//!   arc; both have a parallel penalty arc, so that a group exceeds them
//!   only when the fleet leaves no other way.
//! - An edge node reaches the sink by a free arc up to `limit`, a *hot* arc
//!   up to its hard capacity at a penalty, and an *overflow* arc that only
//!   the starting basis uses. A third-party edge with a commit has, per
//!   cost class, an entry node that either uses the commit pool (free up to
//!   the commit) or pays the overage price weighted by the class's money
//!   weight: the commit is shared by every service on the edge.

use super::simplex::{self, Network, Simplex, Start, INF};

const NONE: u32 = u32::MAX;

/// One edge as the solver sees it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProblemEdge {
    /// The load planned for: capacity × target utilization × drain, minus
    /// load that is not optimized (weighted services), rps.
    pub limit: f64,
    /// Hard capacity (≥ `limit`): load in (limit, capacity] pays `hot_cost`
    /// per rps; more is not possible.
    pub capacity: f64,
    pub hot_cost: f64,
    /// Traffic already paid for, rps.
    pub commit: f64,
    /// Money per rps above the commit; 0: no commit structure (linear money
    /// is then in the arcs' costs).
    pub overage_price: f64,
}

/// One demand unit: a (service, group) with demand.
#[derive(Debug, Clone, PartialEq)]
pub struct Unit {
    pub demand: f64,
    /// Cost class: index into [`Problem::class_weights`].
    pub class: u32,
    pub unserved_cost: f64,
    /// Its arcs: `arcs[first_arc .. first_arc + arc_count]`.
    pub first_arc: u32,
    pub arc_count: u32,
    /// At most this share of demand on one edge (1: no cap).
    pub max_edge_share: f64,
    /// At most this share of demand in one domain (1: no cap).
    pub max_domain_share: f64,
    /// Penalty per rps above either share.
    pub resilience_cost: f64,
    /// Cost per rps of moving flow away from the previous table.
    pub move_cost: f64,
    /// At most this share of demand moves (beyond what must), if limited.
    pub shift_limit: Option<f64>,
    /// Penalty per rps moved beyond the shift limit.
    pub shift_cost: f64,
}

impl Default for Unit {
    fn default() -> Self {
        Self {
            demand: 0.0,
            class: 0,
            unserved_cost: 0.0,
            first_arc: 0,
            arc_count: 0,
            max_edge_share: 1.0,
            max_domain_share: 1.0,
            resilience_cost: 0.0,
            move_cost: 0.0,
            shift_limit: None,
            shift_cost: 0.0,
        }
    }
}

/// A candidate arc of a unit.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UnitArc {
    pub edge: u32,
    /// Cost per rps (latency and linear money, weighted; penalties).
    pub cost: f64,
    /// Share of demand the previous table put here (0 if none).
    pub keep: f64,
    /// Resilience domain id (only compared within a unit).
    pub domain: u32,
}

/// The whole problem.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Problem {
    pub edges: Vec<ProblemEdge>,
    /// Money weight of each cost class (the services' `cost_weight`).
    pub class_weights: Vec<f64>,
    pub units: Vec<Unit>,
    pub arcs: Vec<UnitArc>,
}

impl Problem {
    pub fn unit_arcs(&self, u: usize) -> &[UnitArc] {
        let unit = &self.units[u];
        let a = unit.first_arc as usize;
        &self.arcs[a..a + unit.arc_count as usize]
    }

    /// Whether the edge has the commit structure (an overage price; its
    /// commit may be used up, 0).
    fn has_commit(&self, e: usize) -> bool {
        self.edges[e].overage_price > 0.0
    }
}

/// The solution, in problem units (rps and cost units).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    /// Flow on each unit arc (same index as [`Problem::arcs`]), rps.
    pub arc_flow: Vec<f64>,
    /// Unserved demand per unit, rps.
    pub unserved: Vec<f64>,
    /// Load per edge, rps.
    pub edge_load: Vec<f64>,
    /// Load above `limit` per edge, rps.
    pub edge_hot: Vec<f64>,
    /// Marginal cost of one more rps at each edge (0 with spare capacity).
    pub edge_price: Vec<f64>,
    /// Marginal cost of one more rps entering each edge for each class
    /// (`class * edges + edge`): the edge price plus overage if the commit
    /// is used up.
    pub entry_price: Vec<f64>,
    /// Whether the unit used all of its shift budget.
    pub shift_limited: Vec<bool>,
    /// Flow moved beyond the shift limit per unit, rps.
    pub emergency: Vec<f64>,
    /// Flow above the resilience shares per unit, rps.
    pub resilience_excess: Vec<f64>,
    /// Latency, money, hot and unserved penalties (stability and
    /// resilience terms excluded).
    pub objective: f64,
    pub pivots: u64,
    /// Simplex runs: 1 + the rounds in which pruned arcs joined.
    pub rounds: u32,
    /// Whether the starting basis was used.
    pub warm: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    Keep,
    Move,
    MovePenalty,
    Domain,
    DomainPenalty,
    Budget,
    Emergency,
    Unserved,
    Limit,
    Hot,
    Overflow,
    ToPool,
    Overage,
    Pool,
}

struct Built {
    net: Network,
    start: Start,
    kind: Vec<Kind>,
    /// Unit arc index for Keep/Move/MovePenalty; unit for unit-level arcs;
    /// edge for edge-level arcs; class * edges + edge for ToPool/Overage.
    owner: Vec<u32>,
    /// Entry node per (class, edge).
    entry: Vec<u32>,
    edge_node: Vec<u32>,
    cost_scale: f64,
    flow_scale: f64,
    /// Per unit arc: whether its move arc is in the network (arcs start
    /// pruned to the cheapest few; see [`solve`]).
    active: Vec<bool>,
    /// Per unit: the node its move arcs leave from (`NONE`: no node).
    unit_hub: Vec<u32>,
    /// Per unit: demand, and per unit arc: kept flow, in flow units.
    demand: Vec<i64>,
    keep_units: Vec<i64>,
}

/// A cost in integer units, rounded half away from zero (an inline
/// `round`).
fn to_units(x: f64, scale: f64) -> i64 {
    let v = x * scale;
    if v >= 0.0 {
        (v + 0.5) as i64
    } else {
        -((0.5 - v) as i64)
    }
}

impl Built {
    fn cost(&self, x: f64) -> i64 {
        to_units(x, self.cost_scale)
    }

    /// Adds the move arcs of unit arc `i` of unit `u` (empty), as `build`
    /// does; returns how many arcs were added.
    fn add_move_arcs(&mut self, p: &Problem, net: &mut Simplex, u: usize, i: usize) -> usize {
        let unit = &p.units[u];
        let a = &p.arcs[unit.first_arc as usize + i];
        let n_edges = p.edges.len();
        let from = self.unit_hub[u];
        let x = self.entry[unit.class as usize * n_edges + a.edge as usize];
        let slot = unit.first_arc + i as u32;
        let mut push = |b: &mut Built, cap: i64, cost: i64, kind: Kind| {
            net.add_arc(from, x, cap, cost);
            b.kind.push(kind);
            b.owner.push(slot);
        };
        if unit.max_edge_share < 1.0 {
            let capped = (unit.max_edge_share * self.demand[u] as f64).floor() as i64
                - self.keep_units[slot as usize];
            let mut n = 1;
            if capped > 0 {
                push(self, capped, self.cost(a.cost + unit.move_cost), Kind::Move);
                n += 1;
            }
            let cost = self.cost(a.cost + unit.move_cost + unit.resilience_cost);
            push(self, INF, cost, Kind::MovePenalty);
            n
        } else {
            push(self, INF, self.cost(a.cost + unit.move_cost), Kind::Move);
            1
        }
    }

    /// The cost, in units, of the cheapest move arc of every pruned unit
    /// arc (0 for active ones), computed once for every pricing round.
    fn pruned_costs(&self, p: &Problem) -> Vec<i64> {
        let mut out = vec![0i64; p.arcs.len()];
        for (u, unit) in p.units.iter().enumerate() {
            if self.unit_hub[u] == NONE {
                continue;
            }
            let first = unit.first_arc as usize;
            let n = unit.arc_count as usize;
            let share = unit.max_edge_share;
            let cap = (share * self.demand[u] as f64).floor() as i64;
            for (i, a) in p.arcs[first..first + n].iter().enumerate() {
                if self.active[first + i] {
                    continue;
                }
                let capped = share >= 1.0 || cap > self.keep_units[first + i];
                out[first + i] = if capped {
                    self.cost(a.cost + unit.move_cost)
                } else {
                    self.cost(a.cost + unit.move_cost + unit.resilience_cost)
                };
            }
        }
        out
    }

    /// Pruned unit arcs whose cheapest move arc has a negative reduced
    /// cost under `pi`, as (unit, arc within the unit).
    ///
    /// After the first run, only arcs with an end whose potential moved in
    /// the last run can have become violated (the others were priced
    /// non-negative and have not changed).
    fn violated(&self, p: &Problem, costs: &[i64], sx: &Simplex, all: bool) -> Vec<(u32, u32)> {
        let n_edges = p.edges.len();
        let pi = sx.potentials();
        let mut out = Vec::new();
        for (u, unit) in p.units.iter().enumerate() {
            let hub = self.unit_hub[u];
            if hub == NONE {
                continue;
            }
            let first = unit.first_arc as usize;
            let n = unit.arc_count as usize;
            let pi_hub = pi[hub as usize];
            let hub_moved = all || sx.moved_in_last_run(hub);
            let entries = &self.entry[unit.class as usize * n_edges..];
            let arcs = p.arcs[first..first + n]
                .iter()
                .zip(&self.active[first..first + n])
                .zip(&costs[first..first + n]);
            for (i, ((a, &active), &cost)) in arcs.enumerate() {
                if active {
                    continue;
                }
                let to = entries[a.edge as usize];
                if (hub_moved || sx.moved_in_last_run(to)) && cost + pi_hub - pi[to as usize] < 0 {
                    out.push((u as u32, i as u32));
                }
            }
        }
        out
    }
}

/// Move arcs a unit starts with, beyond those to edges it keeps flow on:
/// its cheapest few. The rest join the network only if pricing with the
/// solved potentials shows one would lower the cost.
const ACTIVE_ARCS: usize = 4;

fn pow2_at_most(x: f64) -> f64 {
    if !(x.is_finite() && x > 0.0) {
        return 1.0;
    }
    2f64.powi(x.log2().floor() as i32)
}

/// Builds the network and a starting basis (see the module docs).
fn build(p: &Problem, prune: bool) -> Built {
    let n_edges = p.edges.len();
    let n_classes = p.class_weights.len().max(1);

    // Scales: every cost, penalties included, below 2^36 units; every flow
    // sum below 2^50 units. Powers of two keep the conversion exact where
    // the input is.
    let mut max_cost: f64 = 1e-9;
    for a in &p.arcs {
        max_cost = max_cost.max(a.cost.abs());
    }
    for u in &p.units {
        max_cost = max_cost
            .max(u.unserved_cost)
            .max(u.resilience_cost)
            .max(u.shift_cost)
            .max(u.move_cost);
    }
    for (e, edge) in p.edges.iter().enumerate() {
        max_cost = max_cost.max(edge.hot_cost);
        if p.has_commit(e) {
            for w in &p.class_weights {
                max_cost = max_cost.max(w * edge.overage_price);
            }
        }
    }
    let overflow_cost = 4.0 * max_cost;
    let cost_scale = pow2_at_most(2f64.powi(36) / overflow_cost);
    let total: f64 = p.units.iter().map(|u| u.demand).sum::<f64>()
        + p.edges.iter().map(|e| e.capacity.max(0.0)).sum::<f64>();
    let flow_scale = pow2_at_most(2f64.powi(50) / total.max(1e-9));
    let c = |x: f64| to_units(x, cost_scale);
    let floor = |x: f64| {
        let v = (x.max(0.0) * flow_scale).floor();
        if v >= INF as f64 {
            INF
        } else {
            v as i64
        }
    };

    // Room for every arc and node up front (no regrowth on big fleets).
    let arcs_hint = 2 * p.arcs.len() + 6 * p.units.len() + (4 + 2 * n_classes) * n_edges;
    let nodes_hint = 1 + 3 * p.units.len() + (2 + n_classes) * n_edges;
    let mut net = Network::with_nodes(1, 0);
    net.reserve(nodes_hint, arcs_hint);
    let root = 0u32;
    let mut kind = Vec::with_capacity(arcs_hint);
    let mut owner = Vec::with_capacity(arcs_hint);
    let mut flow = Vec::with_capacity(arcs_hint);
    let mut pred: Vec<u32> = Vec::with_capacity(nodes_hint);
    pred.push(NONE);

    let add_node = |net: &mut Network, pred: &mut Vec<u32>| -> u32 {
        pred.push(NONE);
        net.add_node()
    };
    macro_rules! arc {
        ($from:expr, $to:expr, $cap:expr, $cost:expr, $kind:expr, $owner:expr, $flow:expr) => {{
            let id = net.add_arc($from, $to, $cap, $cost);
            kind.push($kind);
            owner.push($owner);
            flow.push($flow);
            id
        }};
    }

    // Edge layer nodes.
    let edge_node: Vec<u32> = (0..n_edges)
        .map(|_| add_node(&mut net, &mut pred))
        .collect();
    let mut pool = vec![NONE; n_edges];
    let mut entry = vec![NONE; n_classes * n_edges];
    for e in 0..n_edges {
        if p.has_commit(e) {
            pool[e] = add_node(&mut net, &mut pred);
            for k in 0..n_classes {
                entry[k * n_edges + e] = add_node(&mut net, &mut pred);
            }
        } else {
            for k in 0..n_classes {
                entry[k * n_edges + e] = edge_node[e];
            }
        }
    }
    // Inflow per (class, edge) entry from units, in flow units.
    let mut inflow = vec![0i64; n_classes * n_edges];
    // Tree arcs of full edges that hang from a unit (see `plan_start`).
    let mut edge_pred = vec![NONE; n_edges];
    let mut edge_pred_class = vec![0usize; n_edges];

    // Demand and kept flow per unit, and the kept load per edge: an edge
    // whose kept load is above its new limit (a capacity drop, a drain
    // step, more demand) forces moves beyond the shift limit.
    let demand: Vec<i64> = p
        .units
        .iter()
        .map(|u| (u.demand * flow_scale).round().max(0.0) as i64)
        .collect();
    let mut keep_units = vec![0i64; p.arcs.len()];
    let mut keep_load = vec![0i64; n_edges];
    for (ui, unit) in p.units.iter().enumerate() {
        let d = demand[ui];
        let mut kept = 0i64;
        for (i, a) in p.unit_arcs(ui).iter().enumerate() {
            if a.keep > 0.0 {
                let want = ((a.keep * d as f64).floor() as i64).min(d - kept).max(0);
                keep_units[unit.first_arc as usize + i] = want;
                keep_load[a.edge as usize] += want;
                kept += want;
            }
        }
    }
    let limit_units: Vec<i64> = p
        .edges
        .iter()
        .map(|e| floor(e.limit.min(e.capacity)))
        .collect();
    let overloaded: Vec<bool> = keep_load
        .iter()
        .zip(&limit_units)
        .map(|(l, lim)| l > lim)
        .collect();
    let plan = plan_start(p, &demand, &mut keep_units, &keep_load, &limit_units);
    // Which move arcs start in the network: per unit its cheapest few, those
    // to edges it keeps flow on, and its starting destination; all of them
    // for a unit with per-domain caps (their nodes are built up front).
    let mut active = vec![false; p.arcs.len()];
    for (u, unit) in p.units.iter().enumerate() {
        let first = unit.first_arc as usize;
        let n = unit.arc_count as usize;
        if !prune || unit.max_domain_share < 1.0 {
            active[first..first + n].iter_mut().for_each(|x| *x = true);
            continue;
        }
        let kept: i64 = keep_units[first..first + n].iter().sum();
        if kept > 0 && kept == demand[u] {
            // Everything stays where the previous table put it: the unit
            // hangs from its kept edge, and a move arc joins only if
            // pricing finds that moving pays. A separate hub needs its one
            // tree arc.
            if unit.shift_limit.is_some() {
                active[first + plan.dest[u] as usize] = true;
            }
            continue;
        }
        if n <= ACTIVE_ARCS + 1 {
            active[first..first + n].iter_mut().for_each(|x| *x = true);
            continue;
        }
        // The cheapest few, by (cost, position): insertion into a short
        // sorted list.
        let arcs = &p.arcs[first..first + n];
        let mut best = [(f64::INFINITY, usize::MAX); ACTIVE_ARCS];
        for (i, a) in arcs.iter().enumerate() {
            if a.cost < best[ACTIVE_ARCS - 1].0 {
                let mut j = ACTIVE_ARCS - 1;
                while j > 0 && a.cost < best[j - 1].0 {
                    best[j] = best[j - 1];
                    j -= 1;
                }
                best[j] = (a.cost, i);
            }
        }
        for &(_, i) in &best {
            if i < n {
                active[first + i] = true;
            }
        }
        for i in 0..n {
            if keep_units[first + i] > 0 {
                active[first + i] = true;
            }
        }
        active[first + plan.dest[u] as usize] = true;
    }
    let mut unit_hub = vec![NONE; p.units.len()];

    for (ui, unit) in p.units.iter().enumerate() {
        let arcs = p.unit_arcs(ui);
        if arcs.is_empty() && unit.demand <= 0.0 {
            continue;
        }
        let g = add_node(&mut net, &mut pred);
        let d = demand[ui];
        net.supply[g as usize] = d;
        net.supply[root as usize] -= d;
        let k = unit.class as usize;
        if arcs.is_empty() {
            let unserved = arc!(
                g,
                root,
                INF,
                c(unit.unserved_cost),
                Kind::Unserved,
                ui as u32,
                d
            );
            pred[g as usize] = unserved;
            continue;
        }

        // Keep arcs.
        let dest = plan.dest[ui] as usize;
        let mut keep_to_dest = NONE;
        let all_kept = keep_units[unit.first_arc as usize..unit.first_arc as usize + arcs.len()]
            .iter()
            .sum::<i64>()
            == d;
        let keep_of = &keep_units[unit.first_arc as usize..unit.first_arc as usize + arcs.len()];
        for (i, a) in arcs.iter().enumerate() {
            let want = keep_of[i];
            if want > 0 {
                let x = entry[k * n_edges + a.edge as usize];
                inflow[k * n_edges + a.edge as usize] += want;
                // The unit's tree arc gets one flow unit (~1e-11 rps) of
                // room, so that it is strongly feasible; others are full.
                let room = i64::from(i == dest && all_kept);
                let id = arc!(
                    g,
                    x,
                    want + room,
                    c(a.cost),
                    Kind::Keep,
                    unit.first_arc + i as u32,
                    want
                );
                if i == dest {
                    keep_to_dest = id;
                }
                if plan.edge_parent[a.edge as usize] == unit.first_arc + i as u32 {
                    edge_pred[a.edge as usize] = id;
                    edge_pred_class[a.edge as usize] = k;
                }
            }
        }
        let kept: i64 = keep_of.iter().sum();
        let rest = d - kept;

        // Hub.
        // Hub. With a shift limit, what may move goes through the budget
        // arc; more only through the emergency arc, as much as the unit
        // keeps on edges that are now above their limit.
        let (hub, hub_pred_from_g) = match unit.shift_limit {
            Some(s) => {
                let n = add_node(&mut net, &mut pred);
                let budget_cap = (s.clamp(0.0, 1.0) * d as f64).floor() as i64 + rest;
                let forced: i64 = arcs
                    .iter()
                    .zip(keep_of)
                    .filter(|(a, _)| overloaded[a.edge as usize])
                    .map(|(_, k)| *k)
                    .sum();
                let mut pred_g = NONE;
                let mut left = rest;
                if budget_cap > 0 {
                    let f = left.min(budget_cap);
                    let a = arc!(g, n, budget_cap, 0, Kind::Budget, ui as u32, f);
                    left -= f;
                    if f < budget_cap {
                        pred_g = a;
                    }
                }
                // Never empty, so that the unit always has a tree arc with
                // room (one flow unit is ~1e-11 rps).
                let emergency_cap = forced.max(1) + left;
                let a = arc!(
                    g,
                    n,
                    emergency_cap,
                    c(unit.shift_cost),
                    Kind::Emergency,
                    ui as u32,
                    left
                );
                if pred_g == NONE {
                    pred_g = a;
                }
                (n, Some(pred_g))
            }
            None => (g, None),
        };
        if let Some(a) = hub_pred_from_g {
            pred[g as usize] = a;
        }
        // Unserved demand leaves from the hub: dropping traffic is a move.
        arc!(
            hub,
            root,
            INF,
            c(unit.unserved_cost),
            Kind::Unserved,
            ui as u32,
            0
        );

        // Keep per domain and the domain structure.
        let domains: Vec<u32> = if unit.max_domain_share < 1.0 {
            let mut ds: Vec<u32> = arcs.iter().map(|a| a.domain).collect();
            ds.sort_unstable();
            ds.dedup();
            ds
        } else {
            Vec::new()
        };
        let mut domain_node = Vec::with_capacity(domains.len());
        for &dom in &domains {
            let x = add_node(&mut net, &mut pred);
            let keep_d: i64 = arcs
                .iter()
                .zip(keep_of)
                .filter(|(a, _)| a.domain == dom)
                .map(|(_, k)| *k)
                .sum();
            let capped = (unit.max_domain_share * d as f64).floor() as i64 - keep_d;
            let through = if arcs[dest].domain == dom { rest } else { 0 };
            let mut left = through;
            let mut pred_x = NONE;
            if capped > 0 {
                let f = left.min(capped);
                let a = arc!(hub, x, capped, 0, Kind::Domain, ui as u32, f);
                left -= f;
                if f < capped {
                    pred_x = a;
                }
            }
            let a = arc!(
                hub,
                x,
                INF,
                c(unit.resilience_cost),
                Kind::DomainPenalty,
                ui as u32,
                left
            );
            if pred_x == NONE {
                pred_x = a;
            }
            domain_node.push((dom, x, pred_x));
        }

        // Move arcs, from the hub or from the unit's domain node.
        unit_hub[ui] = hub;
        let mut hub_pred = NONE;
        for (i, a) in arcs.iter().enumerate() {
            if !active[unit.first_arc as usize + i] {
                continue;
            }
            let from = if domains.is_empty() {
                hub
            } else {
                domain_node
                    .iter()
                    .find(|(dom, _, _)| *dom == a.domain)
                    .map_or(hub, |(_, x, _)| *x)
            };
            let x = entry[k * n_edges + a.edge as usize];
            let slot = unit.first_arc + i as u32;
            let through = if i == dest { rest } else { 0 };
            inflow[k * n_edges + a.edge as usize] += through;
            let mut left = through;
            let mut first_open = NONE;
            if unit.max_edge_share < 1.0 {
                let capped = (unit.max_edge_share * d as f64).floor() as i64 - keep_of[i];
                if capped > 0 {
                    let f = left.min(capped);
                    let id = arc!(
                        from,
                        x,
                        capped,
                        c(a.cost + unit.move_cost),
                        Kind::Move,
                        slot,
                        f
                    );
                    left -= f;
                    if f < capped {
                        first_open = id;
                    }
                }
                let id = arc!(
                    from,
                    x,
                    INF,
                    c(a.cost + unit.move_cost + unit.resilience_cost),
                    Kind::MovePenalty,
                    slot,
                    left
                );
                if first_open == NONE {
                    first_open = id;
                }
            } else {
                first_open = arc!(
                    from,
                    x,
                    INF,
                    c(a.cost + unit.move_cost),
                    Kind::Move,
                    slot,
                    left
                );
            }
            if i == dest {
                if from == hub {
                    hub_pred = first_open;
                } else if let Some(entry) = domain_node.iter_mut().find(|(_, x, _)| *x == from) {
                    // The domain node hangs from the edge; the hub from the
                    // domain node.
                    hub_pred = entry.2;
                    entry.2 = first_open;
                }
            } else if from != hub {
                // A domain node with no flow yet hangs from its first edge.
                if let Some(entry) = domain_node.iter_mut().find(|(_, x, _)| *x == from) {
                    if pred[entry.1 as usize] == NONE {
                        pred[entry.1 as usize] = first_open;
                    }
                }
            }
        }
        for (dom, x, pred_x) in &domain_node {
            if arcs[dest].domain == *dom {
                pred[*x as usize] = *pred_x;
            }
        }
        pred[hub as usize] = hub_pred;
        if rest == 0 && keep_to_dest != NONE {
            // Nothing moves: the unit hangs from its destination by its
            // keep arc, at the plain cost (exact potentials).
            pred[g as usize] = keep_to_dest;
        }
    }

    // Edge layer arcs and their flows.
    for e in 0..n_edges {
        let edge = &p.edges[e];
        let en = edge_node[e];
        let limit = floor(edge.limit.min(edge.capacity));
        let load: i64 = (0..n_classes).map(|k| inflow[k * n_edges + e]).sum();
        // Full and hanging from a unit (see `plan_start`).
        let from_unit = edge_pred[e] != NONE && load == limit;
        let mut pred_en = NONE;
        if p.has_commit(e) {
            // A used-up commit keeps a pool of one flow unit (~1e-11 rps).
            let commit_cap = floor(edge.commit).max(1);
            let pn = pool[e];
            let mut used = 0i64;
            let mut classes = Vec::with_capacity(n_classes);
            for k in 0..n_classes {
                let x = entry[k * n_edges + e];
                let f = inflow[k * n_edges + e];
                // Each class's inflow goes whole to the pool or to overage.
                let via_pool = f > 0 && f <= commit_cap - used;
                let (fp, fo) = if via_pool { (f, 0) } else { (0, f) };
                used += fp;
                let a_pool = arc!(x, pn, INF, 0, Kind::ToPool, (k * n_edges + e) as u32, fp);
                let a_over = arc!(
                    x,
                    en,
                    INF,
                    c(p.class_weights.get(k).copied().unwrap_or(1.0) * edge.overage_price),
                    Kind::Overage,
                    (k * n_edges + e) as u32,
                    fo
                );
                pred[x as usize] = if fp > 0 { a_pool } else { a_over };
                classes.push((x, a_pool, a_over, fp, fo));
            }
            let a_pool_out = arc!(pn, en, commit_cap, 0, Kind::Pool, e as u32, used);
            pred[pn as usize] = if used < commit_cap {
                a_pool_out
            } else {
                // The pool is full: it hangs from a class that fills it,
                // and that class from the edge by its overage arc.
                let (x, a_pool, a_over, ..) = classes
                    .iter()
                    .copied()
                    .find(|t| t.3 > 0)
                    .unwrap_or(classes[0]);
                pred[x as usize] = a_over;
                a_pool
            };
            if from_unit {
                // The parent unit's class hangs from it; the edge from that
                // class, through the pool or its overage arc.
                let (x, a_pool, a_over, fp, _) = classes[edge_pred_class[e]];
                pred[x as usize] = edge_pred[e];
                if fp > 0 {
                    // The pool hangs from that class, the edge from the
                    // pool, and the other classes from the pool or the edge
                    // by the arc they use.
                    pred[pn as usize] = a_pool;
                    pred_en = a_pool_out;
                    for &(x2, a_pool2, a_over2, fp2, _) in &classes {
                        if x2 != x {
                            pred[x2 as usize] = if fp2 > 0 { a_pool2 } else { a_over2 };
                        }
                    }
                } else {
                    pred_en = a_over;
                    if used >= commit_cap {
                        // The pool hangs from another class that fills it.
                        if let Some((x2, a_pool2, a_over2, ..)) =
                            classes.iter().copied().find(|t| t.3 > 0 && t.0 != x)
                        {
                            pred[pn as usize] = a_pool2;
                            pred[x2 as usize] = a_over2;
                        }
                    }
                }
            }
        } else if from_unit {
            pred_en = edge_pred[e];
        }
        let hot = floor(edge.capacity) - limit;
        let mut left = load;
        let mut pred_e = NONE;
        if limit > 0 {
            let f = left.min(limit);
            let a = arc!(en, root, limit, 0, Kind::Limit, e as u32, f);
            left -= f;
            if f < limit {
                pred_e = a;
            }
        }
        if hot > 0 {
            let f = left.min(hot);
            let a = arc!(en, root, hot, c(edge.hot_cost), Kind::Hot, e as u32, f);
            left -= f;
            if f < hot && pred_e == NONE {
                pred_e = a;
            }
        }
        let a = arc!(
            en,
            root,
            INF,
            c(overflow_cost),
            Kind::Overflow,
            e as u32,
            left
        );
        if pred_e == NONE {
            pred_e = a;
        }
        pred[en as usize] = if pred_en != NONE { pred_en } else { pred_e };
    }

    Built {
        net,
        start: Start { flow, pred },
        kind,
        owner,
        entry,
        edge_node,
        cost_scale,
        flow_scale,
        active,
        unit_hub,
        demand,
        keep_units,
    }
}

/// How the starting basis hangs together (see [`plan_start`]).
struct Plan {
    /// Per unit: the arc (index within the unit) its starting path uses.
    dest: Vec<u32>,
    /// Per edge: the unit arc (global index) whose keep arc it hangs from,
    /// or `NONE`.
    edge_parent: Vec<u32>,
}

/// Chooses the starting basis's shape so that its potentials are close to
/// the previous optimum's duals, which is what makes a warm re-solve take
/// few pivots:
///
/// - a unit that must move flow sends it to its cheapest arc;
/// - an edge below its limit hangs from the sink (potential 0: no price);
/// - an edge exactly at its limit (a binding edge in the previous table)
///   hangs from a unit that also keeps flow on an edge already placed, by
///   its keep arc: its potential is then that unit's alternative, which is
///   the edge's price when the unit is the marginal (split) one;
/// - a unit with nothing to move hangs from one of its kept edges, chosen
///   in the same breadth-first order from the sink.
///
/// Kept flows are first topped up by their rounding residue (a few flow
/// units, ~1e-11 rps) where that puts an edge exactly at its limit.
fn plan_start(
    p: &Problem,
    demand: &[i64],
    keep_units: &mut [i64],
    keep_load: &[i64],
    limit_units: &[i64],
) -> Plan {
    let n_edges = p.edges.len();
    let mut rest: Vec<i64> = p
        .units
        .iter()
        .enumerate()
        .map(|(u, unit)| {
            let first = unit.first_arc as usize;
            demand[u]
                - keep_units[first..first + unit.arc_count as usize]
                    .iter()
                    .sum::<i64>()
        })
        .collect();
    // Kept arcs per edge (global arc indices), in unit order.
    let mut by_edge: Vec<Vec<u32>> = vec![Vec::new(); n_edges];
    for (i, a) in p.arcs.iter().enumerate() {
        if keep_units[i] > 0 {
            by_edge[a.edge as usize].push(i as u32);
        }
    }
    let mut arc_unit = vec![0u32; p.arcs.len()];
    for (u, unit) in p.units.iter().enumerate() {
        let first = unit.first_arc as usize;
        arc_unit[first..first + unit.arc_count as usize]
            .iter_mut()
            .for_each(|x| *x = u as u32);
    }
    let unit_of = |arc: u32| arc_unit[arc as usize] as usize;
    // Top up edges a rounding residue below their limit.
    let mut load = keep_load.to_vec();
    for e in 0..n_edges {
        if load[e] >= limit_units[e] {
            continue;
        }
        let gap = limit_units[e] - load[e];
        if gap > by_edge[e].len() as i64 + 2 {
            continue;
        }
        let mut left = gap;
        for &arc in &by_edge[e] {
            let u = unit_of(arc);
            let take = left.min(rest[u]);
            if take > 0 {
                keep_units[arc as usize] += take;
                rest[u] -= take;
                left -= take;
            }
            if left == 0 {
                break;
            }
        }
        load[e] = limit_units[e] - left;
    }
    // Destinations of units that move flow, and the load they add.
    let mut dest = vec![NONE; p.units.len()];
    for (u, unit) in p.units.iter().enumerate() {
        let arcs = p.unit_arcs(u);
        if rest[u] > 0 && !arcs.is_empty() {
            // The cheapest arc whose edge has room for it, else the cheapest.
            let by_cost =
                |i: &usize, j: &usize| arcs[*i].cost.total_cmp(&arcs[*j].cost).then(i.cmp(j));
            let fits = |i: &usize| {
                let e = arcs[*i].edge as usize;
                load[e] + rest[u] <= limit_units[e]
            };
            let cheapest = (0..arcs.len())
                .filter(fits)
                .min_by(by_cost)
                .or_else(|| (0..arcs.len()).min_by(by_cost))
                .unwrap_or(0);
            dest[u] = cheapest as u32;
            load[arcs[cheapest].edge as usize] += rest[u];
            // A unit moving flow is placed with its destination edge.
            by_edge[arcs[cheapest].edge as usize].push(unit.first_arc + cheapest as u32);
        }
    }
    // Breadth-first from the sink.
    let mut edge_parent = vec![NONE; n_edges];
    let mut placed_edge = vec![false; n_edges];
    let mut placed_unit = vec![false; p.units.len()];
    let mut queue: std::collections::VecDeque<usize> = std::collections::VecDeque::new();
    for e in 0..n_edges {
        let full = load[e] == limit_units[e] && limit_units[e] > 0;
        if !full {
            placed_edge[e] = true;
            queue.push_back(e);
        }
    }
    while let Some(e) = queue.pop_front() {
        for &arc in &by_edge[e] {
            let u = unit_of(arc);
            if placed_unit[u] {
                continue;
            }
            let first = p.units[u].first_arc;
            let i = arc - first;
            if dest[u] != NONE && dest[u] != i {
                continue; // placed with its own destination
            }
            dest[u] = i;
            placed_unit[u] = true;
            // Its other full edges hang from it.
            for (j, a) in p.unit_arcs(u).iter().enumerate() {
                let f = a.edge as usize;
                if !placed_edge[f] && keep_units[first as usize + j] > 0 {
                    placed_edge[f] = true;
                    edge_parent[f] = first + j as u32;
                    queue.push_back(f);
                }
            }
        }
    }
    // Units not reached: the largest kept arc (else the cheapest).
    for (u, d) in dest.iter_mut().enumerate() {
        if *d != NONE {
            continue;
        }
        let arcs = p.unit_arcs(u);
        let first = p.units[u].first_arc as usize;
        *d = (0..arcs.len())
            .max_by(|&i, &j| {
                keep_units[first + i]
                    .cmp(&keep_units[first + j])
                    .then(arcs[j].cost.total_cmp(&arcs[i].cost))
                    .then(j.cmp(&i))
            })
            .unwrap_or(0) as u32;
    }
    Plan { dest, edge_parent }
}

/// Solves a problem. Deterministic: the same problem gives the same
/// outcome, bit for bit.
///
/// The network starts with each unit's cheapest few move arcs; after each
/// solve, every pruned arc is priced with the potentials, and those that
/// would lower the cost join, the solve resuming from its last basis. When
/// none would, the flow is optimal for the whole network (the pruned arcs
/// carry nothing and have non-negative reduced costs).
pub fn solve(p: &Problem) -> Outcome {
    let mut built = build(p, true);
    let mut sx = Simplex::start(std::mem::take(&mut built.net), Some(&built.start));
    if !sx.is_warm() {
        // The starting basis was refused (a bug, but not a wrong answer):
        // no pruning, from the artificial basis.
        debug_assert!(false, "starting basis refused");
        built = build(p, false);
        sx = Simplex::start(std::mem::take(&mut built.net), None);
    }
    built.start = Start::default();
    // A re-solve from a previous table starts near the optimum: its pivots
    // are local chains, which local pricing follows.
    sx.set_local_pricing(built.keep_units.iter().any(|&k| k > 0));
    let costs = built.pruned_costs(p);
    let mut rounds = 0;
    loop {
        rounds += 1;
        if let Err(e) = sx.run() {
            // Every unit has an unserved arc and costs are non-negative, so
            // this is a bug; fail safe with everything unserved.
            debug_assert!(false, "steering network not solved: {e}");
            return failed(p);
        }
        let joining = built.violated(p, &costs, &sx, rounds == 1);
        if joining.is_empty() {
            break;
        }
        for (u, i) in joining {
            let (u, i) = (u as usize, i as usize);
            built.active[p.units[u].first_arc as usize + i] = true;
            built.add_move_arcs(p, &mut sx, u, i);
        }
    }
    match sx.finish() {
        Ok((sol, net)) => {
            let mut out = read_back(p, &built, &sol, &net);
            out.rounds = rounds;
            out
        }
        Err(e) => {
            debug_assert!(false, "steering network not solved: {e}");
            failed(p)
        }
    }
}

fn failed(p: &Problem) -> Outcome {
    Outcome {
        arc_flow: vec![0.0; p.arcs.len()],
        unserved: p.units.iter().map(|u| u.demand).collect(),
        edge_load: vec![0.0; p.edges.len()],
        edge_hot: vec![0.0; p.edges.len()],
        edge_price: vec![0.0; p.edges.len()],
        entry_price: vec![0.0; p.edges.len() * p.class_weights.len().max(1)],
        shift_limited: vec![false; p.units.len()],
        emergency: vec![0.0; p.units.len()],
        resilience_excess: vec![0.0; p.units.len()],
        objective: f64::INFINITY,
        pivots: 0,
        rounds: 0,
        warm: false,
    }
}

fn read_back(p: &Problem, b: &Built, sol: &simplex::Solution, net: &Network) -> Outcome {
    let n_edges = p.edges.len();
    let fs = b.flow_scale;
    let mut out = Outcome {
        arc_flow: vec![0.0; p.arcs.len()],
        unserved: vec![0.0; p.units.len()],
        edge_load: vec![0.0; n_edges],
        edge_hot: vec![0.0; n_edges],
        edge_price: vec![0.0; n_edges],
        entry_price: vec![0.0; b.entry.len()],
        shift_limited: vec![false; p.units.len()],
        emergency: vec![0.0; p.units.len()],
        resilience_excess: vec![0.0; p.units.len()],
        objective: 0.0,
        rounds: 1,
        pivots: sol.pivots,
        warm: sol.warm,
    };
    let mut arc_units = vec![0i64; p.arcs.len()];
    let mut objective = 0.0;
    for (i, &f) in sol.flow.iter().enumerate() {
        let o = b.owner[i] as usize;
        match b.kind[i] {
            Kind::Keep | Kind::Move | Kind::MovePenalty => {
                arc_units[o] += f;
                if b.kind[i] == Kind::MovePenalty {
                    out.resilience_excess[p.arc_unit(o)] += f as f64 / fs;
                }
            }
            Kind::DomainPenalty => out.resilience_excess[o] += f as f64 / fs,
            Kind::Budget => {
                if f > 0 && f == net.cap[i] {
                    out.shift_limited[o] = true;
                }
            }
            Kind::Emergency => {
                out.emergency[o] += f as f64 / fs;
                if f > 0 {
                    out.shift_limited[o] = true;
                }
            }
            Kind::Unserved => {
                let x = f as f64 / fs;
                out.unserved[o] += x;
                objective += x * p.units[o].unserved_cost;
            }
            Kind::Limit | Kind::Overflow => out.edge_load[o] += f as f64 / fs,
            Kind::Hot => {
                let x = f as f64 / fs;
                out.edge_load[o] += x;
                out.edge_hot[o] += x;
                objective += x * p.edges[o].hot_cost;
            }
            Kind::Overage => {
                let k = o / n_edges.max(1);
                let e = o % n_edges.max(1);
                objective += f as f64 / fs
                    * p.class_weights.get(k).copied().unwrap_or(1.0)
                    * p.edges[e].overage_price;
            }
            Kind::Domain | Kind::ToPool | Kind::Pool => {}
        }
    }
    for (i, f) in arc_units.iter().enumerate() {
        let x = *f as f64 / fs;
        out.arc_flow[i] = x;
        objective += x * p.arcs[i].cost;
    }
    out.objective = objective;
    let cs = b.cost_scale;
    for e in 0..n_edges {
        out.edge_price[e] = -(sol.pi[b.edge_node[e] as usize] as f64) / cs;
    }
    for (i, &x) in b.entry.iter().enumerate() {
        out.entry_price[i] = -(sol.pi[x as usize] as f64) / cs;
    }
    out
}

impl Problem {
    /// The unit an arc index belongs to.
    fn arc_unit(&self, arc: usize) -> usize {
        // Units are laid out in arc order.
        self.units
            .partition_point(|u| (u.first_arc as usize + u.arc_count as usize) <= arc)
    }
}
