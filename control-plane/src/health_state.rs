//! The leader's health state between the inbox and the loop: feeds the
//! pure verdict logic (`sextant_core::health`) with observations, bounds
//! automated failover (`sextant_core::failover`), and says whether the
//! routing must change, with the audit lines that explain why.

use std::collections::{BTreeMap, BTreeSet};

use sextant_core::failover::{self, Bounds, Held};
use sextant_core::health::{HealthConfig, HealthTracker, Transition, Verdict};
use sextant_core::ids::EdgeId;
use sextant_core::signals::{EdgeSignal, Health, Signals};
use sextant_core::Fleet;

use crate::inbox::{Observation, Reports};

/// What readers see of automated failover (status, metrics).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FailoverView {
    /// Edges that look down but stay in the routing (alarms).
    pub held: Vec<Held>,
    /// Verdict changes so far, by the verdict reached (`down`, `up`).
    pub verdict_changes: BTreeMap<&'static str, u64>,
    /// Automated actions so far: `failover` (an edge taken out),
    /// `restore` (put back), `held` (beyond the bound).
    pub actions: BTreeMap<&'static str, u64>,
    /// Share of total capacity automation has taken out.
    pub removed_share: f64,
    /// Observations taken in.
    pub observations: u64,
}

/// One audit line for the loop to commit.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditLine {
    pub action: &'static str,
    pub target: String,
    pub reason: String,
    pub details: Vec<String>,
}

/// What a step decided.
#[derive(Debug, Clone, Default)]
pub struct Decision {
    pub signals: Signals,
    /// The routing must be recomputed (and the audits committed).
    pub routing: bool,
    pub audits: Vec<AuditLine>,
    /// Verdict changes in this step (for logs).
    pub transitions: Vec<Transition>,
}

/// A reported capacity change smaller than this share does not re-solve.
const CAPACITY_CHANGE: f64 = 0.1;

/// A decision not yet committed: edges down, edges held, capacities.
#[derive(Debug, Clone)]
struct Pending {
    down: BTreeSet<EdgeId>,
    held: BTreeSet<EdgeId>,
    caps: BTreeMap<EdgeId, f64>,
}

/// Health verdicts, the failover bound, and what was last committed.
#[derive(Debug, Clone)]
pub struct HealthState {
    tracker: HealthTracker,
    bounds: Bounds,
    /// How long a report's load and capacity count.
    fresh_ms: i64,
    committed_down: BTreeSet<EdgeId>,
    committed_held: BTreeSet<EdgeId>,
    committed_caps: BTreeMap<EdgeId, f64>,
    pending: Option<Pending>,
    pub view: FailoverView,
}

impl HealthState {
    pub fn new(config: HealthConfig, bounds: Bounds) -> Self {
        let fresh_ms = config.stale_after_ms;
        Self {
            tracker: HealthTracker::new(config),
            bounds,
            fresh_ms,
            committed_down: BTreeSet::new(),
            committed_held: BTreeSet::new(),
            committed_caps: BTreeMap::new(),
            pending: None,
            view: FailoverView::default(),
        }
    }

    /// Whether anything is tracked (then the loop re-evaluates on a timer:
    /// heartbeats go missing without an event).
    pub fn active(&self) -> bool {
        !self.tracker.is_empty()
    }

    /// Takes in `obs`, evaluates at `now_ms`, and decides.
    pub fn step(
        &mut self,
        fleet: &Fleet,
        reports: &Reports,
        obs: Vec<Observation>,
        now_ms: i64,
    ) -> Decision {
        self.view.observations += obs.len() as u64;
        for o in obs {
            let edge = EdgeId::from(o.edge.as_str());
            if fleet.edges.contains_key(&edge) {
                self.tracker
                    .observe(&edge, &o.voter, o.ok, o.at_ms, &o.error);
            }
        }
        self.tracker.retain(|e| fleet.edges.contains_key(e));
        let transitions = self.tracker.evaluate(now_ms);
        for t in &transitions {
            *self.view.verdict_changes.entry(t.to.as_str()).or_default() += 1;
        }
        let verdicts = self.tracker.verdicts();

        // Edges that look down, earliest first.
        let mut looks_down: Vec<(&EdgeId, &Verdict)> = verdicts
            .iter()
            .filter(|(_, v)| v.health == Health::Down)
            .collect();
        looks_down.sort_by(|a, b| a.1.since_ms.cmp(&b.1.since_ms).then(a.0.cmp(b.0)));
        let order: Vec<EdgeId> = looks_down.iter().map(|(e, _)| (*e).clone()).collect();
        let bounded = failover::bound(fleet, &order, &self.committed_down, &self.bounds);
        let held_ids: BTreeSet<EdgeId> = bounded.held.iter().map(|h| h.edge.clone()).collect();

        // The signals routing will see.
        let mut signals = Signals::default();
        let mut caps = BTreeMap::new();
        for id in fleet.edges.keys() {
            let report = reports
                .get(id.as_str())
                .filter(|r| now_ms - r.received_at_ms <= self.fresh_ms);
            let measured = report
                .as_ref()
                .map(|r| r.report.capacity_rps)
                .filter(|c| *c > 0.0 && c.is_finite());
            if let Some(c) = measured {
                caps.insert(id.clone(), c);
            }
            let v = verdicts.get(id);
            if v.is_none() && report.is_none() {
                continue;
            }
            let held = held_ids.contains(id);
            let health = match v.map(|v| v.health) {
                Some(Health::Down) if bounded.down.contains(id) => Health::Down,
                Some(Health::Down) => Health::Up,
                Some(h) => h,
                None => Health::Unknown,
            };
            let reason = match (v, held) {
                (Some(v), true) => {
                    let why = bounded
                        .held
                        .iter()
                        .find(|h| &h.edge == id)
                        .map(|h| h.why.clone())
                        .unwrap_or_default();
                    format!("looks down but held in the routing: {why}; {}", v.reason)
                }
                (Some(v), false) => v.reason.clone(),
                (None, _) => "no health votes yet".to_owned(),
            };
            signals.edges.insert(
                id.clone(),
                EdgeSignal {
                    health,
                    reason,
                    measured_capacity_rps: measured,
                    current_load_rps: report.as_ref().map(|r| r.report.rps),
                    since_ms: v.map_or(0, |v| v.since_ms),
                    penalty: v.map_or(0.0, |v| v.penalty),
                    damped: v.is_some_and(|v| v.damped),
                    held,
                },
            );
        }

        let caps_moved = caps.len() != self.committed_caps.len()
            || caps.iter().any(|(e, c)| {
                self.committed_caps
                    .get(e)
                    .is_none_or(|old| (c - old).abs() > CAPACITY_CHANGE * old.max(1.0))
            });
        let mut audits = Vec::new();
        let removed = format!(
            "automation removes {:.1}% of total capacity",
            bounded.removed_share * 100.0
        );
        for e in bounded.down.difference(&self.committed_down) {
            let v = &verdicts[e];
            let mut details: Vec<String> = v
                .failing
                .iter()
                .map(|(voter, since, err)| {
                    format!(
                        "{voter} failing since {}: {err}",
                        crate::timefmt::rfc3339(*since)
                    )
                })
                .collect();
            details.push(removed.clone());
            audits.push(AuditLine {
                action: "failover.down",
                target: e.to_string(),
                reason: v.reason.clone(),
                details,
            });
        }
        for e in self.committed_down.difference(&bounded.down) {
            let reason = match verdicts.get(e) {
                Some(v) if v.health == Health::Down => {
                    format!("held in by the bound now; {}", v.reason)
                }
                Some(v) => v.reason.clone(),
                None => "no longer in the fleet".to_owned(),
            };
            audits.push(AuditLine {
                action: "failover.up",
                target: e.to_string(),
                reason,
                details: vec![removed.clone()],
            });
        }
        for h in bounded
            .held
            .iter()
            .filter(|h| !self.committed_held.contains(&h.edge))
        {
            audits.push(AuditLine {
                action: "failover.held",
                target: h.edge.to_string(),
                reason: format!("automation bound reached: {}; an operator must decide (drain it, or fix the signals)", h.why),
                details: verdicts
                    .get(&h.edge)
                    .map(|v| vec![v.reason.clone()])
                    .unwrap_or_default(),
            });
        }
        let routing = !audits.is_empty() || caps_moved;
        self.view.held = bounded.held;
        self.view.removed_share = bounded.removed_share;
        self.pending = routing.then_some(Pending {
            down: bounded.down,
            held: held_ids,
            caps,
        });
        Decision {
            signals,
            routing,
            audits,
            transitions,
        }
    }

    /// The last decision was committed.
    pub fn committed(&mut self) {
        if let Some(Pending { down, held, caps }) = self.pending.take() {
            for _ in down.difference(&self.committed_down) {
                *self.view.actions.entry("failover").or_default() += 1;
            }
            for _ in self.committed_down.difference(&down) {
                *self.view.actions.entry("restore").or_default() += 1;
            }
            for _ in held.difference(&self.committed_held) {
                *self.view.actions.entry("held").or_default() += 1;
            }
            self.committed_down = down;
            self.committed_held = held;
            self.committed_caps = caps;
        }
    }
}
