//! The steering solver: a pure function of (fleet, signals, drains, previous
//! routing, now) → routing table.
//!
//! # What it decides
//!
//! For every (service, client group) a weighted list of edges (weights plus
//! an explicit unserved share sum to 1), and for every edge its predicted
//! load and upstream split across origins. For `optimize` services it
//! minimises, jointly over every service and group (edges are shared):
//!
//! - latency × `latency_weight` plus money × `cost_weight` per rps, where
//!   money is `cost_per_unit` on self-built edges and, on third-party
//!   edges, nothing inside the commit (already paid) and the overage price
//!   above it — the commit is shared by every service on the edge;
//! - subject to each edge's effective capacity (`min(declared, measured) ×
//!   drain factor`) × `target_utilization`;
//! - with penalties, in increasing order, for: moving away from the
//!   previous table ([`KEEP_TOLERANCE`]), missing the resilience minimum,
//!   exceeding `max_latency_ms`, moving more than `max_shift`, running an
//!   edge above its target utilization, and leaving demand unserved. Each
//!   penalty is far above every latency or money difference, so a
//!   constraint gives way only when the ones before it leave no choice;
//!   unserved demand is the last resort and is always reported.
//!
//! `weighted` services keep the operator's static weights (health- and
//! drain-aware, renormalised); their load counts against edge capacity
//! before the optimisation.
//!
//! # The algorithm, and why
//!
//! Once latency, money and policy are folded into per-rps costs, the
//! problem is a minimum-cost flow on a sparse bipartite graph: groups (with
//! demand) → edges (with capacity) → a sink, plus a direct penalty arc from
//! every group to the sink for unserved demand. A third party's commit is a
//! convex piecewise-linear cost (free up to the commit, then the overage
//! price), which a network represents exactly with two parallel paths;
//! headroom, resilience caps and the shift budget are capacities of extra
//! arcs and nodes (see [`problem`]). So the LP that the HiGHS anchor solves
//! with a general simplex is, here, solved exactly by a **network
//! simplex** (`simplex.rs`), because:
//!
//! - it works on the graph itself (a spanning tree and node potentials), so
//!   an iteration costs a path in a tree, not a factorisation: the bench's
//!   10,000 groups × 1,000 edges × 20 candidates solve an order of magnitude
//!   faster than HiGHS, in tens of MB;
//! - it is exact — a vertex of the LP, not an approximation as auction or
//!   cost-scaling methods stopped early would be — and, run in integers
//!   (rps and costs scaled by powers of two), deterministic: the same input
//!   takes the same pivots and gives bit-identical weights;
//! - it starts from any basis, which makes re-solves cheap: the previous
//!   table's flows sit on *keep* arcs at their bounds, units hang from the
//!   edges they keep and binding edges from the units they share, so the
//!   starting potentials are the previous optimum's duals and a change such
//!   as one edge going down is a few hundred local pivots (priced around
//!   the subtree that last moved);
//! - its duals are the edges' shadow prices (what one more rps of capacity
//!   would save), which explain why a weight is what it is.
//!
//! Each unit starts with only its cheapest few candidate arcs (and, when
//! re-solving, none beyond what it keeps); after each run the others are
//! priced with the potentials and the violating ones join, the run resuming
//! from its basis. When none violates, the flow is optimal for the full
//! graph, so pruning costs nothing in optimality.
//!
//! Successive shortest paths would need a Dijkstra per group (10,000+ per
//! solve); cost scaling is fast but approximate unless run to the end, and
//! harder to warm-start; a general LP solver pays for generality (HiGHS:
//! ~1.2 s on the bench instance).
//!
//! # Stability and safety
//!
//! - Previous weights on still-usable edges are kept unless moving saves more
//!   than [`KEEP_TOLERANCE`] of the largest per-rps cost per rps moved.
//! - With `max_shift` below 1, a row moves at most that share of its demand
//!   per table; weight on an edge that is down or fully drained, and load
//!   above a reduced capacity, move at once.
//! - A group whose candidates are all down fails open (they are treated as
//!   healthy for it) and is flagged; a fully drained edge never gets weight.
//! - Groups with zero demand still get a row (GeoDNS answers them): the
//!   marginally cheapest usable candidates given the edges' prices.

pub mod instance;
pub mod problem;
mod simplex;

use std::collections::BTreeMap;

use crate::diff;
use crate::drain::DrainSet;
use crate::fleet::{ClientGroup, Edge, Fleet, PolicyMode, Service};
use crate::ids::EdgeId;
use crate::routing::{
    EdgeLoad, EdgeWeight, GroupRouting, OriginLoad, OriginWeight, Routing, SolveSummary,
};
use crate::signals::{Health, Signals};

use problem::{Problem, ProblemEdge, Unit, UnitArc};

/// Everything a routing decision depends on.
#[derive(Debug, Clone, Copy)]
pub struct SolveInput<'a> {
    pub fleet: &'a Fleet,
    pub signals: &'a Signals,
    pub drains: &'a DrainSet,
    /// The routing currently published, if any.
    pub previous: Option<&'a crate::routing::Routing>,
    /// The time of the decision, ms since the Unix epoch.
    pub now_ms: i64,
}

/// Variations of a solve for what-if analyses.
#[derive(Debug, Clone, Copy, Default)]
pub struct SolveOptions {
    /// Ignore every service's `max_shift` (e.g. N−1: a loss is sudden).
    pub ignore_shift_limit: bool,
}

/// What a solve did, for benches and diagnostics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SolveStats {
    /// Demand units ((service, group) with demand) in the flow problem.
    pub units: usize,
    /// Candidate arcs in the flow problem.
    pub arcs: usize,
    pub pivots: u64,
    /// Simplex runs (pruned candidate arcs join between runs).
    pub rounds: u32,
    /// Whether the solver's starting basis was used.
    pub warm_start: bool,
}

/// A move is made only if it saves more than this share of the largest
/// per-rps cost (latency and money, weighted) per rps moved; within it the
/// previous table is preferred.
pub const KEEP_TOLERANCE: f64 = 0.01;

/// Penalties per rps, as multiples of the largest per-rps cost of the
/// solve (latency × weight + money × weight over every usable candidate of
/// a group with demand, at least 1). Their order is the order in which
/// constraints give way when the fleet leaves no other choice.
pub mod penalty {
    /// Per rps of a group above `1 / min_edges` on one edge or `1 /
    /// min_domains` in one domain.
    pub const RESILIENCE: f64 = 4.0;
    /// Per rps sent to an edge above `max_latency_ms`.
    pub const LATENCY: f64 = 16.0;
    /// Per rps moved beyond `max_shift`.
    pub const SHIFT: f64 = 64.0;
    /// Per rps above an edge's target utilization (up to its capacity).
    pub const HOT: f64 = 256.0;
    /// Per rps of unserved demand.
    pub const UNSERVED: f64 = 1024.0;
}
use penalty::{
    HOT as HOT_PENALTY, LATENCY as LATENCY_PENALTY, RESILIENCE as RESILIENCE_PENALTY,
    SHIFT as SHIFT_PENALTY, UNSERVED as UNSERVED_PENALTY,
};

/// Computes the routing for every (service, group) and every edge.
pub fn solve(input: SolveInput<'_>) -> Routing {
    solve_with(input, SolveOptions::default()).0
}

/// What the solver knows about one edge.
#[derive(Debug, Clone)]
pub(crate) struct EdgeState<'a> {
    pub edge: &'a Edge,
    pub drain: f64,
    pub health: Health,
    /// min(declared, measured) × drain.
    pub effective: f64,
}

impl EdgeState<'_> {
    /// Not drained to zero.
    pub fn alive(&self) -> bool {
        self.drain > 0.0 && self.effective > 0.0
    }
}

pub(crate) fn edge_states<'a>(
    fleet: &'a Fleet,
    signals: &Signals,
    drains: &DrainSet,
) -> Vec<EdgeState<'a>> {
    fleet
        .edges
        .values()
        .map(|e| {
            let drain = drains.factor(e.domains());
            let capacity = signals.capacity(&e.id, e.capacity_rps);
            EdgeState {
                edge: e,
                drain,
                health: signals.health(&e.id),
                effective: capacity * drain,
            }
        })
        .collect()
}

/// The edge index of a candidate (robust to a fleet whose `edges` map was
/// changed after it was checked).
///
/// [`crate::fleet::Candidate::edge_index`] is trusted when it is in range:
/// a checked fleet is not changed after [`Fleet::from_spec`].
fn candidate_index(
    fleet: &Fleet,
    states: &[EdgeState<'_>],
    edge: &EdgeId,
    hint: usize,
) -> Option<usize> {
    if hint < states.len() {
        debug_assert_eq!(&states[hint].edge.id, edge);
        return Some(hint);
    }
    fleet.edges.keys().position(|id| id == edge)
}

/// FNV-1a, for looking ids up (a hash map that is never iterated, so its
/// order cannot leak into a decision).
#[derive(Debug, Default, Clone, Copy)]
struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }
}

type FnvBuild = std::hash::BuildHasherDefault<Fnv>;

/// A usable candidate of a pending row.
#[derive(Debug, Clone, Copy)]
struct Cand {
    /// Position in the group's `candidates`.
    pos: u32,
    /// Edge index.
    edge: u32,
    /// Above the policy's `max_latency_ms`.
    over: bool,
    /// Resilience domain id (0 without `min_domains`).
    domain: u32,
}

/// A (service, group) of an `optimize` service, on its way to a row.
struct Pending<'a> {
    service: usize,
    class: u32,
    group: &'a ClientGroup,
    demand: f64,
    /// Usable candidates, in candidate (edge id) order: a range of the
    /// solve's candidate buffer.
    cands: std::ops::Range<u32>,
    failed_open: bool,
    notes: Vec<String>,
    previous: Option<&'a GroupRouting>,
    /// Index in `Problem::units`, if it has demand.
    unit: Option<usize>,
    k_eff: usize,
    m_eff: usize,
}

/// Like [`solve`], with options, and with statistics.
pub fn solve_with(input: SolveInput<'_>, options: SolveOptions) -> (Routing, SolveStats) {
    let fleet = input.fleet;
    let states = edge_states(fleet, input.signals, input.drains);
    let n_edges = states.len();
    let services: Vec<&Service> = fleet.services.values().collect();
    let mut routing = Routing::default();
    let mut fixed_load = vec![0.0; n_edges];

    // Weighted services first: their load is fixed.
    for service in services.iter().filter(|s| s.mode == PolicyMode::Weighted) {
        let mut rows = Vec::with_capacity(fleet.groups.len());
        for group in fleet.groups.values() {
            let (row, edges) = weighted_row(fleet, &states, service, group);
            for (w, e) in row.weights.iter().zip(edges) {
                fixed_load[e] += row.demand_rps * w.weight;
            }
            rows.push((group.id.clone(), row));
        }
        // In group order: a bulk build, no per-row search.
        routing
            .services
            .insert(service.id.clone(), rows.into_iter().collect());
    }

    // Cost classes: one per distinct cost weight of the optimize services.
    let mut class_weights: Vec<f64> = Vec::new();
    let mut class_of = vec![0u32; services.len()];
    for (si, s) in services.iter().enumerate() {
        if s.mode != PolicyMode::Optimize {
            continue;
        }
        let w = s.policy.cost_weight;
        class_of[si] = match class_weights
            .iter()
            .position(|c| c.to_bits() == w.to_bits())
        {
            Some(k) => k as u32,
            None => {
                class_weights.push(w);
                (class_weights.len() - 1) as u32
            }
        };
    }
    if class_weights.is_empty() {
        class_weights.push(1.0);
    }

    // Domain ids per level, for min_domains.
    let mut domain_ids: BTreeMap<crate::fleet::DomainLevel, Vec<u32>> = BTreeMap::new();
    for s in &services {
        if s.mode == PolicyMode::Optimize && s.policy.min_domains > 1 {
            domain_ids.entry(s.policy.domain_level).or_insert_with(|| {
                let mut ids: BTreeMap<crate::domain::DomainPath, u32> = BTreeMap::new();
                states
                    .iter()
                    .map(|st| {
                        let d = s.policy.domain_level.of_site(&st.edge.site);
                        let next = ids.len() as u32;
                        *ids.entry(d).or_insert(next)
                    })
                    .collect()
            });
        }
    }

    // Optimize services: collect the demand units.
    let optimized = services
        .iter()
        .filter(|s| s.mode == PolicyMode::Optimize)
        .count();
    let n_candidates: usize = fleet.groups.values().map(|g| g.candidates.len()).sum();
    let mut problem = Problem {
        edges: Vec::new(),
        class_weights,
        units: Vec::with_capacity(optimized * fleet.groups.len()),
        arcs: Vec::with_capacity(optimized * n_candidates),
    };
    // Per edge, once: usable, and money per rps outside a commit.
    let alive_edge: Vec<bool> = states.iter().map(EdgeState::alive).collect();
    let healthy_edge: Vec<bool> = states.iter().map(|s| s.health.usable()).collect();
    let has_commit: Vec<bool> = states.iter().map(|s| s.edge.has_commit()).collect();
    let price: Vec<f64> = states.iter().map(|s| s.edge.price_per_unit()).collect();
    // Edge id → index, for the previous table's weights. A hash map is
    // fine here: it is only looked up, never iterated.
    let edge_by_id: std::collections::HashMap<&str, u32, FnvBuild> = if input.previous.is_some() {
        states
            .iter()
            .enumerate()
            .map(|(i, s)| (s.edge.id.as_str(), i as u32))
            .collect()
    } else {
        std::collections::HashMap::default()
    };
    let rebuilt;
    let cidx = match fleet.candidate_index() {
        Some(i) => i,
        None => {
            rebuilt = crate::fleet::CandidateIndex::rebuild(fleet);
            &rebuilt
        }
    };
    let mut pending: Vec<Pending<'_>> = Vec::with_capacity(fleet.groups.len() * services.len());
    let mut max_cost: f64 = 0.0;
    let mut alive: Vec<Cand> = Vec::new();
    let mut all_cands: Vec<Cand> = Vec::with_capacity(optimized * n_candidates);
    let mut target: Option<f64> = None;
    for (si, service) in services.iter().enumerate() {
        if service.mode != PolicyMode::Optimize {
            continue;
        }
        let policy = &service.policy;
        let dom_ids: Option<&Vec<u32>> = domain_ids
            .get(&policy.domain_level)
            .filter(|_| policy.min_domains > 1);
        let prev_rows = input.previous.and_then(|p| p.services.get(&service.id));
        let mut prev_iter = prev_rows.map(|m| m.iter().peekable());
        for (gi, group) in fleet.groups.values().enumerate() {
            let span = cidx.start[gi] as usize..cidx.start[gi + 1] as usize;
            let (cand_edges, cand_latency) = (&cidx.edge[span.clone()], &cidx.latency_ms[span]);
            let previous = prev_iter.as_mut().and_then(|it| {
                while it.peek().is_some_and(|(g, _)| *g < &group.id) {
                    it.next();
                }
                match it.peek() {
                    Some((g, row)) if *g == &group.id => Some(*row),
                    _ => None,
                }
            });
            let demand = cidx.demand[gi * cidx.services + si];
            alive.clear();
            let cand_start = all_cands.len();
            for (pos, (&e, &latency)) in cand_edges.iter().zip(cand_latency).enumerate() {
                let e = e as usize;
                if e >= n_edges {
                    continue;
                }
                if alive_edge[e] {
                    let cand = Cand {
                        pos: pos as u32,
                        edge: e as u32,
                        over: policy.max_latency_ms.is_some_and(|m| latency > m),
                        domain: dom_ids.map_or(0, |ids| ids[e]),
                    };
                    alive.push(cand);
                    if healthy_edge[e] {
                        all_cands.push(cand);
                    }
                }
            }
            let mut notes = Vec::new();
            let mut failed_open = false;
            if all_cands.len() == cand_start && !alive.is_empty() {
                failed_open = true;
                notes.push("every candidate is unhealthy: failed open (treated as healthy)".into());
                all_cands.extend_from_slice(&alive);
            }
            let cands = &all_cands[cand_start..];
            let mut k_eff = 1;
            let mut m_eff = 1;
            if !cands.is_empty() {
                let k = policy.min_edges as usize;
                if k > 1 {
                    k_eff = k.min(cands.len());
                    if k_eff < k {
                        notes.push(format!(
                            "resilience: only {} usable candidate(s), fewer than min_edges = {k}",
                            cands.len()
                        ));
                    }
                }
                let m = policy.min_domains as usize;
                if m > 1 {
                    let mut distinct: Vec<u32> = cands.iter().map(|c| c.domain).collect();
                    distinct.sort_unstable();
                    distinct.dedup();
                    m_eff = m.min(distinct.len());
                    if m_eff < m {
                        notes.push(format!(
                            "resilience: candidates span only {} {}(s), fewer than min_domains = {m}",
                            distinct.len(),
                            policy.domain_level.as_str()
                        ));
                    }
                }
            }
            let n_cands = cands.len();
            let mut p = Pending {
                service: si,
                class: class_of[si],
                group,
                demand,
                cands: cand_start as u32..(cand_start + n_cands) as u32,
                failed_open,
                notes,
                previous,
                unit: None,
                k_eff,
                m_eff,
            };
            if demand > 0.0 && n_cands > 0 {
                let cands = &all_cands[cand_start..];
                target = Some(target.map_or(policy.target_utilization, |t: f64| {
                    t.min(policy.target_utilization)
                }));
                let first_arc = problem.arcs.len() as u32;
                for cand in cands {
                    let (pos, e) = (cand.pos as usize, cand.edge as usize);
                    let money = if has_commit[e] { 0.0 } else { price[e] };
                    let cost =
                        policy.latency_weight * cand_latency[pos] + policy.cost_weight * money;
                    max_cost = max_cost.max(cost);
                    if has_commit[e] {
                        max_cost = max_cost.max(policy.cost_weight * price[e]);
                    }
                    problem.arcs.push(UnitArc {
                        edge: e as u32,
                        cost,
                        keep: 0.0,
                        domain: cand.domain,
                    });
                }
                // Previous shares on usable edges.
                if let Some(prev) = previous {
                    for w in &prev.weights {
                        let Some(&e) = edge_by_id.get(w.edge.as_str()) else {
                            continue;
                        };
                        if let Some(i) = cands.iter().position(|c| c.edge == e) {
                            problem.arcs[first_arc as usize + i].keep = w.weight.clamp(0.0, 1.0);
                        }
                    }
                }
                let shift_limit =
                    (previous.is_some() && policy.max_shift < 1.0 && !options.ignore_shift_limit)
                        .then_some(policy.max_shift);
                problem.units.push(Unit {
                    demand,
                    class: class_of[si],
                    unserved_cost: 0.0,
                    first_arc,
                    arc_count: n_cands as u32,
                    max_edge_share: if k_eff > 1 { 1.0 / k_eff as f64 } else { 1.0 },
                    max_domain_share: if m_eff > 1 { 1.0 / m_eff as f64 } else { 1.0 },
                    resilience_cost: 0.0,
                    // Set below, once the cost scale is known (non-zero
                    // marks a previous row).
                    move_cost: if previous.is_some() { 1.0 } else { 0.0 },
                    shift_limit,
                    shift_cost: 0.0,
                });
                p.unit = Some(problem.units.len() - 1);
            }
            pending.push(p);
        }
    }

    // Penalties, relative to the largest per-rps cost.
    let scale = max_cost.max(1.0);
    for p in &pending {
        let Some(unit) = p.unit else {
            continue;
        };
        let u = &mut problem.units[unit];
        u.unserved_cost = UNSERVED_PENALTY * scale;
        u.resilience_cost = RESILIENCE_PENALTY * scale;
        u.shift_cost = SHIFT_PENALTY * scale;
        u.move_cost *= KEEP_TOLERANCE * scale;
        let first = u.first_arc as usize;
        for (i, c) in all_cands[p.cands.start as usize..p.cands.end as usize]
            .iter()
            .enumerate()
        {
            if c.over {
                problem.arcs[first + i].cost += LATENCY_PENALTY * scale;
            }
        }
    }
    let target = target.unwrap_or(0.8);
    problem.edges = states
        .iter()
        .enumerate()
        .map(|(i, st)| {
            let fixed = fixed_load[i];
            let has_commit = st.edge.has_commit();
            ProblemEdge {
                limit: (st.effective * target - fixed).max(0.0),
                capacity: (st.effective - fixed).max(0.0),
                hot_cost: HOT_PENALTY * scale,
                commit: if has_commit {
                    (st.edge.commit_rps - fixed).max(0.0)
                } else {
                    0.0
                },
                overage_price: if has_commit {
                    st.edge.price_per_unit()
                } else {
                    0.0
                },
            }
        })
        .collect();

    let outcome = problem::solve(&problem);
    let stats = SolveStats {
        units: problem.units.len(),
        arcs: problem.arcs.len(),
        pivots: outcome.pivots,
        rounds: outcome.rounds,
        warm_start: outcome.warm,
    };

    // Rows of optimize services.
    let mut summary = SolveSummary {
        objective: outcome.objective,
        ..SolveSummary::default()
    };
    // Predicted load per edge: the weighted services', then the rows'.
    let mut load = fixed_load.clone();
    let mut rows_of: Vec<Vec<(crate::ids::GroupId, GroupRouting)>> = services
        .iter()
        .map(|s| {
            if s.mode == PolicyMode::Optimize {
                Vec::with_capacity(fleet.groups.len())
            } else {
                Vec::new()
            }
        })
        .collect();
    for mut p in pending {
        let service = services[p.service];
        let mut row = GroupRouting {
            demand_rps: p.demand,
            failed_open: p.failed_open,
            notes: std::mem::take(&mut p.notes),
            ..GroupRouting::default()
        };
        let cands = &all_cands[p.cands.start as usize..p.cands.end as usize];
        if cands.is_empty() {
            row.unserved = 1.0;
            row.notes.push("every candidate is drained".into());
        } else if let Some(u) = p.unit {
            let unit = &problem.units[u];
            let first = unit.first_arc as usize;
            let flows = &outcome.arc_flow[first..first + cands.len()];
            let unserved = outcome.unserved[u];
            let total: f64 = flows.iter().sum::<f64>() + unserved;
            let total = if total > 0.0 { total } else { 1.0 };
            for (i, &f) in flows.iter().enumerate() {
                if f > 0.0 {
                    let c = cands[i];
                    let weight = f / total;
                    load[c.edge as usize] += p.demand * weight;
                    row.weights.push(EdgeWeight {
                        // From the edge table (compact, in cache) rather
                        // than the group's candidate (scattered).
                        edge: states[c.edge as usize].edge.id.clone(),
                        weight,
                    });
                }
            }
            row.unserved = unserved / total;
            if row.unserved > 1e-9 {
                row.notes.push(format!(
                    "capacity short: {:.1}% of demand unserved",
                    100.0 * row.unserved
                ));
            }
            let over: f64 = flows
                .iter()
                .zip(cands)
                .filter(|(_, c)| c.over)
                .map(|(f, _)| f)
                .sum();
            if over > 1e-9 * total {
                row.notes.push(format!(
                    "{:.1}% of demand above max_latency_ms: no capacity within it",
                    100.0 * over / total
                ));
            }
            if outcome.resilience_excess[u] > 1e-9 * total {
                row.notes
                    .push("resilience minimum not met: not enough capacity on enough edges".into());
            }
            if outcome.emergency[u] > 1e-9 * total {
                row.notes.push(format!(
                    "moved {:.1}% of demand beyond max_shift to stay within capacity",
                    100.0 * outcome.emergency[u] / total
                ));
            }
            if outcome.shift_limited[u] && outcome.emergency[u] <= 1e-9 * total {
                row.shift_limited = true;
                row.notes.push(format!(
                    "held back by max_shift = {}: moves further on the next table",
                    service.policy.max_shift
                ));
            }
        } else {
            // No demand: the marginally cheapest usable candidates.
            row.weights =
                zero_demand_weights(&p, cands, &states, &outcome.entry_price, n_edges, service);
        }
        if row.failed_open {
            summary.failed_open_rows += 1;
        }
        if row.shift_limited {
            summary.shift_limited_rows += 1;
        }
        rows_of[p.service].push((p.group.id.clone(), row));
    }
    for (si, rows) in rows_of.into_iter().enumerate() {
        if services[si].mode == PolicyMode::Optimize {
            // In group order: a bulk build, no per-row search.
            routing
                .services
                .insert(services[si].id.clone(), rows.into_iter().collect());
        }
    }
    // Every service has a table, even with no groups.
    for s in &services {
        routing.services.entry(s.id.clone()).or_default();
    }

    // The upstream split.
    for (_, _, row) in routing.rows() {
        summary.unserved_rps += row.demand_rps * row.unserved;
    }
    let (origins, origin_loads, origin_note) = origin_split(input, load.iter().sum());
    let mut hot = 0;
    routing.edges = states
        .iter()
        .enumerate()
        .map(|(i, st)| {
            let limit = st.effective * target;
            if load[i] > limit * (1.0 + 1e-9) + 1e-9 && outcome.edge_hot[i] > 0.0 {
                hot += 1;
            }
            (
                st.edge.id.clone(),
                EdgeLoad {
                    predicted_load_rps: load[i],
                    effective_capacity_rps: st.effective,
                    utilization: load[i] / st.edge.capacity_rps,
                    origins: origins.clone(),
                    limit_rps: limit,
                    price: outcome.edge_price[i],
                },
            )
        })
        .collect();
    routing.origins = origin_loads;
    if hot > 0 {
        summary.notes.push(format!(
            "{hot} edge(s) above their target utilization: capacity is short"
        ));
    }
    summary.notes.extend(origin_note);
    summary.pending_shift = summary.shift_limited_rows > 0;
    let empty = Routing::default();
    summary.churn = diff::moved_share(input.previous.unwrap_or(&empty), &routing);
    routing.summary = summary;
    (routing, stats)
}

/// Weights for a row with no demand: the cheapest usable candidates at the
/// margin (latency and money plus the edge's price after the solve), spread
/// as the resilience policy asks. The previous row is kept while its edges
/// are still usable.
fn zero_demand_weights(
    p: &Pending<'_>,
    cands: &[Cand],
    states: &[EdgeState<'_>],
    entry_price: &[f64],
    n_edges: usize,
    service: &Service,
) -> Vec<EdgeWeight> {
    if let Some(prev) = p.previous {
        let all_usable = !prev.weights.is_empty()
            && prev.unserved <= 1e-9
            && prev.weights.iter().all(|w| {
                cands
                    .iter()
                    .any(|c| p.group.candidates[c.pos as usize].edge == w.edge)
            });
        if all_usable {
            return prev.weights.clone();
        }
    }
    let policy = &service.policy;
    let class = p.class as usize;
    let mut order: Vec<(f64, usize)> = cands
        .iter()
        .enumerate()
        .map(|(i, cand)| {
            let (pos, e) = (cand.pos as usize, cand.edge as usize);
            let c = &p.group.candidates[pos];
            let edge = states[e].edge;
            let money = if edge.has_commit() {
                0.0
            } else {
                edge.price_per_unit()
            };
            let mut cost = policy.latency_weight * c.latency_ms + policy.cost_weight * money;
            if policy.max_latency_ms.is_some_and(|m| c.latency_ms > m) {
                cost += 1e12;
            }
            let price = entry_price.get(class * n_edges + e).copied().unwrap_or(0.0);
            (cost + price, i)
        })
        .collect();
    order.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let want = p.k_eff.max(p.m_eff).max(1);
    let mut picked: Vec<usize> = Vec::new();
    if p.m_eff > 1 {
        let mut seen: Vec<u32> = Vec::new();
        for &(_, i) in &order {
            if seen.len() >= p.m_eff {
                break;
            }
            if !seen.contains(&cands[i].domain) {
                seen.push(cands[i].domain);
                picked.push(i);
            }
        }
    }
    for &(_, i) in &order {
        if picked.len() >= want {
            break;
        }
        if !picked.contains(&i) {
            picked.push(i);
        }
    }
    picked.sort_unstable();
    let w = 1.0 / picked.len() as f64;
    picked
        .into_iter()
        .map(|i| EdgeWeight {
            edge: p.group.candidates[cands[i].pos as usize].edge.clone(),
            weight: w,
        })
        .collect()
}

/// The routing of a `weighted` service's group: the operator's weights,
/// scaled by each edge's drain factor and renormalised over the usable
/// candidates (failing open if none is healthy).
fn weighted_row(
    fleet: &Fleet,
    states: &[EdgeState<'_>],
    service: &Service,
    group: &ClientGroup,
) -> (GroupRouting, Vec<usize>) {
    let mut row = GroupRouting {
        demand_rps: group.demand(&service.id),
        ..GroupRouting::default()
    };
    let weights = service.weights.get(&group.id);
    let raw: Vec<(&EdgeId, f64, Health, usize)> = group
        .candidates
        .iter()
        .filter_map(|c| {
            let e = candidate_index(fleet, states, &c.edge, c.edge_index)?;
            let st = &states[e];
            let base = weights.and_then(|w| w.get(&c.edge)).copied().unwrap_or(0.0);
            let w = base * st.drain;
            (w > 0.0 && st.effective > 0.0).then_some((&c.edge, w, st.health, e))
        })
        .collect();
    if raw.is_empty() {
        row.unserved = 1.0;
        row.notes
            .push("no candidate with a non-zero static weight is left after drains".into());
        return (row, Vec::new());
    }
    let mut chosen: Vec<&(&EdgeId, f64, Health, usize)> =
        raw.iter().filter(|(_, _, h, _)| h.usable()).collect();
    if chosen.is_empty() {
        row.failed_open = true;
        row.notes
            .push("every candidate is unhealthy: failed open (treated as healthy)".into());
        chosen = raw.iter().collect();
    }
    let total: f64 = chosen.iter().map(|c| c.1).sum();
    row.weights = chosen
        .iter()
        .map(|(edge, w, _, _)| EdgeWeight {
            edge: (*edge).clone(),
            weight: w / total,
        })
        .collect();
    (row, chosen.iter().map(|c| c.3).collect())
}

/// The upstream split, the same for every edge: origins in proportion to
/// their capacity after drains. With no edge→origin latency in the fleet
/// model, this is the split that minimises the highest origin utilization
/// (every origin ends at the same utilization); fully drained origins get
/// nothing.
fn origin_split(
    input: SolveInput<'_>,
    total_load: f64,
) -> (
    Vec<OriginWeight>,
    BTreeMap<crate::ids::OriginId, OriginLoad>,
    Option<String>,
) {
    let fleet = input.fleet;
    let caps: Vec<(&crate::ids::OriginId, f64)> = fleet
        .origins
        .values()
        .map(|o| {
            (
                &o.id,
                o.capacity_rps * input.drains.factor(o.domain.ancestors()),
            )
        })
        .collect();
    let total_cap: f64 = caps.iter().map(|(_, c)| c).sum();
    let weights: Vec<OriginWeight> = caps
        .iter()
        .filter(|(_, c)| *c > 0.0)
        .map(|(id, c)| OriginWeight {
            origin: (*id).clone(),
            weight: c / total_cap,
        })
        .collect();
    let loads = caps
        .iter()
        .map(|(id, c)| {
            let l = if *c > 0.0 {
                total_load * c / total_cap
            } else {
                0.0
            };
            (
                (*id).clone(),
                OriginLoad {
                    predicted_load_rps: l,
                    effective_capacity_rps: *c,
                    utilization: if *c > 0.0 { l / c } else { 0.0 },
                },
            )
        })
        .collect();
    let note = if !fleet.origins.is_empty() && total_load > total_cap * (1.0 + 1e-9) {
        Some(format!(
            "origins short of capacity: {:.0} rps predicted for {:.0} rps after drains",
            total_load, total_cap
        ))
    } else {
        None
    };
    (weights, loads, note)
}

#[cfg(test)]
pub(crate) mod tests;
