//! The operator workflow on top of the decision code: how a drain or drill
//! request becomes a drain with a schedule, what it would do (the impact
//! preview), and whether guardrails let it through. The same functions
//! serve the dry runs (on any replica, from its snapshot) and the leader's
//! loop, so a preview is exactly what the change would do.

use sextant_core::drain::Drain;
use sextant_core::drill::{self, Condition, Drill, DrillState, Watcher, Window};
use sextant_core::impact::{self, Impact, Limits, Violation};
use sextant_core::operate::{self, EdgeSample};
use sextant_core::schedule::Schedule;
use sextant_core::{DomainPath, DrainSet, Fleet};

use crate::control_loop::{Intent, OpError, Preview, Snapshot};
use crate::inbox::Reports;

/// Workflow settings (sextant-cp flags).
#[derive(Debug, Clone)]
pub struct WorkflowConfig {
    /// Expiry of a drain that names none.
    pub default_expiry_ms: i64,
    /// Longest expiry allowed.
    pub max_expiry_ms: i64,
    pub limits: Limits,
    /// When no drill may start.
    pub drill_windows: Vec<Window>,
    /// How often a running drill looks at the signals.
    pub drill_tick_ms: i64,
    /// Longest drill.
    pub max_drill_ms: i64,
    /// Reports older than this do not count for drills.
    pub report_freshness_ms: i64,
}

impl Default for WorkflowConfig {
    fn default() -> Self {
        Self {
            default_expiry_ms: 24 * 3_600_000,
            max_expiry_ms: 7 * 24 * 3_600_000,
            limits: Limits::default(),
            drill_windows: vec![],
            drill_tick_ms: 1_000,
            max_drill_ms: 24 * 3_600_000,
            report_freshness_ms: 5_000,
        }
    }
}

/// A drain as an operator (or a drill) asks for it.
#[derive(Debug, Clone, Default)]
pub struct DrainRequest {
    pub domain: String,
    /// Target fraction; with steps, their last one (0: the last step, or 1).
    pub fraction: f64,
    pub steps: Vec<f64>,
    pub interval_ms: i64,
    /// `None`: the default expiry.
    pub expires_in_ms: Option<i64>,
    pub owner: String,
    /// Override guardrails, for this reason.
    pub force: Option<String>,
    pub drill: Option<String>,
}

/// A drain ready to commit, and what it would do.
#[derive(Debug, Clone)]
pub struct DrainPlan {
    pub drain: Drain,
    /// All drains once this one takes its first step.
    pub drains_first: DrainSet,
    /// The routing after the first step (what is committed now).
    pub first: Preview,
    /// The impact at the target (all steps done).
    pub impact: Impact,
    pub violations: Vec<Violation>,
}

fn checked_domain(fleet: &Fleet, domain: &str) -> Result<DomainPath, OpError> {
    Drain::check(fleet, domain, 1.0, "-").map_err(OpError::from)
}

/// Turns a drain request into a drain and its preview; refuses it (with
/// the numbers) when guardrails say no and it is not forced.
pub fn plan_drain(
    snap: &Snapshot,
    req: &DrainRequest,
    intent: &Intent,
    cfg: &WorkflowConfig,
    now_ms: i64,
) -> Result<DrainPlan, OpError> {
    let fleet = snap.fleet.clone().ok_or(OpError::NoFleet)?;
    let spec = operate::DrainSpec {
        domain: req.domain.clone(),
        fraction: req.fraction,
        steps: req.steps.clone(),
        interval_ms: req.interval_ms,
        expires_in_ms: req.expires_in_ms,
        owner: req.owner.clone(),
        actor: intent.actor.clone(),
        reason: intent.reason.clone(),
        force: req.force.clone(),
        drill: req.drill.clone(),
    };
    let empty = sextant_core::Routing::default();
    let before = snap.table.as_ref().map_or(&empty, |t| &t.routing);
    let expiry = operate::Expiry {
        default_ms: cfg.default_expiry_ms,
        max_ms: cfg.max_expiry_ms,
    };
    let planned = operate::plan_drain(
        &fleet,
        &snap.drains,
        before,
        &spec,
        expiry,
        &cfg.limits,
        now_ms,
        &|d| snap.solve(&fleet, d, now_ms),
    )
    .map_err(|e| match e {
        operate::PlanError::Drain(e) => OpError::Drain(e),
        operate::PlanError::Schedule(e) => OpError::Schedule(e),
        operate::PlanError::OwnedByDrill { domain, drill } => {
            OpError::OwnedByDrill { domain, drill }
        }
        operate::PlanError::ForceNeedsReason => OpError::ForceNeedsReason,
    })?;
    let impact = impact::impact(&fleet, before, &planned.at_target);
    Ok(DrainPlan {
        drain: planned.drain,
        drains_first: planned.drains_first,
        first: snap.preview_of(&fleet, planned.first),
        impact,
        violations: planned.violations,
    })
}

/// Whether a plan may go ahead: no violations, or forced.
pub fn admit(plan: &DrainPlan) -> Result<(), OpError> {
    if plan.violations.is_empty() || plan.drain.forced.is_some() {
        return Ok(());
    }
    Err(OpError::Refused {
        what: format!("drain {}", plan.drain.domain),
        violations: plan.violations.iter().map(|v| v.to_string()).collect(),
        forceable: plan.drain.drill.is_none(),
    })
}

/// The drains after an undrain of `domain`: the drain stepping down its
/// schedule, or gone (`immediate`, a one-step drain, or its last step).
pub fn plan_undrain(
    snap: &Snapshot,
    domain: &str,
    immediate: bool,
    from_drill: Option<&str>,
    now_ms: i64,
) -> Result<(DrainSet, Option<Drain>), OpError> {
    let path = DomainPath::parse(domain).map_err(|e| OpError::Drain(e.into()))?;
    let mut drains = snap.drains.clone();
    let mut drain = drains
        .get(&path)
        .cloned()
        .ok_or_else(|| OpError::NotDrained(path.to_string()))?;
    if let Some(id) = &drain.drill {
        if from_drill != Some(id.as_str()) {
            return Err(OpError::OwnedByDrill {
                domain: path.to_string(),
                drill: id.clone(),
            });
        }
    }
    let stepped = drain
        .progress
        .as_ref()
        .is_some_and(|p| p.schedule.steps.len() > 1);
    if immediate || !stepped {
        drains.remove(&path);
        return Ok((drains, None));
    }
    if let Some(p) = drain.progress.as_mut() {
        p.undrain(now_ms, false);
        drain.fraction = p.fraction();
    }
    if drain.fraction <= 0.0 {
        drains.remove(&path);
        return Ok((drains, None));
    }
    drains.insert(drain.clone());
    Ok((drains, Some(drain)))
}

/// A drill as an operator asks for it.
#[derive(Debug, Clone, Default)]
pub struct DrillRequest {
    pub domain: String,
    pub duration_ms: i64,
    pub abort_if: Vec<String>,
    pub steps: Vec<f64>,
    pub interval_ms: i64,
}

/// Checks a drill request; returns the drill and the plan of its drain, or
/// a refusal (the caller records refused drills too).
pub fn plan_drill(
    snap: &Snapshot,
    req: &DrillRequest,
    intent: &Intent,
    cfg: &WorkflowConfig,
    id: String,
    now_ms: i64,
) -> Result<(Drill, Result<DrainPlan, String>), OpError> {
    let fleet = snap.fleet.clone().ok_or(OpError::NoFleet)?;
    let domain = checked_domain(&fleet, &req.domain)?;
    if intent.reason.trim().is_empty() {
        return Err(OpError::Drain(
            sextant_core::drain::DrainError::MissingReason,
        ));
    }
    if req.duration_ms <= 0 || req.duration_ms > cfg.max_drill_ms {
        return Err(OpError::BadDrill(format!(
            "duration must be more than 0 and at most {} s, got {} s",
            cfg.max_drill_ms / 1000,
            req.duration_ms / 1000
        )));
    }
    let conditions = req
        .abort_if
        .iter()
        .map(|c| Condition::parse(c))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| OpError::BadDrill(format!("--abort-if {e}")))?;
    if conditions.is_empty() {
        return Err(OpError::BadDrill(
            "a drill needs at least one abort condition (--abort-if 'utilization>0.9')".into(),
        ));
    }
    let target = req.steps.last().copied().unwrap_or(1.0);
    let sched = Schedule::new(&req.steps, req.interval_ms, target)?;
    let mut drill = Drill {
        id: id.clone(),
        domain,
        reason: intent.reason.clone(),
        created_by: intent.actor.clone(),
        started_at_ms: now_ms,
        duration_ms: req.duration_ms,
        conditions,
        schedule: sched,
        state: DrillState::Running,
        watcher: Watcher::default(),
        peak_utilization: 0.0,
        peak_error_rate: 0.0,
        drained_at_ms: None,
        restore_started_ms: None,
        ended_at_ms: None,
        timeline: vec![],
    };
    if let Some(w) = drill::blocked(&cfg.drill_windows, now_ms) {
        return Ok((
            drill,
            Err(format!("blocking window {:?} is in effect", w.text())),
        ));
    }
    let drain_req = DrainRequest {
        domain: req.domain.clone(),
        fraction: target,
        steps: req.steps.clone(),
        interval_ms: req.interval_ms,
        // A drill's drain outlives the drill by a margin, as a safety net.
        expires_in_ms: Some((req.duration_ms * 2).min(cfg.max_expiry_ms)),
        owner: intent.actor.clone(),
        force: None,
        drill: Some(id),
    };
    let plan = plan_drain(snap, &drain_req, intent, cfg, now_ms)?;
    if !plan.violations.is_empty() {
        let why = plan
            .violations
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join("; ");
        return Ok((drill, Err(format!("guardrails: {why}"))));
    }
    drill.log(
        now_ms,
        format!("started: drain {} to {target}", drill.domain),
    );
    Ok((drill, Ok(plan)))
}

/// The edges' fresh reports (received at or after `now_ms - freshness_ms`),
/// as drills see them.
pub fn samples(
    reports: &Reports,
    now_ms: i64,
    freshness_ms: i64,
) -> std::collections::BTreeMap<sextant_core::EdgeId, EdgeSample> {
    reports
        .fresh(now_ms - freshness_ms)
        .into_iter()
        .map(|(id, r)| {
            (
                sextant_core::EdgeId::from(id.as_str()),
                EdgeSample {
                    load_rps: r.report.rps,
                    capacity_rps: r.report.capacity_rps,
                    error_rate: r.report.error_rate,
                },
            )
        })
        .collect()
}
