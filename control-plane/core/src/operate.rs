//! The scheduled side of the operator workflow, pure: what a running drill
//! sees ([`observe`]), and one pass of the loop's own timer ([`advance`]):
//! drills look at the signals (and abort, restore or end), stepped drains
//! take their due step, expire or finish undraining. The control loop and
//! the simulator both call these, so a drill simulated is the drill that
//! runs (DESIGN.md principle 1).

use std::collections::BTreeMap;

use crate::drain::{Drain, DrainSet};
use crate::drill::{Drill, DrillAction, Observation};
use crate::fleet::Fleet;
use crate::ids::EdgeId;
use crate::routing::Routing;
use crate::schedule::Transition;
use crate::DomainPath;

/// What an edge's latest fresh report says, for drills.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EdgeSample {
    /// Load it serves now, rps.
    pub load_rps: f64,
    /// Capacity it says it can take (0: not reported).
    pub capacity_rps: f64,
    /// Share of requests that failed.
    pub error_rate: f64,
}

/// What a drill of `domain` sees: the highest utilization outside the
/// drained domain (predicted by the routing, or reported, whichever is
/// higher), the highest reported error rate, and the unserved share.
/// `samples` holds only fresh reports.
pub fn observe(
    fleet: &Fleet,
    routing: &Routing,
    samples: &BTreeMap<EdgeId, EdgeSample>,
    domain: &DomainPath,
) -> Observation {
    let mut obs = Observation::default();
    for (id, edge) in &fleet.edges {
        let inside = edge.domains().any(|d| domain.covers(&d));
        let predicted = routing
            .edges
            .get(id)
            .map_or(0.0, |l| l.predicted_load_rps / edge.capacity_rps);
        let report = samples.get(id);
        let reported = report.map_or(0.0, |r| {
            let cap = if r.capacity_rps > 0.0 {
                r.capacity_rps.min(edge.capacity_rps)
            } else {
                edge.capacity_rps
            };
            r.load_rps / cap
        });
        if !inside {
            let u = predicted.max(reported);
            if u > obs.utilization {
                obs.utilization = u;
                obs.utilization_at = id.to_string();
            }
        }
        if let Some(r) = report {
            if r.error_rate > obs.error_rate {
                obs.error_rate = r.error_rate;
                obs.error_rate_at = id.to_string();
            }
        }
    }
    let demand: f64 = routing.rows().map(|(_, _, r)| r.demand_rps).sum();
    let unserved: f64 = routing
        .rows()
        .map(|(_, _, r)| r.demand_rps * r.unserved)
        .sum();
    obs.unserved = if demand > 0.0 { unserved / demand } else { 0.0 };
    obs
}

/// One audit line of an automated action.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub action: &'static str,
    pub target: String,
    pub reason: String,
    pub details: Vec<String>,
}

/// What one pass of the timer decided.
#[derive(Debug, Clone, Default)]
pub struct Advanced {
    /// The drains after it.
    pub drains: DrainSet,
    /// Drains written (stepped) and removed.
    pub put_drains: Vec<Drain>,
    pub delete_drains: Vec<DomainPath>,
    /// Drill records whose state changed (to write to the store).
    pub put_drills: Vec<Drill>,
    /// Every drill after its look, also when only its watcher or peaks
    /// moved (to keep in memory: a condition `for 30s` counts from here).
    pub ticked: Vec<Drill>,
    pub lines: Vec<Line>,
    /// The drains changed: the routing must be recomputed.
    pub routing_moves: bool,
}

impl Advanced {
    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty() && self.put_drills.is_empty()
    }
}

/// One pass of the loop's timer at `now_ms`: drills first (an abort
/// removes its drain at once), then due drain steps, expiries and ends of
/// undrains. `observe` says what a drill of a domain sees now.
pub fn advance(
    drains: &DrainSet,
    drills: &BTreeMap<String, Drill>,
    observe: &dyn Fn(&DomainPath) -> Observation,
    now_ms: i64,
) -> Advanced {
    let mut out = Advanced {
        drains: drains.clone(),
        ..Advanced::default()
    };
    for drill in drills.values() {
        let mut drill = drill.clone();
        let before = drill.clone();
        let drain = out
            .drains
            .get(&drill.domain)
            .filter(|d| d.drill.as_deref() == Some(drill.id.as_str()))
            .cloned();
        let at_target = drain
            .as_ref()
            .is_some_and(|d| !d.undraining() && (d.fraction - d.target()).abs() < 1e-12);
        let obs = if drill.state.active() {
            observe(&drill.domain)
        } else {
            Observation::default()
        };
        let why = format!("drill {}", drill.id);
        match drill.tick(&obs, at_target, drain.is_some(), now_ms) {
            DrillAction::Nothing => {}
            DrillAction::Abort(reason) => {
                if drain.is_some() {
                    out.drains.remove(&drill.domain);
                    out.delete_drains.push(drill.domain.clone());
                    out.routing_moves = true;
                }
                out.lines.push(Line {
                    action: "drill.abort",
                    target: drill.id.clone(),
                    reason,
                    details: vec![],
                });
            }
            DrillAction::Restore => {
                if let Some(mut d) = drain {
                    match d.progress.as_mut() {
                        Some(p) if p.schedule.steps.len() > 1 => {
                            p.undrain(now_ms, false);
                            d.fraction = p.fraction();
                            out.drains.insert(d.clone());
                            out.put_drains.push(d);
                        }
                        _ => {
                            out.drains.remove(&drill.domain);
                            out.delete_drains.push(drill.domain.clone());
                        }
                    }
                    out.routing_moves = true;
                }
                out.lines.push(Line {
                    action: "drill.restore",
                    target: drill.id.clone(),
                    reason: why,
                    details: vec![],
                });
            }
            DrillAction::Finished => {
                out.lines.push(Line {
                    action: "drill.end",
                    target: drill.id.clone(),
                    reason: why,
                    details: vec![format!("outcome={}", drill.outcome())],
                });
            }
        }
        if drill.state != before.state
            || drill.drained_at_ms != before.drained_at_ms
            || drill.ended_at_ms != before.ended_at_ms
        {
            out.put_drills.push(drill.clone());
        }
        if drill != before {
            out.ticked.push(drill);
        }
    }

    let due: Vec<(Drain, Transition)> = out
        .drains
        .iter()
        .filter_map(|d| Some((d.clone(), d.progress.as_ref()?.due(now_ms)?)))
        .collect();
    for (mut d, t) in due {
        let target = d.domain.to_string();
        out.lines.push(match &t {
            Transition::Step { fraction, .. } => Line {
                action: "drain.step",
                target,
                reason: d.reason.clone(),
                details: vec![
                    format!("fraction={fraction}"),
                    format!("from={}", d.fraction),
                    format!(
                        "direction={}",
                        if *fraction > d.fraction { "up" } else { "down" }
                    ),
                ],
            },
            Transition::Expire { fraction } => Line {
                action: "drain.expire",
                target,
                reason: format!("expired (was: {})", d.reason),
                details: vec![format!("fraction={fraction}")],
            },
            Transition::Remove => Line {
                action: "drain.done",
                target,
                reason: d.reason.clone(),
                details: vec!["undrained".into()],
            },
        });
        if let Some(p) = d.progress.as_mut() {
            p.apply(&t, now_ms);
            d.fraction = p.fraction();
        }
        if matches!(t, Transition::Remove) || d.fraction <= 0.0 {
            out.drains.remove(&d.domain);
            out.delete_drains.push(d.domain.clone());
        } else {
            out.drains.insert(d.clone());
            out.put_drains.push(d);
        }
        out.routing_moves = true;
    }
    out
}

/// A drain as an operator (or a drill) asks for it.
#[derive(Debug, Clone, Default)]
pub struct DrainSpec {
    pub domain: String,
    /// Target fraction; 0: the last step, or 1.
    pub fraction: f64,
    pub steps: Vec<f64>,
    pub interval_ms: i64,
    /// `None`: the default expiry.
    pub expires_in_ms: Option<i64>,
    /// Responsible team or person (default: the actor).
    pub owner: String,
    pub actor: String,
    pub reason: String,
    /// Override guardrails, for this reason.
    pub force: Option<String>,
    /// The drill this drain belongs to.
    pub drill: Option<String>,
}

/// Default and longest drain expiry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Expiry {
    pub default_ms: i64,
    pub max_ms: i64,
}

/// Why a drain cannot be planned.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Drain(#[from] crate::drain::DrainError),
    #[error("bad step schedule or expiry: {0}")]
    Schedule(#[from] crate::schedule::ScheduleError),
    #[error("{domain} is drained by drill {drill}: abort the drill instead")]
    OwnedByDrill { domain: String, drill: String },
    #[error("--force needs a reason (--force-reason)")]
    ForceNeedsReason,
}

/// A drain ready to commit, what it does at once and at its target, and
/// the guardrails' objections.
#[derive(Debug, Clone)]
pub struct PlannedDrain {
    pub drain: Drain,
    /// All drains once it takes its first step.
    pub drains_first: DrainSet,
    /// The routing after the first step (what is committed now).
    pub first: Routing,
    /// The routing at the target (all steps done).
    pub at_target: Routing,
    pub violations: Vec<crate::impact::Violation>,
}

/// Plans a drain on top of `drains` and the routing `before`: checks the
/// request, builds its schedule and expiry, solves (`solve`) for its first
/// step and its target, and checks guardrails.
#[allow(clippy::too_many_arguments)]
pub fn plan_drain(
    fleet: &Fleet,
    drains: &DrainSet,
    before: &Routing,
    spec: &DrainSpec,
    expiry: Expiry,
    limits: &crate::impact::Limits,
    now_ms: i64,
    solve: &dyn Fn(&DrainSet) -> Routing,
) -> Result<PlannedDrain, PlanError> {
    let target = match (spec.fraction, spec.steps.last()) {
        (f, _) if f != 0.0 => f,
        (_, Some(last)) => *last,
        _ => 1.0,
    };
    let path = Drain::check(fleet, &spec.domain, target, &spec.reason)?;
    if let Some(id) = drains.get(&path).and_then(|d| d.drill.as_ref()) {
        if spec.drill.as_deref() != Some(id.as_str()) {
            return Err(PlanError::OwnedByDrill {
                domain: path.to_string(),
                drill: id.clone(),
            });
        }
    }
    if matches!(&spec.force, Some(r) if r.trim().is_empty()) {
        return Err(PlanError::ForceNeedsReason);
    }
    let sched = crate::schedule::Schedule::new(&spec.steps, spec.interval_ms, target)?;
    let expires = crate::schedule::expiry(spec.expires_in_ms, expiry.default_ms, expiry.max_ms)?;
    let progress = crate::schedule::Progress::new(sched.clone(), now_ms, Some(now_ms + expires));
    let drain = Drain {
        domain: path,
        fraction: progress.fraction(),
        reason: spec.reason.clone(),
        owner: if spec.owner.is_empty() {
            spec.actor.clone()
        } else {
            spec.owner.clone()
        },
        created_by: spec.actor.clone(),
        created_at_ms: now_ms,
        progress: Some(progress),
        forced: spec.force.clone(),
        drill: spec.drill.clone(),
    };
    let mut drains_first = drains.clone();
    drains_first.insert(drain.clone());
    let first = solve(&drains_first);
    let at_target = if sched.steps.len() > 1 {
        let mut d = drains_first.clone();
        let mut full = drain.clone();
        full.fraction = target;
        d.insert(full);
        solve(&d)
    } else {
        first.clone()
    };
    let violations = crate::impact::check(
        fleet,
        before,
        &at_target,
        &first,
        drains_first.len(),
        limits,
    );
    Ok(PlannedDrain {
        drain,
        drains_first,
        first,
        at_target,
        violations,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drill::{Condition, DrillState, Watcher};
    use crate::schedule::{Progress, Schedule};

    fn path() -> DomainPath {
        DomainPath::parse("region/eu").expect("path")
    }

    fn setup(condition: &str) -> (DrainSet, BTreeMap<String, Drill>) {
        let drill = Drill {
            id: "d1".into(),
            domain: path(),
            reason: "q4".into(),
            created_by: "t".into(),
            started_at_ms: 0,
            duration_ms: 60_000,
            conditions: vec![Condition::parse(condition).expect("condition")],
            schedule: Schedule::immediate(1.0),
            state: DrillState::Running,
            watcher: Watcher::default(),
            peak_utilization: 0.0,
            peak_error_rate: 0.0,
            drained_at_ms: None,
            restore_started_ms: None,
            ended_at_ms: None,
            timeline: vec![],
        };
        let mut drains = DrainSet::new();
        drains.insert(Drain {
            domain: path(),
            fraction: 1.0,
            reason: "q4".into(),
            owner: "t".into(),
            created_by: "t".into(),
            created_at_ms: 0,
            progress: Some(Progress::new(Schedule::immediate(1.0), 0, Some(3_600_000))),
            forced: None,
            drill: Some("d1".into()),
        });
        (drains, BTreeMap::from([("d1".to_owned(), drill)]))
    }

    /// Runs the timer every second from `from` to `to` (seconds), keeping
    /// what it returns as the loop does; the first tick that aborts.
    fn run(
        drains: &mut DrainSet,
        drills: &mut BTreeMap<String, Drill>,
        error_rate: f64,
        from: i64,
        to: i64,
    ) -> Option<i64> {
        let seen = Observation {
            error_rate,
            error_rate_at: "e1".into(),
            ..Observation::default()
        };
        for s in from..=to {
            let adv = advance(drains, drills, &|_| seen.clone(), s * 1000);
            for d in adv.ticked {
                drills.insert(d.id.clone(), d);
            }
            *drains = adv.drains;
            if adv.lines.iter().any(|l| l.action == "drill.abort") {
                assert!(adv.routing_moves && adv.delete_drains == vec![path()]);
                return Some(s);
            }
        }
        None
    }

    #[test]
    fn a_condition_that_must_hold_for_a_while_counts_across_looks() {
        let (mut drains, mut drills) = setup("error_rate>0.2 for 3s");
        // Calm, then errors from t=5 s: the abort comes 3 s later, not at once.
        assert_eq!(run(&mut drains, &mut drills, 0.0, 0, 4), None);
        assert_eq!(run(&mut drains, &mut drills, 0.5, 5, 20), Some(8));
        assert!(drains.is_empty());
        assert!(
            (drills["d1"].peak_error_rate - 0.5).abs() < 1e-12,
            "peaks are kept between looks"
        );
    }

    #[test]
    fn due_drain_steps_are_taken_and_said() {
        let mut drains = DrainSet::new();
        let sched = Schedule::new(&[0.5, 1.0], 2000, 1.0).expect("schedule");
        let progress = Progress::new(sched, 0, None);
        drains.insert(Drain {
            domain: path(),
            fraction: progress.fraction(),
            reason: "maintenance".into(),
            owner: "t".into(),
            created_by: "t".into(),
            created_at_ms: 0,
            progress: Some(progress),
            forced: None,
            drill: None,
        });
        let none = |_: &DomainPath| Observation::default();
        assert!(advance(&drains, &BTreeMap::new(), &none, 1000).is_empty());
        let adv = advance(&drains, &BTreeMap::new(), &none, 2000);
        assert!(adv.routing_moves);
        assert_eq!(adv.lines[0].action, "drain.step");
        assert_eq!(adv.drains.get(&path()).map(|d| d.fraction), Some(1.0));
    }
}
