//! Why a row of a routing table is what it is: for every candidate edge of a
//! (service, group), its weight, latency, price, utilization after the
//! solve, the constraints that bind it, the drains covering it, and a
//! sentence for humans.
//!
//! Pure: computed from the fleet, the signals and drains the table was
//! solved with, and the table itself (its edge loads, limits and prices),
//! so that `sextantctl explain` and `SteeringService.Explain` need nothing
//! else.

use serde::{Deserialize, Serialize};

use crate::drain::DrainSet;
use crate::fleet::{Fleet, PolicyMode};
use crate::ids::{EdgeId, GroupId, ServiceId};
use crate::routing::Routing;
use crate::signals::{Health, Signals};

/// A constraint that shapes a weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Binding {
    /// The edge is at its planned load (capacity × target utilization).
    Capacity,
    /// A drain withdraws capacity from the edge (all of it: no weight).
    Drain,
    /// The edge is down, so it gets no weight.
    Health,
    /// The row moved as far as `max_shift` allows this step.
    ShiftLimit,
    /// A third party's commit: traffic inside it is already paid for.
    Commit,
    /// The resilience minimum caps this edge's (or its domain's) share.
    Resilience,
    /// The edge is above the policy's `max_latency_ms`.
    MaxLatency,
    /// Nothing binds: the weight is the cheapest choice.
    None,
}

impl Binding {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Capacity => "capacity",
            Self::Drain => "drain",
            Self::Health => "health",
            Self::ShiftLimit => "shift_limit",
            Self::Commit => "commit",
            Self::Resilience => "resilience",
            Self::MaxLatency => "max_latency",
            Self::None => "none",
        }
    }
}

/// Why one candidate edge got its weight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightExplanation {
    pub edge: EdgeId,
    pub weight: f64,
    /// Latency estimate from the group, ms.
    pub latency_ms: f64,
    /// Money per rps at the margin: 0 inside a commit, else the edge's
    /// price (cost per unit, or overage above a commit).
    pub cost_per_unit: f64,
    /// Predicted load over declared capacity after the solve.
    pub utilization: f64,
    /// Predicted load after the solve, rps.
    pub load_rps: f64,
    /// Planned load limit (capacity × target utilization × drain), rps.
    pub limit_rps: f64,
    /// Cost of one more rps of this group here, in objective units: latency
    /// and money weighted, plus the edge's price (0 with room to spare).
    pub marginal_cost: f64,
    pub binding: Vec<Binding>,
    /// Drains covering the edge, as `path (fraction)`.
    pub drains: Vec<String>,
    /// Health verdict and its reason, e.g. `down: probe timeout`.
    pub health: String,
    pub reason: String,
}

/// Why a whole row is what it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RowExplanation {
    pub service: ServiceId,
    pub group: GroupId,
    pub mode: String,
    pub demand_rps: f64,
    pub unserved: f64,
    pub failed_open: bool,
    pub shift_limited: bool,
    /// One entry per candidate edge of the group, in edge id order, also
    /// those with no weight.
    pub edges: Vec<WeightExplanation>,
    /// Notes about the whole row (fail-open, resilience not met, ...).
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExplainError {
    #[error("unknown service {0:?}")]
    UnknownService(String),
    #[error("unknown client group {0:?}")]
    UnknownGroup(String),
    #[error("the routing table has no row for service {service:?}, group {group:?}")]
    NoRow { service: String, group: String },
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

/// Explains the row of (`service`, `group`) in `routing`, which was solved
/// from `fleet`, `signals` and `drains`.
pub fn explain(
    fleet: &Fleet,
    signals: &Signals,
    drains: &DrainSet,
    routing: &Routing,
    service: &str,
    group: &str,
) -> Result<RowExplanation, ExplainError> {
    let svc = fleet
        .services
        .get(service)
        .ok_or_else(|| ExplainError::UnknownService(service.to_owned()))?;
    let grp = fleet
        .groups
        .get(group)
        .ok_or_else(|| ExplainError::UnknownGroup(group.to_owned()))?;
    let row = routing
        .row(&svc.id, &grp.id)
        .ok_or_else(|| ExplainError::NoRow {
            service: service.to_owned(),
            group: group.to_owned(),
        })?;
    let policy = &svc.policy;
    let optimize = svc.mode == PolicyMode::Optimize;

    // Facts per candidate.
    struct Fact<'a> {
        edge: &'a crate::fleet::Edge,
        latency_ms: f64,
        factor: f64,
        health: Health,
        usable: bool,
        weight: f64,
        load: f64,
        limit: f64,
        utilization: f64,
        money: f64,
        marginal: f64,
        price: f64,
    }
    let mut facts: Vec<Fact<'_>> = Vec::new();
    for c in &grp.candidates {
        let Some(edge) = fleet.edges.get(&c.edge) else {
            continue;
        };
        let factor = drains.factor(edge.domains());
        let health = signals.health(&edge.id);
        let usable = factor > 0.0 && (health.usable() || row.failed_open);
        let el = routing.edges.get(&edge.id);
        let load = el.map_or(0.0, |l| l.predicted_load_rps);
        let limit = el.map_or(0.0, |l| l.limit_rps);
        let price = el.map_or(0.0, |l| l.price);
        let money = if edge.has_commit() && load < edge.commit_rps * (1.0 - 1e-9) {
            0.0
        } else {
            edge.price_per_unit()
        };
        let marginal = policy.latency_weight * c.latency_ms + policy.cost_weight * money + price;
        facts.push(Fact {
            edge,
            latency_ms: c.latency_ms,
            factor,
            health,
            usable,
            weight: row.weight_of(&edge.id),
            load,
            limit,
            utilization: el.map_or(0.0, |l| l.utilization),
            money,
            marginal,
            price,
        });
    }
    let usable_count = facts.iter().filter(|f| f.usable).count();
    let k_eff = (policy.min_edges as usize).min(usable_count).max(1);
    let domain_of = |f: &Fact<'_>| policy.domain_level.of_site(&f.edge.site);
    let mut domains: Vec<_> = facts.iter().filter(|f| f.usable).map(domain_of).collect();
    domains.sort();
    domains.dedup();
    let m_eff = (policy.min_domains as usize).min(domains.len()).max(1);
    let cheapest_used = facts
        .iter()
        .filter(|f| f.weight > 0.0)
        .map(|f| f.marginal)
        .fold(f64::INFINITY, f64::min);
    let dearest_used = facts
        .iter()
        .filter(|f| f.weight > 0.0)
        .map(|f| f.marginal)
        .fold(f64::NEG_INFINITY, f64::max);
    let tol = 1e-6 * (1.0 + cheapest_used.abs().min(1e12));

    let mut edges = Vec::with_capacity(facts.len());
    for f in &facts {
        let mut binding = Vec::new();
        let mut why: Vec<String> = Vec::new();
        let covering: Vec<String> = drains
            .covering(f.edge.domains())
            .iter()
            .map(|d| format!("{} ({})", d.domain, d.fraction))
            .collect();
        let health = match signals.edges.get(&f.edge.id) {
            Some(s) if !s.reason.is_empty() => format!("{}: {}", f.health.as_str(), s.reason),
            _ => f.health.as_str().to_owned(),
        };
        if f.factor <= 0.0 {
            binding.push(Binding::Drain);
            why.push(format!(
                "fully drained ({}): never routed to",
                covering.join(", ")
            ));
        } else if !f.usable {
            binding.push(Binding::Health);
            why.push(format!("{health}: no weight while it is down"));
        } else {
            if f.health == Health::Down {
                binding.push(Binding::Health);
                why.push("down, but every candidate is down: failed open".into());
            }
            let at_limit = f.limit > 0.0 && f.load >= f.limit * (1.0 - 1e-6);
            if at_limit {
                binding.push(Binding::Capacity);
                why.push(format!(
                    "at its planned load ({:.0} of {:.0} rps{}){}",
                    f.load,
                    f.limit,
                    if f.load > f.limit * (1.0 + 1e-6) {
                        ", running hot: capacity is short"
                    } else {
                        ""
                    },
                    if f.price > 1e-9 {
                        format!("; one more rps of capacity here would save {:.3}", f.price)
                    } else {
                        String::new()
                    }
                ));
            }
            if f.factor < 1.0 {
                binding.push(Binding::Drain);
                why.push(format!(
                    "{} of its capacity drained ({})",
                    pct(1.0 - f.factor),
                    covering.join(", ")
                ));
            }
            if f.edge.has_commit() {
                if (f.load - f.edge.commit_rps).abs() <= 1e-6 * (1.0 + f.edge.commit_rps) {
                    binding.push(Binding::Commit);
                    why.push(format!(
                        "load sits at the commit ({:.0} rps): more would pay the overage {}",
                        f.edge.commit_rps,
                        f.edge.price_per_unit()
                    ));
                } else if f.weight > 0.0 && f.load < f.edge.commit_rps {
                    binding.push(Binding::Commit);
                    why.push(format!(
                        "inside the commit ({:.0} of {:.0} rps): already paid for",
                        f.load, f.edge.commit_rps
                    ));
                }
            }
            if optimize && k_eff > 1 && f.weight >= 1.0 / k_eff as f64 - 1e-9 {
                binding.push(Binding::Resilience);
                why.push(format!(
                    "capped at 1/{k_eff} of the group by min_edges = {}",
                    policy.min_edges
                ));
            }
            if optimize && m_eff > 1 && f.weight > 0.0 {
                let d = domain_of(f);
                let share: f64 = facts
                    .iter()
                    .filter(|g| domain_of(g) == d)
                    .map(|g| g.weight)
                    .sum();
                if share >= 1.0 / m_eff as f64 - 1e-9 {
                    binding.push(Binding::Resilience);
                    why.push(format!(
                        "{d} is capped at 1/{m_eff} of the group by min_domains = {}",
                        policy.min_domains
                    ));
                }
            }
            if policy.max_latency_ms.is_some_and(|m| f.latency_ms > m) && optimize {
                binding.push(Binding::MaxLatency);
                why.push(if f.weight > 0.0 {
                    "above max_latency_ms: used for lack of capacity within it".into()
                } else {
                    "above max_latency_ms".into()
                });
            }
            if optimize && row.shift_limited {
                let held = (f.weight > 0.0 && f.marginal > cheapest_used + tol)
                    || (f.weight == 0.0 && f.marginal < dearest_used - tol);
                if held {
                    binding.push(Binding::ShiftLimit);
                    why.push(format!(
                        "max_shift = {} holds this weight for this step",
                        policy.max_shift
                    ));
                }
            }
            if optimize && why.is_empty() {
                if f.weight > 0.0 {
                    why.push(format!(
                        "cheapest choice at the margin ({:.3} per rps: {} ms, {} money/rps)",
                        f.marginal, f.latency_ms, f.money
                    ));
                } else if cheapest_used.is_finite() {
                    why.push(format!(
                        "dearer at the margin ({:.3} per rps vs {:.3} for the edges used)",
                        f.marginal, cheapest_used
                    ));
                } else {
                    why.push("not used: the group's demand is unserved".into());
                }
            }
            if !optimize && why.is_empty() {
                why.push("the operator's static weight (mode = weighted)".into());
            }
        }
        if binding.is_empty() {
            binding.push(Binding::None);
        }
        binding.sort();
        binding.dedup();
        let reason = format!(
            "{}: {}",
            if f.weight > 0.0 {
                format!("weight {}", pct(f.weight))
            } else {
                "no weight".to_owned()
            },
            why.join("; ")
        );
        edges.push(WeightExplanation {
            edge: f.edge.id.clone(),
            weight: f.weight,
            latency_ms: f.latency_ms,
            cost_per_unit: f.money,
            utilization: f.utilization,
            load_rps: f.load,
            limit_rps: f.limit,
            marginal_cost: f.marginal,
            binding,
            drains: covering,
            health,
            reason,
        });
    }
    let mut notes = row.notes.clone();
    if row.unserved > 0.0 {
        notes.push(format!("{} of demand unserved", pct(row.unserved)));
    }
    Ok(RowExplanation {
        service: svc.id.clone(),
        group: grp.id.clone(),
        mode: svc.mode.as_str().to_owned(),
        demand_rps: row.demand_rps,
        unserved: row.unserved,
        failed_open: row.failed_open,
        shift_limited: row.shift_limited,
        edges,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::DomainPath;
    use crate::drain::Drain;
    use crate::solver::{solve, SolveInput};

    fn fleet() -> Fleet {
        Fleet::from_toml(crate::solver::tests::GOLDEN).expect("fleet")
    }

    fn binds(x: &RowExplanation, e: &str) -> Vec<Binding> {
        x.edges
            .iter()
            .find(|w| w.edge.as_str() == e)
            .map(|w| w.binding.clone())
            .expect("edge")
    }

    #[test]
    fn capacity_commit_and_cheapest_are_told_apart() {
        let f = fleet();
        let (s, d) = (Signals::default(), DrainSet::new());
        let r = solve(SolveInput {
            fleet: &f,
            signals: &s,
            drains: &d,
            previous: None,
            now_ms: 0,
        });
        let x = explain(&f, &s, &d, &r, "www", "eu").expect("explain");
        assert_eq!(x.edges.len(), 4, "every candidate, used or not");
        assert_eq!(binds(&x, "a"), [Binding::Capacity]);
        assert_eq!(binds(&x, "cdn"), [Binding::Commit]);
        assert_eq!(binds(&x, "b"), [Binding::None]);
        assert_eq!(binds(&x, "c"), [Binding::None]);
        let a = &x.edges[0];
        assert!(a.reason.contains("planned load"), "{}", a.reason);
        assert!((a.marginal_cost - 20.0).abs() < 1e-6, "{}", a.marginal_cost);
        assert!(matches!(
            explain(&f, &s, &d, &r, "www", "nope"),
            Err(ExplainError::UnknownGroup(_))
        ));
        assert!(matches!(
            explain(&f, &s, &d, &r, "img", "eu"),
            Err(ExplainError::UnknownService(_))
        ));
    }

    #[test]
    fn a_row_held_by_max_shift_says_so() {
        // eu starts all on b (b made big enough), the optimum moves most of
        // it to a: with max_shift = 0.2 the first step is held back.
        let f = Fleet::from_toml(
            &crate::solver::tests::GOLDEN
                .replace(
                    "nameservers = [\"ns1.example.com\"]",
                    "nameservers = [\"ns1.example.com\"]\npolicy = { max_shift = 0.2 }",
                )
                .replacen(
                    "capacity_rps = 1000\nhealth_check = \"127.1.0.2:80\"",
                    "capacity_rps = 2000\nhealth_check = \"127.1.0.2:80\"",
                    1,
                ),
        )
        .expect("fleet");
        let (s, d) = (Signals::default(), DrainSet::new());
        let input = |previous| SolveInput {
            fleet: &f,
            signals: &s,
            drains: &d,
            previous,
            now_ms: 0,
        };
        let mut prev = solve(input(None));
        let eu = prev
            .services
            .get_mut(&ServiceId::from("www"))
            .and_then(|m| m.get_mut(&GroupId::from("eu")))
            .expect("eu");
        eu.weights = vec![crate::routing::EdgeWeight {
            edge: EdgeId::from("b"),
            weight: 1.0,
        }];
        let next = solve(input(Some(&prev)));
        let x = explain(&f, &s, &d, &next, "www", "eu").expect("explain");
        assert!(x.shift_limited);
        assert!(binds(&x, "b").contains(&Binding::ShiftLimit), "{x:?}");
        assert!(x.notes.iter().any(|n| n.contains("max_shift")), "{x:?}");
    }

    #[test]
    fn a_drained_region_and_a_down_edge_are_explained() {
        let f = fleet();
        let mut d = DrainSet::new();
        d.insert(Drain {
            domain: DomainPath::parse("region/eu").expect("path"),
            fraction: 1.0,
            reason: "maintenance".into(),
            owner: "sre".into(),
            created_by: "t".into(),
            created_at_ms: 0,
            progress: None,
            forced: None,
            drill: None,
        });
        let mut s = Signals::default();
        s.edges.insert(
            EdgeId::from("a"),
            crate::signals::EdgeSignal {
                health: Health::Down,
                reason: "probe timeout".into(),
                ..Default::default()
            },
        );
        let r = solve(SolveInput {
            fleet: &f,
            signals: &s,
            drains: &d,
            previous: None,
            now_ms: 0,
        });
        let x = explain(&f, &s, &d, &r, "www", "eu").expect("explain");
        for e in ["a", "b", "cdn"] {
            let w = x.edges.iter().find(|w| w.edge.as_str() == e).expect("edge");
            assert_eq!(w.binding, [Binding::Drain], "{e}");
            assert_eq!(w.drains, ["region/eu (1)"]);
            assert_eq!(w.weight, 0.0);
        }
        assert!(x.edges[0].health.starts_with("down: probe timeout"));
        let d = DrainSet::new();
        let r = solve(SolveInput {
            fleet: &f,
            signals: &s,
            drains: &d,
            previous: None,
            now_ms: 0,
        });
        let x = explain(&f, &s, &d, &r, "www", "eu").expect("explain");
        assert_eq!(binds(&x, "a"), [Binding::Health]);
    }
}
