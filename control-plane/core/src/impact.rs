//! What a change would do, in an operator's terms, and whether guardrails
//! let it through: per-region utilization, unserved demand, latency per
//! affected group, third-party overage cost, and the traffic it moves.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::diff;
use crate::fleet::Fleet;
use crate::routing::Routing;

/// Load and utilization of one region (or provider) before and after.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScopeImpact {
    pub scope: String,
    pub load_before_rps: f64,
    pub load_after_rps: f64,
    /// Load over the capacity left after drains (after: with the change).
    pub utilization_before: f64,
    pub utilization_after: f64,
}

/// Demand-weighted latency of one (service, group) before and after.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencyChange {
    pub service: String,
    pub group: String,
    pub latency_before_ms: f64,
    pub latency_after_ms: f64,
}

/// The impact of going from one routing to another.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Impact {
    pub scopes: Vec<ScopeImpact>,
    /// Groups whose latency changes, largest change first.
    pub latency: Vec<LatencyChange>,
    pub unserved_before_rps: f64,
    pub unserved_after_rps: f64,
    /// Money per second paid above third-party commits.
    pub overage_before: f64,
    pub overage_after: f64,
    /// Share of demand that changes edge.
    pub moved_share: f64,
}

fn unserved(r: &Routing) -> f64 {
    r.rows()
        .map(|(_, _, row)| row.demand_rps * row.unserved)
        .sum()
}

fn overage(fleet: &Fleet, r: &Routing) -> f64 {
    r.edges
        .iter()
        .filter_map(|(id, l)| fleet.edges.get(id).map(|e| (e, l)))
        .filter(|(e, _)| e.is_third_party())
        .map(|(e, l)| (l.predicted_load_rps - e.commit_rps).max(0.0) * e.overage_price)
        .sum()
}

fn latency_of(fleet: &Fleet, r: &Routing, service: &str, group: &str) -> Option<f64> {
    let g = fleet.groups.get(group)?;
    let row = r.services.get(service)?.get(group)?;
    let served: f64 = row.weights.iter().map(|w| w.weight).sum();
    if served <= 0.0 {
        return None;
    }
    let sum: f64 = row
        .weights
        .iter()
        .filter_map(|w| {
            g.candidates
                .iter()
                .find(|c| c.edge == w.edge)
                .map(|c| c.latency_ms * w.weight)
        })
        .sum();
    Some(sum / served)
}

/// The impact of going from `before` to `after` (both solved for `fleet`).
pub fn impact(fleet: &Fleet, before: &Routing, after: &Routing) -> Impact {
    let mut scopes: BTreeMap<String, [f64; 4]> = BTreeMap::new();
    for (which, r) in [(0, before), (1, after)] {
        for (id, load) in &r.edges {
            let Some(edge) = fleet.edges.get(id) else {
                continue;
            };
            for scope in edge
                .region()
                .into_iter()
                .chain(edge.provider.iter().cloned())
            {
                let s = scopes.entry(scope.to_string()).or_default();
                s[which] += load.predicted_load_rps;
                s[2 + which] += load.effective_capacity_rps;
            }
        }
    }
    let util = |load: f64, cap: f64| {
        if cap > 0.0 {
            load / cap
        } else if load > 0.0 {
            f64::INFINITY
        } else {
            0.0
        }
    };
    let scopes = scopes
        .into_iter()
        .map(|(scope, [lb, la, cb, ca])| ScopeImpact {
            scope,
            load_before_rps: lb,
            load_after_rps: la,
            utilization_before: util(lb, cb),
            utilization_after: util(la, ca),
        })
        .collect();
    let mut latency: Vec<LatencyChange> = after
        .rows()
        .filter_map(|(s, g, _)| {
            let b = latency_of(fleet, before, s.as_str(), g.as_str())?;
            let a = latency_of(fleet, after, s.as_str(), g.as_str())?;
            ((a - b).abs() > 1e-9).then(|| LatencyChange {
                service: s.to_string(),
                group: g.to_string(),
                latency_before_ms: b,
                latency_after_ms: a,
            })
        })
        .collect();
    latency.sort_by(|x, y| {
        let dx = (x.latency_after_ms - x.latency_before_ms).abs();
        let dy = (y.latency_after_ms - y.latency_before_ms).abs();
        dy.total_cmp(&dx)
            .then_with(|| (&x.service, &x.group).cmp(&(&y.service, &y.group)))
    });
    Impact {
        scopes,
        latency,
        unserved_before_rps: unserved(before),
        unserved_after_rps: unserved(after),
        overage_before: overage(fleet, before),
        overage_after: overage(fleet, after),
        moved_share: diff::moved_share(before, after),
    }
}

/// Limits an operator change must stay within unless forced.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Drains allowed at once (a drain replacing one of the same domain
    /// does not count twice).
    pub max_concurrent_drains: usize,
    /// Largest share of total demand one step may move.
    pub max_move_share: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_concurrent_drains: 3,
            max_move_share: 0.2,
        }
    }
}

/// Why a guardrail refuses a change, with the numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Violation {
    /// An edge would run above its planned load (capacity × target
    /// utilization), where it did not before.
    Overload {
        edge: String,
        load_rps: f64,
        limit_rps: f64,
        capacity_rps: f64,
    },
    /// Demand no edge could take.
    Unserved { before_rps: f64, after_rps: f64 },
    /// Too many drains at once.
    TooManyDrains { drains: usize, max: usize },
    /// One step would move too much traffic at once.
    BlastRadius { moved_share: f64, max: f64 },
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Violation::Overload {
                edge,
                load_rps,
                limit_rps,
                capacity_rps,
            } => write!(
                f,
                "edge {edge} would carry {load_rps:.0} rps, above its planned {limit_rps:.0} rps (capacity {capacity_rps:.0})"
            ),
            Violation::Unserved { before_rps, after_rps } => write!(
                f,
                "{:.0} rps of demand would be left unserved (now {before_rps:.0})",
                after_rps
            ),
            Violation::TooManyDrains { drains, max } => {
                write!(f, "{drains} drains at once, more than the {max} allowed")
            }
            Violation::BlastRadius { moved_share, max } => write!(
                f,
                "it moves {:.1}% of all traffic at once, more than {:.1}%: use steps (--steps) or --force",
                moved_share * 100.0,
                max * 100.0
            ),
        }
    }
}

/// Checks a change from `before` to `after` (the state it reaches) against
/// the limits. `first_step` is the routing after the change's first step
/// (the same as `after` for a one-step change): the blast-radius brake
/// looks at what moves at once. `drains_after` counts the drains then.
pub fn check(
    fleet: &Fleet,
    before: &Routing,
    after: &Routing,
    first_step: &Routing,
    drains_after: usize,
    limits: &Limits,
) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut hot: Vec<Violation> = after
        .edges
        .iter()
        .filter(|(_, l)| l.predicted_load_rps > l.limit_rps * (1.0 + 1e-6) + 1e-6)
        .filter(|(id, l)| {
            before
                .edges
                .get(*id)
                .is_none_or(|b| l.predicted_load_rps > b.predicted_load_rps + 1e-6)
        })
        .map(|(id, l)| Violation::Overload {
            edge: id.to_string(),
            load_rps: l.predicted_load_rps,
            limit_rps: l.limit_rps,
            capacity_rps: fleet.edges.get(id).map_or(0.0, |e| e.capacity_rps),
        })
        .collect();
    out.append(&mut hot);
    let (ub, ua) = (unserved(before), unserved(after));
    if ua > ub + 0.5 {
        out.push(Violation::Unserved {
            before_rps: ub,
            after_rps: ua,
        });
    }
    if drains_after > limits.max_concurrent_drains {
        out.push(Violation::TooManyDrains {
            drains: drains_after,
            max: limits.max_concurrent_drains,
        });
    }
    let moved = diff::moved_share(before, first_step);
    if moved > limits.max_move_share + 1e-9 {
        out.push(Violation::BlastRadius {
            moved_share: moved,
            max: limits.max_move_share,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drain::Drain;
    use crate::signals::Signals;
    use crate::solver::{solve, SolveInput};
    use crate::{DomainPath, DrainSet};

    const FLEET: &str = r#"
[[services]]
id = "www"
hostname = "www.example.com"
zone = "example.com"
default_group = "a"
nameservers = ["ns1.example.com"]

[[edges]]
id = "a1"
kind = "self_built"
site = "region/ra/metro/m/site/a1"
addresses = ["127.0.0.1"]
capacity_rps = 1000
health_check = "127.0.0.1:80"

[[edges]]
id = "b1"
kind = "self_built"
site = "region/rb/metro/m/site/b1"
addresses = ["127.0.0.2"]
capacity_rps = 1000
health_check = "127.0.0.2:80"

[[edges]]
id = "cdn"
kind = "third_party"
provider = "cdn"
site = "region/rb/metro/m/site/cdn"
cname = "x.cdn.example.net"
capacity_rps = 1000
commit_rps = 100
overage_price = 2.0
health_check = "127.0.0.3:80"

[[groups]]
id = "a"
prefixes = ["10.1.0.0/16"]
demand_rps = { www = 600 }
latency_ms = { "region/ra" = 10, "region/rb" = 50 }

[[groups]]
id = "b"
prefixes = ["10.2.0.0/16"]
demand_rps = { www = 600 }
latency_ms = { "region/rb" = 10, "region/ra" = 50 }
"#;

    fn routing(fleet: &Fleet, drains: &DrainSet) -> Routing {
        solve(SolveInput {
            fleet,
            signals: &Signals::default(),
            drains,
            previous: None,
            now_ms: 0,
        })
    }

    fn drained(domain: &str) -> DrainSet {
        let mut d = DrainSet::new();
        d.insert(Drain {
            domain: DomainPath::parse(domain).expect("path"),
            fraction: 1.0,
            reason: "t".into(),
            owner: "t".into(),
            created_by: "t".into(),
            created_at_ms: 0,
            progress: None,
            forced: None,
            drill: None,
        });
        d
    }

    #[test]
    fn a_region_drain_shows_its_cost_and_trips_the_guardrails() {
        let fleet = Fleet::from_toml(FLEET).expect("fleet");
        let before = routing(&fleet, &DrainSet::new());
        let after = routing(&fleet, &drained("region/ra"));
        let imp = impact(&fleet, &before, &after);
        let ra = imp
            .scopes
            .iter()
            .find(|s| s.scope == "region/ra")
            .expect("ra");
        assert!(
            ra.load_before_rps > 0.0 && ra.load_after_rps == 0.0,
            "{ra:?}"
        );
        let a = imp
            .latency
            .iter()
            .find(|l| l.group == "a")
            .expect("group a moves");
        assert_eq!((a.latency_before_ms, a.latency_after_ms), (10.0, 50.0));
        // 1200 rps on rb's 2000 of capacity at 0.8 headroom = 1600: b1 and
        // the CDN share it; the CDN pays overage above its 100 rps commit.
        assert!(imp.overage_after >= imp.overage_before, "{imp:?}");
        assert!(imp.moved_share > 0.4, "{imp:?}");
        let v = check(&fleet, &before, &after, &after, 1, &Limits::default());
        assert!(
            v.iter().any(|x| matches!(x, Violation::BlastRadius { .. })),
            "{v:?}"
        );
        // Stepped: the brake looks at the first step only.
        let half = {
            let mut d = drained("region/ra");
            let mut x = d
                .get(&DomainPath::parse("region/ra").expect("p"))
                .cloned()
                .expect("d");
            x.fraction = 0.1;
            d.insert(x);
            routing(&fleet, &d)
        };
        let v = check(&fleet, &before, &after, &half, 1, &Limits::default());
        assert!(
            !v.iter().any(|x| matches!(x, Violation::BlastRadius { .. })),
            "{v:?}"
        );
        let too_many = check(&fleet, &before, &after, &half, 4, &Limits::default());
        assert!(too_many
            .iter()
            .any(|x| matches!(x, Violation::TooManyDrains { drains: 4, max: 3 })));
    }

    #[test]
    fn draining_everything_leaves_demand_unserved_and_says_so() {
        let fleet = Fleet::from_toml(FLEET).expect("fleet");
        let before = routing(&fleet, &DrainSet::new());
        let mut d = drained("region/ra");
        for x in drained("region/rb").iter() {
            d.insert(x.clone());
        }
        let after = routing(&fleet, &d);
        let v = check(&fleet, &before, &after, &after, 2, &Limits::default());
        let text: Vec<String> = v.iter().map(|x| x.to_string()).collect();
        assert!(
            text.iter()
                .any(|t| t.contains("1200 rps of demand would be left unserved")),
            "{text:?}"
        );
    }
}
