//! The N−1 report: for each region and each provider, the utilization every
//! other region and provider would reach if that one were lost.
//!
//! Each loss is solved as a full drain of the domain, from the current
//! table (so the unaffected rows stay put) and with shift limits ignored (a
//! loss is sudden). It is computed after a table is published and does not
//! delay it. Pure, like the solver.

use serde::{Deserialize, Serialize};

use crate::domain::{DomainKind, DomainPath};
use crate::drain::{Drain, DrainSet};
use crate::fleet::Fleet;
use crate::routing::Routing;
use crate::signals::Signals;
use crate::solver::{edge_states, solve_with, SolveInput, SolveOptions};

/// Load and capacity of one region or provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainUtilization {
    pub domain: DomainPath,
    pub load_rps: f64,
    /// Effective capacity of its edges (after signals and drains), rps.
    pub capacity_rps: f64,
    /// `load_rps / capacity_rps` (0 with no capacity).
    pub utilization: f64,
}

/// What losing one domain would do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossScenario {
    pub lost: DomainPath,
    /// Demand that nothing could take, rps.
    pub unserved_rps: f64,
    /// Highest utilization among the other domains.
    pub max_utilization: f64,
    /// Every other region and provider, in path order.
    pub domains: Vec<DomainUtilization>,
}

/// The report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NMinusOne {
    /// Every region and provider now, for comparison.
    pub baseline: Vec<DomainUtilization>,
    /// One per region, then one per provider.
    pub scenarios: Vec<LossScenario>,
}

/// The regions and providers of a fleet, in path order.
fn scopes(fleet: &Fleet) -> Vec<DomainPath> {
    fleet
        .domains
        .iter()
        .filter(|(d, info)| {
            matches!(d.kind(), DomainKind::Region | DomainKind::Provider) && !info.edges.is_empty()
        })
        .map(|(d, _)| d.clone())
        .collect()
}

fn utilization(
    fleet: &Fleet,
    signals: &Signals,
    drains: &DrainSet,
    routing: &Routing,
    scopes: &[DomainPath],
    skip: Option<&DomainPath>,
) -> Vec<DomainUtilization> {
    let states = edge_states(fleet, signals, drains);
    scopes
        .iter()
        .filter(|d| Some(*d) != skip)
        .map(|d| {
            let mut load = 0.0;
            let mut cap = 0.0;
            for st in &states {
                if st.edge.domains().any(|x| &x == d) {
                    cap += st.effective;
                    load += routing
                        .edges
                        .get(&st.edge.id)
                        .map_or(0.0, |l| l.predicted_load_rps);
                }
            }
            DomainUtilization {
                domain: d.clone(),
                load_rps: load,
                capacity_rps: cap,
                utilization: if cap > 0.0 { load / cap } else { 0.0 },
            }
        })
        .collect()
}

/// Computes the N−1 report for the table `routing` (solved from `fleet`,
/// `signals` and `drains`).
pub fn n_minus_one(
    fleet: &Fleet,
    signals: &Signals,
    drains: &DrainSet,
    routing: &Routing,
    now_ms: i64,
) -> NMinusOne {
    let scopes = scopes(fleet);
    let baseline = utilization(fleet, signals, drains, routing, &scopes, None);
    let mut scenarios = Vec::with_capacity(scopes.len());
    let regions = scopes.iter().filter(|d| d.kind() == DomainKind::Region);
    let providers = scopes.iter().filter(|d| d.kind() == DomainKind::Provider);
    for lost in regions.chain(providers) {
        let mut with_loss = drains.clone();
        with_loss.insert(Drain {
            domain: lost.clone(),
            fraction: 1.0,
            reason: "n-1 analysis".into(),
            owner: "sextant".into(),
            created_by: "sextant".into(),
            created_at_ms: now_ms,
            progress: None,
            forced: None,
            drill: None,
        });
        let (after, _) = solve_with(
            SolveInput {
                fleet,
                signals,
                drains: &with_loss,
                previous: Some(routing),
                now_ms,
            },
            SolveOptions {
                ignore_shift_limit: true,
            },
        );
        let domains = utilization(fleet, signals, &with_loss, &after, &scopes, Some(lost));
        let max_utilization = domains.iter().map(|d| d.utilization).fold(0.0, f64::max);
        scenarios.push(LossScenario {
            lost: lost.clone(),
            unserved_rps: after.summary.unserved_rps,
            max_utilization,
            domains,
        });
    }
    NMinusOne {
        baseline,
        scenarios,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::solver::solve;

    #[test]
    fn losing_eu_moves_its_load_to_us_and_losing_the_cdn_to_eu() {
        let f = Fleet::from_toml(crate::solver::tests::GOLDEN).expect("fleet");
        let (s, d) = (Signals::default(), DrainSet::new());
        let r = solve(SolveInput {
            fleet: &f,
            signals: &s,
            drains: &d,
            previous: None,
            now_ms: 0,
        });
        let report = n_minus_one(&f, &s, &d, &r, 0);
        let lost: Vec<&str> = report.scenarios.iter().map(|x| x.lost.as_str()).collect();
        assert_eq!(lost, ["region/eu", "region/us", "provider/cdn-a"]);
        // Baseline: us carries 400 of 2000.
        let us = report
            .baseline
            .iter()
            .find(|u| u.domain.as_str() == "region/us")
            .expect("us");
        assert!((us.utilization - 0.2).abs() < 1e-9);
        // Without eu, us carries everything: 1900 of 2000.
        let eu_loss = &report.scenarios[0];
        assert_eq!(eu_loss.domains.len(), 2, "us and cdn-a");
        let us = &eu_loss.domains[1];
        assert_eq!(us.domain.as_str(), "region/us");
        assert!((us.utilization - 0.95).abs() < 1e-9, "{us:?}");
        assert_eq!(eu_loss.unserved_rps, 0.0);
        // Without the cdn, eu takes its 200 on b: still 1500 in eu.
        let cdn_loss = &report.scenarios[2];
        let eu = &cdn_loss.domains[0];
        assert!((eu.load_rps - 1500.0).abs() < 1e-6, "{eu:?}");
    }
}
