//! What a change does: fleet object changes, routing rows that differ, and
//! how much traffic moves where.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::fleet::{Fleet, FleetSpec};
use crate::ids::{GroupId, ServiceId};
use crate::routing::{EdgeWeight, GroupRouting, Routing};

/// Rows whose weights differ by less than this are equal.
const SAME: f64 = 1e-9;

/// One (service, group) row that differs between two routings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RowChange {
    pub service: ServiceId,
    pub group: GroupId,
    pub before: Vec<EdgeWeight>,
    pub after: Vec<EdgeWeight>,
    pub unserved_before: f64,
    pub unserved_after: f64,
}

fn rows_differ(a: &GroupRouting, b: &GroupRouting) -> bool {
    if (a.unserved - b.unserved).abs() > SAME || a.weights.len() != b.weights.len() {
        return true;
    }
    a.weights
        .iter()
        .zip(&b.weights)
        .any(|(x, y)| x.edge != y.edge || (x.weight - y.weight).abs() > SAME)
}

/// The rows that differ between `before` and `after` (rows only in one of
/// them count as changed from or to nothing).
pub fn row_changes(before: &Routing, after: &Routing) -> Vec<RowChange> {
    let empty = GroupRouting::default();
    let mut keys: Vec<(&ServiceId, &GroupId)> = before
        .rows()
        .chain(after.rows())
        .map(|(s, g, _)| (s, g))
        .collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|(s, g)| {
            let b = before.row(s, g).unwrap_or(&empty);
            let a = after.row(s, g).unwrap_or(&empty);
            rows_differ(b, a).then(|| RowChange {
                service: s.clone(),
                group: g.clone(),
                before: b.weights.clone(),
                after: a.weights.clone(),
                unserved_before: b.unserved,
                unserved_after: a.unserved,
            })
        })
        .collect()
}

/// Share of one row's demand that changes edge (unserved counts as a
/// destination of its own): half the L1 distance between the rows.
fn row_moved(b: &GroupRouting, a: &GroupRouting) -> f64 {
    let sorted = |r: &GroupRouting| r.weights.windows(2).all(|p| p[0].edge < p[1].edge);
    let mut l1 = 0.0;
    if sorted(b) && sorted(a) {
        // Both sorted by edge id (as tables are): merge, no allocation.
        let (mut i, mut j) = (0, 0);
        while i < b.weights.len() || j < a.weights.len() {
            let d = match (b.weights.get(i), a.weights.get(j)) {
                (Some(x), Some(y)) if x.edge == y.edge => {
                    i += 1;
                    j += 1;
                    x.weight - y.weight
                }
                (Some(x), Some(y)) if x.edge < y.edge => {
                    i += 1;
                    x.weight
                }
                (Some(x), None) => {
                    i += 1;
                    x.weight
                }
                (_, Some(y)) => {
                    j += 1;
                    -y.weight
                }
                (None, None) => break,
            };
            l1 += d.abs();
        }
    } else {
        let mut delta: BTreeMap<&str, f64> = BTreeMap::new();
        for w in &b.weights {
            *delta.entry(w.edge.as_str()).or_default() += w.weight;
        }
        for w in &a.weights {
            *delta.entry(w.edge.as_str()).or_default() -= w.weight;
        }
        l1 = delta.values().map(|d| d.abs()).sum::<f64>();
    }
    (l1 + (b.unserved - a.unserved).abs()) / 2.0
}

/// Share of total demand (by the `after` demand) that changes edge between
/// two routings, in [0, 1]. This is a new table's churn.
pub fn moved_share(before: &Routing, after: &Routing) -> f64 {
    let empty = GroupRouting::default();
    let mut moved = 0.0;
    let mut total = 0.0;
    for (s, rows) in &after.services {
        // Walk the two sorted tables side by side.
        let mut prev = before.services.get(s).map(|m| m.iter().peekable());
        for (g, a) in rows {
            let b = prev
                .as_mut()
                .and_then(|it| {
                    while it.peek().is_some_and(|(k, _)| *k < g) {
                        it.next();
                    }
                    it.peek().filter(|(k, _)| *k == g).map(|(_, r)| *r)
                })
                .unwrap_or(&empty);
            total += a.demand_rps;
            moved += a.demand_rps * row_moved(b, a);
        }
    }
    if total > 0.0 {
        (moved / total).clamp(0.0, 1.0)
    } else {
        0.0
    }
}

/// Traffic in one scope before and after a change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shift {
    /// A region path, a provider path, or `total`.
    pub scope: String,
    pub rps_before: f64,
    pub rps_after: f64,
    /// For `total`: share of demand that changes edge; else share of total
    /// demand that leaves or enters this scope.
    pub moved_share: f64,
}

/// Predicted served traffic per region and provider, and the total moved.
pub fn shifts(fleet: &Fleet, before: &Routing, after: &Routing) -> Vec<Shift> {
    let mut by_scope: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for (which, routing) in [(0, before), (1, after)] {
        for (id, load) in &routing.edges {
            let Some(edge) = fleet.edges.get(id) else {
                continue;
            };
            let scopes = edge
                .region()
                .into_iter()
                .chain(edge.provider.iter().cloned());
            for scope in scopes {
                let entry = by_scope.entry(scope.to_string()).or_default();
                if which == 0 {
                    entry.0 += load.predicted_load_rps;
                } else {
                    entry.1 += load.predicted_load_rps;
                }
            }
        }
    }
    let total_demand: f64 = after.rows().map(|(_, _, r)| r.demand_rps).sum();
    let mut out: Vec<Shift> = by_scope
        .into_iter()
        .map(|(scope, (b, a))| Shift {
            scope,
            rps_before: b,
            rps_after: a,
            moved_share: if total_demand > 0.0 {
                ((a - b).abs() / total_demand).min(1.0)
            } else {
                0.0
            },
        })
        .collect();
    let served = |r: &Routing| r.edges.values().map(|l| l.predicted_load_rps).sum::<f64>();
    out.push(Shift {
        scope: "total".into(),
        rps_before: served(before),
        rps_after: served(after),
        moved_share: moved_share(before, after),
    });
    out
}

/// Kind of a fleet object change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    Added,
    Removed,
    Changed,
}

/// One fleet object that differs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObjectChange {
    pub kind: ChangeKind,
    /// `service`, `origin`, `edge` or `group`.
    pub object: &'static str,
    pub id: String,
    /// For changes: `field: before -> after`.
    pub details: Vec<String>,
}

fn by_id<T: Serialize>(items: &[T], id: impl Fn(&T) -> &str) -> BTreeMap<String, Value> {
    items
        .iter()
        .map(|i| {
            (
                id(i).to_owned(),
                serde_json::to_value(i).unwrap_or(Value::Null),
            )
        })
        .collect()
}

fn field_details(prefix: &str, before: &Value, after: &Value, out: &mut Vec<String>) {
    match (before, after) {
        (Value::Object(b), Value::Object(a)) => {
            let mut keys: Vec<&String> = b.keys().chain(a.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                let null = Value::Null;
                field_details(
                    &path,
                    b.get(k).unwrap_or(&null),
                    a.get(k).unwrap_or(&null),
                    out,
                );
            }
        }
        (b, a) if b != a => out.push(format!("{prefix}: {b} -> {a}")),
        _ => {}
    }
}

fn diff_section(
    object: &'static str,
    before: BTreeMap<String, Value>,
    after: BTreeMap<String, Value>,
    out: &mut Vec<ObjectChange>,
) {
    for (id, b) in &before {
        match after.get(id) {
            None => out.push(ObjectChange {
                kind: ChangeKind::Removed,
                object,
                id: id.clone(),
                details: vec![],
            }),
            Some(a) if a != b => {
                let mut details = Vec::new();
                field_details("", b, a, &mut details);
                out.push(ObjectChange {
                    kind: ChangeKind::Changed,
                    object,
                    id: id.clone(),
                    details,
                });
            }
            Some(_) => {}
        }
    }
    for id in after.keys().filter(|id| !before.contains_key(*id)) {
        out.push(ObjectChange {
            kind: ChangeKind::Added,
            object,
            id: id.clone(),
            details: vec![],
        });
    }
}

/// Object-level differences between two fleet specs.
pub fn fleet_changes(before: &FleetSpec, after: &FleetSpec) -> Vec<ObjectChange> {
    let mut out = Vec::new();
    diff_section(
        "service",
        by_id(&before.services, |s| &s.id),
        by_id(&after.services, |s| &s.id),
        &mut out,
    );
    diff_section(
        "origin",
        by_id(&before.origins, |o| &o.id),
        by_id(&after.origins, |o| &o.id),
        &mut out,
    );
    diff_section(
        "edge",
        by_id(&before.edges, |e| &e.id),
        by_id(&after.edges, |e| &e.id),
        &mut out,
    );
    diff_section(
        "group",
        by_id(&before.groups, |g| &g.id),
        by_id(&after.groups, |g| &g.id),
        &mut out,
    );
    diff_section(
        "anycast",
        by_id(&before.anycast, |a| &a.site),
        by_id(&after.anycast, |a| &a.site),
        &mut out,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::EdgeId;

    fn row(demand: f64, weights: &[(&str, f64)], unserved: f64) -> GroupRouting {
        GroupRouting {
            demand_rps: demand,
            weights: weights
                .iter()
                .map(|(e, w)| EdgeWeight {
                    edge: EdgeId::from(*e),
                    weight: *w,
                })
                .collect(),
            unserved,
            ..GroupRouting::default()
        }
    }

    fn routing(rows: &[(&str, GroupRouting)]) -> Routing {
        let mut r = Routing::default();
        for (g, row) in rows {
            r.services
                .entry(ServiceId::from("www"))
                .or_default()
                .insert(GroupId::from(*g), row.clone());
        }
        r
    }

    #[test]
    fn moved_share_is_half_the_l1_distance_weighted_by_demand() {
        let before = routing(&[
            ("a", row(100.0, &[("x", 0.5), ("y", 0.5)], 0.0)),
            ("b", row(300.0, &[("x", 1.0)], 0.0)),
        ]);
        let after = routing(&[
            ("a", row(100.0, &[("y", 1.0)], 0.0)),
            ("b", row(300.0, &[], 1.0)),
        ]);
        // a moves 0.5 of 100, b moves all of 300: 350 / 400.
        assert!((moved_share(&before, &after) - 0.875).abs() < 1e-12);
        assert_eq!(moved_share(&before, &before), 0.0);
        let changes = row_changes(&before, &after);
        assert_eq!(changes.len(), 2);
        assert_eq!(changes[1].unserved_after, 1.0);
        assert!(row_changes(&after, &after).is_empty());
    }

    #[test]
    fn rows_out_of_order_are_compared_by_edge() {
        let sorted = routing(&[("a", row(100.0, &[("x", 0.25), ("y", 0.75)], 0.0))]);
        let unsorted = routing(&[("a", row(100.0, &[("y", 0.5), ("x", 0.5)], 0.0))]);
        assert!((moved_share(&sorted, &unsorted) - 0.25).abs() < 1e-12);
        assert!((moved_share(&unsorted, &sorted) - 0.25).abs() < 1e-12);
    }
}
