//! The bench's instance format (`shared/bench/solver/gen_instance.py`), so
//! that Sextant's solver and the HiGHS anchor solve the very same LP:
//!
//! ```text
//! min  Σ_g Σ_e demand_g · latency_cost_ge · x_ge + Σ_e overage_price_e · o_e + penalty · Σ_g demand_g · u_g
//! s.t. Σ_e x_ge + u_g = 1,  Σ_g demand_g · x_ge ≤ capacity_e,  o_e ≥ load_e − commit_e,  x, u, o ≥ 0
//! ```
//!
//! Used by the bench and by tests; not by the control plane.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::problem::{self, Outcome, Problem, ProblemEdge, Unit, UnitArc};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceEdge {
    pub id: String,
    pub capacity: f64,
    pub commit: f64,
    pub overage_price: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceCandidate {
    pub edge: String,
    pub latency_cost: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceGroup {
    pub id: String,
    pub demand: f64,
    pub candidates: Vec<InstanceCandidate>,
}

fn default_penalty() -> f64 {
    1000.0
}

/// A steering instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    pub edges: Vec<InstanceEdge>,
    pub groups: Vec<InstanceGroup>,
    #[serde(default = "default_penalty")]
    pub unserved_penalty: f64,
}

impl Instance {
    pub fn from_json(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| format!("bad instance: {e}"))
    }

    /// A random instance shaped like `gen_instance.py`'s (not the same
    /// numbers: Python's generator is not reproduced), for runs without
    /// Python.
    pub fn synthetic(groups: usize, edges: usize, candidates: usize, seed: u64) -> Self {
        let mut x = seed ^ 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            // splitmix64
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        };
        let round3 = |v: f64| (v * 1000.0).round() / 1000.0;
        let mut es = Vec::with_capacity(edges);
        for e in 0..edges {
            let third = next() < 0.2;
            let cap = 50.0 + 100.0 * next();
            let commit = if third {
                round3(cap * (0.2 + 0.4 * next()))
            } else {
                0.0
            };
            let over = if third {
                round3(0.5 + 2.5 * next())
            } else {
                0.0
            };
            es.push(InstanceEdge {
                id: format!("e{e}"),
                capacity: cap,
                commit,
                overage_price: over,
            });
        }
        let total_cap: f64 = es.iter().map(|e| e.capacity).sum();
        // Pareto(1.5) demands.
        let raw: Vec<f64> = (0..groups)
            .map(|_| (1.0 - next()).max(1e-12).powf(-1.0 / 1.5))
            .collect();
        let scale = total_cap / 1.3 / raw.iter().sum::<f64>();
        let k = candidates.max(1);
        let span = (3 * k) as i64;
        let gs = raw
            .iter()
            .enumerate()
            .map(|(g, r)| {
                let home = (next() * edges as f64) as i64;
                let mut cands: Vec<i64> = (0..2 * k)
                    .map(|_| {
                        let off = (next() * (2 * span) as f64) as i64 - span;
                        (home + off).rem_euclid(edges as i64)
                    })
                    .collect();
                cands.sort_unstable();
                cands.dedup();
                cands.truncate(k);
                InstanceGroup {
                    id: format!("g{g}"),
                    demand: (r * scale * 10_000.0).round() / 10_000.0,
                    candidates: cands
                        .into_iter()
                        .map(|c| InstanceCandidate {
                            edge: format!("e{c}"),
                            latency_cost: round3(1.0 + (c - home).abs() as f64 * (0.5 + next())),
                        })
                        .collect(),
                }
            })
            .collect();
        Self {
            edges: es,
            groups: gs,
            unserved_penalty: 1000.0,
        }
    }

    /// The same LP as a [`Problem`].
    pub fn to_problem(&self) -> Result<Problem, String> {
        let index: BTreeMap<&str, u32> = self
            .edges
            .iter()
            .enumerate()
            .map(|(i, e)| (e.id.as_str(), i as u32))
            .collect();
        let edges = self
            .edges
            .iter()
            .map(|e| ProblemEdge {
                limit: e.capacity,
                capacity: e.capacity,
                hot_cost: 0.0,
                commit: if e.overage_price > 0.0 { e.commit } else { 0.0 },
                overage_price: e.overage_price,
            })
            .collect();
        let mut units = Vec::with_capacity(self.groups.len());
        let mut arcs = Vec::new();
        for g in &self.groups {
            let first_arc = arcs.len() as u32;
            for c in &g.candidates {
                let edge = *index
                    .get(c.edge.as_str())
                    .ok_or_else(|| format!("group {}: unknown edge {}", g.id, c.edge))?;
                arcs.push(UnitArc {
                    edge,
                    cost: c.latency_cost,
                    keep: 0.0,
                    domain: 0,
                });
            }
            units.push(Unit {
                demand: g.demand,
                unserved_cost: self.unserved_penalty,
                first_arc,
                arc_count: arcs.len() as u32 - first_arc,
                ..Unit::default()
            });
        }
        Ok(Problem {
            edges,
            class_weights: vec![1.0],
            units,
            arcs,
        })
    }

    /// The anchor's objective of a solution, computed from its flows alone
    /// (an independent check of [`Outcome::objective`]).
    pub fn objective(&self, p: &Problem, out: &Outcome) -> f64 {
        let mut obj = 0.0;
        let mut load = vec![0.0; self.edges.len()];
        for (u, g) in self.groups.iter().enumerate() {
            obj += self.unserved_penalty * out.unserved[u];
            let first = p.units[u].first_arc as usize;
            for (i, c) in g.candidates.iter().enumerate() {
                let f = out.arc_flow[first + i];
                obj += c.latency_cost * f;
                load[p.arcs[first + i].edge as usize] += f;
            }
        }
        for (e, edge) in self.edges.iter().enumerate() {
            if edge.overage_price > 0.0 {
                obj += edge.overage_price * (load[e] - edge.commit).max(0.0);
            }
        }
        obj
    }

    /// The largest violation of the LP's constraints by a solution (0 when
    /// feasible, up to rounding).
    pub fn violation(&self, p: &Problem, out: &Outcome) -> f64 {
        let mut worst: f64 = 0.0;
        let mut load = vec![0.0; self.edges.len()];
        for (u, g) in self.groups.iter().enumerate() {
            let first = p.units[u].first_arc as usize;
            let flows = &out.arc_flow[first..first + g.candidates.len()];
            let sent: f64 = flows.iter().sum();
            worst = worst.max((sent + out.unserved[u] - g.demand).abs());
            for (i, f) in flows.iter().enumerate() {
                worst = worst.max(-f);
                load[p.arcs[first + i].edge as usize] += f;
            }
        }
        for (e, edge) in self.edges.iter().enumerate() {
            worst = worst.max(load[e] - edge.capacity);
        }
        worst
    }
}

/// Solves an instance: the problem, its outcome, and the anchor objective.
pub fn solve(inst: &Instance) -> Result<(Problem, Outcome), String> {
    let p = inst.to_problem()?;
    let out = problem::solve(&p);
    Ok((p, out))
}

impl Instance {
    /// The instance as a fleet: one `optimize` service (`www`, latency and
    /// cost weights 1, target utilization 1 so that capacity means the
    /// same), self-built edges, and third-party edges where the instance
    /// has an overage price; latency in ms is the instance's latency cost.
    /// For timing the whole solve (fleet in, routing table out) on the
    /// bench instance; the objective differs from the LP's by the unserved
    /// penalty, which the fleet solver derives from the costs.
    pub fn to_fleet_spec(&self) -> crate::fleet::FleetSpec {
        use crate::fleet::{
            EdgeKindSpec, EdgeSpec, FleetSpec, GroupSpec, PolicySpec, ServiceSpec, SoaSpec,
        };
        let edges = self
            .edges
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let third = e.overage_price > 0.0;
                EdgeSpec {
                    id: e.id.clone(),
                    kind: if third {
                        EdgeKindSpec::ThirdParty
                    } else {
                        EdgeKindSpec::SelfBuilt
                    },
                    site: format!("region/r{}/metro/m{}/site/s{i}", i / 100, i / 20),
                    addresses: if third {
                        vec![]
                    } else {
                        vec![format!("10.{}.{}.1", i / 256 % 256, i % 256)]
                    },
                    cname: third.then(|| format!("{}.cdn.example.net", e.id)),
                    provider: third.then(|| format!("p{}", i % 4)),
                    capacity_rps: e.capacity,
                    cost_per_unit: 0.0,
                    commit_rps: if third { e.commit } else { 0.0 },
                    overage_price: e.overage_price,
                    health_check: "127.0.0.1:80".into(),
                }
            })
            .collect();
        let groups = self
            .groups
            .iter()
            .map(|g| GroupSpec {
                id: g.id.clone(),
                prefixes: vec![],
                countries: vec![],
                asns: vec![],
                demand_rps: [("www".to_owned(), g.demand)].into_iter().collect(),
                latency_ms: g
                    .candidates
                    .iter()
                    .map(|c| (c.edge.clone(), c.latency_cost))
                    .collect(),
            })
            .collect();
        FleetSpec {
            services: vec![ServiceSpec {
                id: "www".into(),
                hostname: "www.example.com".into(),
                zone: "example.com".into(),
                ttl_seconds: 30,
                default_group: self
                    .groups
                    .first()
                    .map_or_else(String::new, |g| g.id.clone()),
                nameservers: vec!["ns1.example.com".into()],
                soa: SoaSpec::default(),
                answer_count: 1,
                policy: PolicySpec {
                    target_utilization: Some(1.0),
                    ..PolicySpec::default()
                },
            }],
            origins: vec![],
            edges,
            groups,
            anycast: vec![],
        }
    }
}
