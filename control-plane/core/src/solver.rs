//! The routing decision: a pure function of (fleet, signals, drains, previous
//! routing, now).
//!
//! This is the boundary the control loop, the dry-run previews and the
//! simulator call. The current implementation is deliberately simple:
//!
//! - `optimize` services: each group's weight goes to its usable candidates
//!   in proportion to their capacity left after drains;
//! - `weighted` services: the operator's weights, scaled by each edge's drain
//!   factor and renormalised over the usable candidates;
//! - a group whose candidates are all drained gets `unserved = 1`, never a
//!   weight on a drained edge; a group whose candidates are all unhealthy
//!   (but not drained) fails open: they are treated as healthy, and flagged;
//! - each edge's upstream is split across origins in proportion to their
//!   capacity left after drains.
//!
//! It does not yet account for capacity shortage, latency or cost; the
//! steering solver replaces the body of [`solve`] without changing its
//! signature.

use std::collections::BTreeMap;

use crate::drain::DrainSet;
use crate::fleet::{ClientGroup, Fleet, PolicyMode, Service};
use crate::ids::EdgeId;
use crate::routing::{EdgeLoad, EdgeWeight, GroupRouting, OriginWeight, Routing};
use crate::signals::Signals;

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

/// Computes the routing for every (service, group) and every edge.
pub fn solve(input: SolveInput<'_>) -> Routing {
    let fleet = input.fleet;
    let drain_factor: BTreeMap<&EdgeId, f64> = fleet
        .edges
        .values()
        .map(|e| (&e.id, input.drains.factor(e.domains())))
        .collect();

    let mut routing = Routing::default();
    for service in fleet.services.values() {
        let rows = routing.services.entry(service.id.clone()).or_default();
        for group in fleet.groups.values() {
            rows.insert(
                group.id.clone(),
                route_group(fleet, input.signals, &drain_factor, service, group),
            );
        }
    }

    // Upstream split, the same for every edge: origins by capacity after drains.
    let origin_share: Vec<(_, f64)> = fleet
        .origins
        .values()
        .map(|o| {
            (
                &o.id,
                o.capacity_rps * input.drains.factor(o.domain.ancestors()),
            )
        })
        .filter(|(_, c)| *c > 0.0)
        .collect();
    let origin_total: f64 = origin_share.iter().map(|(_, c)| c).sum();
    let origins: Vec<OriginWeight> = origin_share
        .iter()
        .map(|(id, c)| OriginWeight {
            origin: (*id).clone(),
            weight: c / origin_total,
        })
        .collect();

    let mut load: BTreeMap<&EdgeId, f64> = BTreeMap::new();
    for (_, _, row) in routing.rows() {
        for w in &row.weights {
            *load.entry(&w.edge).or_default() += row.demand_rps * w.weight;
        }
    }
    let edges = fleet
        .edges
        .values()
        .map(|e| {
            let predicted = load.get(&e.id).copied().unwrap_or(0.0);
            let load = EdgeLoad {
                predicted_load_rps: predicted,
                effective_capacity_rps: e.capacity_rps * drain_factor[&e.id],
                utilization: predicted / e.capacity_rps,
                origins: origins.clone(),
            };
            (e.id.clone(), load)
        })
        .collect();
    routing.edges = edges;
    routing
}

fn route_group(
    fleet: &Fleet,
    signals: &Signals,
    drain_factor: &BTreeMap<&EdgeId, f64>,
    service: &Service,
    group: &ClientGroup,
) -> GroupRouting {
    let mut row = GroupRouting {
        demand_rps: group.demand(&service.id),
        ..GroupRouting::default()
    };
    let static_weights = match service.mode {
        PolicyMode::Weighted => service.weights.get(&group.id),
        PolicyMode::Optimize => None,
    };
    // (edge, raw weight before health) for candidates not fully drained.
    let raw: Vec<(&EdgeId, f64)> = group
        .candidates
        .iter()
        .filter_map(|c| {
            let factor = drain_factor.get(&c.edge).copied().unwrap_or(0.0);
            let base = match static_weights {
                Some(w) => w.get(&c.edge).copied().unwrap_or(0.0),
                None => fleet.edges.get(&c.edge).map_or(0.0, |e| e.capacity_rps),
            };
            let w = base * factor;
            (w > 0.0).then_some((&c.edge, w))
        })
        .collect();
    if raw.is_empty() {
        row.unserved = 1.0;
        row.notes.push(if static_weights.is_some() {
            "no candidate with a non-zero static weight is left after drains".into()
        } else {
            "every candidate is drained".into()
        });
        return row;
    }
    let healthy: Vec<(&EdgeId, f64)> = raw
        .iter()
        .copied()
        .filter(|(e, _)| signals.health(e).usable())
        .collect();
    let chosen = if healthy.is_empty() {
        row.failed_open = true;
        row.notes
            .push("every candidate is unhealthy: failed open (treated as healthy)".into());
        raw
    } else {
        healthy
    };
    let total: f64 = chosen.iter().map(|(_, w)| w).sum();
    row.weights = chosen
        .into_iter()
        .map(|(edge, w)| EdgeWeight {
            edge: edge.clone(),
            weight: w / total,
        })
        .collect();
    row
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::DomainPath;
    use crate::drain::Drain;
    use crate::ids::{GroupId, ServiceId};
    use crate::routing::WEIGHT_EPSILON;
    use crate::signals::{EdgeSignal, Health};

    pub(crate) const SMALL: &str = r#"
[[services]]
id = "www"
hostname = "www.example.com"
zone = "example.com"
default_group = "eu"
nameservers = ["ns1.example.com"]

[[origins]]
id = "dc1"
domain = "region/eu/origin/dc1"
endpoints = ["127.0.0.1:8081"]
capacity_rps = 3000

[[origins]]
id = "dc2"
domain = "region/us/origin/dc2"
endpoints = ["127.0.0.1:8082"]
capacity_rps = 1000

[[edges]]
id = "ams1"
kind = "self_built"
site = "region/eu/metro/ams/site/ams1"
addresses = ["127.1.0.1"]
capacity_rps = 1000
health_check = "127.1.0.1:80"

[[edges]]
id = "ams2"
kind = "self_built"
site = "region/eu/metro/ams/site/ams2"
addresses = ["127.1.0.2"]
capacity_rps = 3000
health_check = "127.1.0.2:80"

[[edges]]
id = "nyc1"
kind = "self_built"
site = "region/us/metro/nyc/site/nyc1"
addresses = ["127.2.0.1"]
capacity_rps = 2000
health_check = "127.2.0.1:80"

[[edges]]
id = "cdn-eu"
kind = "third_party"
provider = "cdn-a"
site = "region/eu/metro/ams/site/cdn-a-ams"
cname = "eu.cdn-a.example.net"
capacity_rps = 4000
cost_per_unit = 0.5
commit_rps = 100
overage_price = 1.0
health_check = "https://eu.cdn-a.example.net/health"

[[groups]]
id = "eu"
prefixes = ["10.1.0.0/16"]
demand_rps = { www = 1000 }
latency_ms = { "region/eu" = 10, "region/us" = 90 }

[[groups]]
id = "us"
prefixes = ["10.2.0.0/16"]
demand_rps = { www = 500 }
latency_ms = { "region/us" = 10, "ams1" = 80 }
"#;

    fn fleet() -> Fleet {
        Fleet::from_toml(SMALL).expect("small fleet")
    }

    fn drain(domain: &str, fraction: f64) -> Drain {
        Drain {
            domain: DomainPath::parse(domain).expect(domain),
            fraction,
            reason: "test".into(),
            owner: "sre".into(),
            created_by: "t".into(),
            created_at_ms: 0,
        }
    }

    fn run(fleet: &Fleet, signals: &Signals, drains: &DrainSet) -> Routing {
        solve(SolveInput {
            fleet,
            signals,
            drains,
            previous: None,
            now_ms: 0,
        })
    }

    fn row<'a>(r: &'a Routing, g: &str) -> &'a GroupRouting {
        r.row(&ServiceId::from("www"), &GroupId::from(g))
            .expect("row")
    }

    fn w(r: &GroupRouting, e: &str) -> f64 {
        r.weight_of(&EdgeId::from(e))
    }

    #[test]
    fn weights_follow_capacity() {
        let f = fleet();
        let r = run(&f, &Signals::default(), &DrainSet::new());
        let eu = row(&r, "eu");
        // Candidates: ams1 1000, ams2 3000, cdn-eu 4000, nyc1 2000 → of 10000.
        assert!((w(eu, "ams1") - 0.1).abs() < 1e-12);
        assert!((w(eu, "ams2") - 0.3).abs() < 1e-12);
        assert!((w(eu, "cdn-eu") - 0.4).abs() < 1e-12);
        assert!((w(eu, "nyc1") - 0.2).abs() < 1e-12);
        assert_eq!(eu.unserved, 0.0);
        // us has nyc1 (region) and ams1 (by edge id) only.
        let us = row(&r, "us");
        assert!((w(us, "nyc1") - 2.0 / 3.0).abs() < 1e-12);
        assert!((w(us, "ams1") - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(w(us, "ams2"), 0.0);
        // Predicted load of ams1: 1000 × 0.1 + 500 × 1/3.
        let ams1 = &r.edges[&EdgeId::from("ams1")];
        assert!((ams1.predicted_load_rps - (100.0 + 500.0 / 3.0)).abs() < 1e-9);
        // Origins by capacity.
        assert_eq!(ams1.origins.len(), 2);
        assert!((ams1.origins[0].weight - 0.75).abs() < 1e-12);
    }

    #[test]
    fn a_drained_region_gets_zero_and_the_rest_renormalises() {
        let f = fleet();
        let mut drains = DrainSet::new();
        drains.insert(drain("region/eu", 1.0));
        let r = run(&f, &Signals::default(), &drains);
        for (_, _, row) in r.rows() {
            for e in ["ams1", "ams2", "cdn-eu"] {
                assert_eq!(w(row, e), 0.0);
            }
            assert!((row.total() - 1.0).abs() < WEIGHT_EPSILON);
        }
        assert!((w(row(&r, "eu"), "nyc1") - 1.0).abs() < 1e-12);
        // The eu origin is drained too.
        let nyc1 = &r.edges[&EdgeId::from("nyc1")];
        assert_eq!(nyc1.origins.len(), 1);
        assert_eq!(nyc1.origins[0].origin.as_str(), "dc2");
        assert_eq!(r.edges[&EdgeId::from("ams1")].effective_capacity_rps, 0.0);
    }

    #[test]
    fn partial_drains_scale_weights() {
        let f = fleet();
        let mut drains = DrainSet::new();
        drains.insert(drain("region/eu/metro/ams/site/ams2", 0.5));
        let r = run(&f, &Signals::default(), &drains);
        let eu = row(&r, "eu");
        // ams2 keeps 1500 of 3000: total 8500.
        assert!((w(eu, "ams2") - 1500.0 / 8500.0).abs() < 1e-12);
    }

    #[test]
    fn a_group_with_every_candidate_drained_is_unserved() {
        let f = fleet();
        let mut drains = DrainSet::new();
        drains.insert(drain("region/us", 1.0));
        drains.insert(drain("region/eu/metro/ams/site/ams1", 1.0));
        let r = run(&f, &Signals::default(), &drains);
        let us = row(&r, "us");
        assert!(us.weights.is_empty());
        assert_eq!(us.unserved, 1.0);
        assert!(!us.notes.is_empty());
    }

    #[test]
    fn unhealthy_edges_are_avoided_and_all_down_fails_open() {
        let f = fleet();
        let mut signals = Signals::default();
        signals.edges.insert(
            EdgeId::from("nyc1"),
            EdgeSignal {
                health: Health::Down,
                reason: "test".into(),
            },
        );
        let r = run(&f, &signals, &DrainSet::new());
        assert_eq!(w(row(&r, "eu"), "nyc1"), 0.0);
        assert!((w(row(&r, "us"), "ams1") - 1.0).abs() < 1e-12);
        signals.edges.insert(
            EdgeId::from("ams1"),
            EdgeSignal {
                health: Health::Down,
                reason: "test".into(),
            },
        );
        let r = run(&f, &signals, &DrainSet::new());
        let us = row(&r, "us");
        assert!(us.failed_open);
        assert!((us.total() - 1.0).abs() < WEIGHT_EPSILON);
    }

    #[test]
    fn weighted_mode_uses_static_weights_renormalised() {
        let text = SMALL.replace(
            "nameservers = [\"ns1.example.com\"]",
            "nameservers = [\"ns1.example.com\"]\npolicy = { mode = \"weighted\", weights = { eu = { ams1 = 1, ams2 = 3, nyc1 = 4 } } }",
        );
        let f = Fleet::from_toml(&text).expect("weighted fleet");
        let mut drains = DrainSet::new();
        drains.insert(drain("region/us", 1.0));
        let r = run(&f, &Signals::default(), &drains);
        let eu = row(&r, "eu");
        assert!((w(eu, "ams1") - 0.25).abs() < 1e-12);
        assert!((w(eu, "ams2") - 0.75).abs() < 1e-12);
        assert_eq!(w(eu, "cdn-eu"), 0.0);
    }

    #[test]
    fn same_input_same_output() {
        let f = fleet();
        let a = run(&f, &Signals::default(), &DrainSet::new());
        let b = run(&f, &Signals::default(), &DrainSet::new());
        assert_eq!(
            serde_json::to_string(&a).expect("json"),
            serde_json::to_string(&b).expect("json")
        );
    }
}
