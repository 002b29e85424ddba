//! Bounds on automated failover (pure).
//!
//! Health verdicts say which edges look down; automation may take them out
//! of the routing only while the capacity it removes stays within a share
//! of the fleet's total and of each region's (DESIGN.md principle 3).
//! Edges beyond the bound are *held*: they stay in the routing, an alarm
//! says so, and an operator decides (drain them, or fix the signals).
//! Edges automation already took out keep their place, so a new verdict
//! never flips an earlier failover back.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::fleet::Fleet;
use crate::ids::EdgeId;

/// How much capacity automation may remove.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Bounds {
    /// Share of the fleet's total declared capacity, in [0, 1].
    pub max_total_share: f64,
    /// Share of each region's declared capacity, in [0, 1].
    pub max_region_share: f64,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            max_total_share: 0.25,
            max_region_share: 0.5,
        }
    }
}

/// An edge that looks down but stays in the routing.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    pub edge: EdgeId,
    /// Which bound, with the numbers.
    pub why: String,
}

/// The outcome: edges to take out, and edges held in.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Bounded {
    pub down: BTreeSet<EdgeId>,
    pub held: Vec<Held>,
    /// Share of total capacity removed by `down`.
    pub removed_share: f64,
}

/// Admits `looks_down` (in order: earlier first; edges in `already_down`
/// before all others) while the bounds hold.
pub fn bound(
    fleet: &Fleet,
    looks_down: &[EdgeId],
    already_down: &BTreeSet<EdgeId>,
    bounds: &Bounds,
) -> Bounded {
    let region_of = |e: &EdgeId| {
        fleet
            .edges
            .get(e)
            .and_then(|x| x.site.region())
            .map(|r| r.to_string())
            .unwrap_or_default()
    };
    let cap = |e: &EdgeId| fleet.edges.get(e).map_or(0.0, |x| x.capacity_rps.max(0.0));
    let total: f64 = fleet.edges.values().map(|e| e.capacity_rps.max(0.0)).sum();
    let mut region_total: BTreeMap<String, f64> = BTreeMap::new();
    for e in fleet.edges.values() {
        let r = e.site.region().map(|r| r.to_string()).unwrap_or_default();
        *region_total.entry(r).or_default() += e.capacity_rps.max(0.0);
    }
    let mut order: Vec<&EdgeId> = looks_down
        .iter()
        .filter(|e| already_down.contains(*e))
        .collect();
    order.extend(looks_down.iter().filter(|e| !already_down.contains(*e)));
    let mut out = Bounded::default();
    let mut removed = 0.0;
    let mut removed_region: BTreeMap<String, f64> = BTreeMap::new();
    for e in order {
        if out.down.contains(e) || !fleet.edges.contains_key(e) {
            continue;
        }
        let c = cap(e);
        let region = region_of(e);
        let rt = region_total.get(&region).copied().unwrap_or(0.0);
        let rr = removed_region.get(&region).copied().unwrap_or(0.0);
        let share = if total > 0.0 {
            (removed + c) / total
        } else {
            1.0
        };
        let rshare = if rt > 0.0 { (rr + c) / rt } else { 1.0 };
        if share > bounds.max_total_share + 1e-9 {
            out.held.push(Held {
                edge: e.clone(),
                why: format!(
                    "taking it out would remove {:.1}% of total capacity, above the automation bound of {:.1}%",
                    share * 100.0,
                    bounds.max_total_share * 100.0
                ),
            });
            continue;
        }
        if rshare > bounds.max_region_share + 1e-9 {
            out.held.push(Held {
                edge: e.clone(),
                why: format!(
                    "taking it out would remove {:.1}% of {region}'s capacity, above the automation bound of {:.1}%",
                    rshare * 100.0,
                    bounds.max_region_share * 100.0
                ),
            });
            continue;
        }
        removed += c;
        *removed_region.entry(region).or_default() += c;
        out.down.insert(e.clone());
    }
    out.removed_share = if total > 0.0 { removed / total } else { 0.0 };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2 regions x 4 edges of 100 rps.
    fn fleet() -> Fleet {
        let mut text = String::from(
            "[[services]]\nid = \"www\"\nhostname = \"www.example.com\"\nzone = \"example.com\"\n\
             default_group = \"g\"\nnameservers = [\"ns1.example.com\"]\n\n",
        );
        for r in ["r1", "r2"] {
            for i in 1..=4 {
                text.push_str(&format!(
                    "[[edges]]\nid = \"{r}e{i}\"\nkind = \"self_built\"\nsite = \"region/{r}/metro/m/site/s{i}\"\n\
                     addresses = [\"127.0.0.{i}\"]\ncapacity_rps = 100\nhealth_check = \"127.0.0.{i}:80\"\n\n"
                ));
            }
        }
        text.push_str(
            "[[groups]]\nid = \"g\"\nprefixes = [\"10.0.0.0/8\"]\ndemand_rps = { www = 100 }\n\
             latency_ms = { \"region/r1\" = 10, \"region/r2\" = 20 }\n",
        );
        Fleet::from_toml(&text).expect("valid fleet")
    }

    fn ids(v: &[&str]) -> Vec<EdgeId> {
        v.iter().map(|s| EdgeId::from(*s)).collect()
    }

    #[test]
    fn one_pop_fails_over_by_itself() {
        let b = bound(
            &fleet(),
            &ids(&["r1e1"]),
            &BTreeSet::new(),
            &Bounds::default(),
        );
        assert_eq!(b.down.len(), 1);
        assert!(b.held.is_empty());
        assert!((b.removed_share - 0.125).abs() < 1e-9);
    }

    #[test]
    fn automation_stops_at_the_total_bound_and_says_why() {
        let f = fleet();
        let all = ids(&["r1e1", "r2e1", "r1e2", "r2e2", "r1e3"]);
        let b = bound(&f, &all, &BTreeSet::new(), &Bounds::default());
        // 25% of 800 = 200 rps: two edges.
        assert_eq!(b.down, ids(&["r1e1", "r2e1"]).into_iter().collect());
        assert_eq!(b.held.len(), 3);
        assert!(
            b.held[0]
                .why
                .contains("37.5% of total capacity, above the automation bound of 25.0%"),
            "{:?}",
            b.held
        );
    }

    #[test]
    fn the_region_bound_holds_too() {
        let bounds = Bounds {
            max_total_share: 1.0,
            max_region_share: 0.5,
        };
        let b = bound(
            &fleet(),
            &ids(&["r1e1", "r1e2", "r1e3"]),
            &BTreeSet::new(),
            &bounds,
        );
        assert_eq!(b.down.len(), 2);
        assert_eq!(b.held[0].edge, EdgeId::from("r1e3"));
        assert!(
            b.held[0].why.contains("75.0% of region/r1's capacity"),
            "{}",
            b.held[0].why
        );
    }

    #[test]
    fn earlier_failovers_keep_their_place() {
        let already: BTreeSet<EdgeId> = ids(&["r2e4", "r2e3"]).into_iter().collect();
        let b = bound(
            &fleet(),
            &ids(&["r1e1", "r2e3", "r2e4"]),
            &already,
            &Bounds::default(),
        );
        assert_eq!(b.down, already);
        assert_eq!(b.held.len(), 1);
        assert_eq!(b.held[0].edge, EdgeId::from("r1e1"));
    }

    #[test]
    fn unknown_edges_are_ignored() {
        let b = bound(
            &fleet(),
            &ids(&["gone"]),
            &BTreeSet::new(),
            &Bounds::default(),
        );
        assert!(b.down.is_empty() && b.held.is_empty());
    }
}
