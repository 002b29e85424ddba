//! The run: the world (demand, edges, probes, resolvers) in simulated time
//! around the control plane's own decision code.
//!
//! The control-plane side mirrors `control-plane/src/control_loop.rs` and
//! `workflow.rs`, calling the same `sextant-core` functions: observations
//! go to [`Automation::step`]; a decision that moves routing is solved and
//! committed (then [`Automation::committed`]); drains step by
//! [`Progress::due`]; drills look at the world every tick through
//! [`Drill::tick`]; a shift-limited move continues after the shift
//! interval. Nothing else re-solves. A commit reaches DNS and edges after
//! the propagation delay; while the control plane is down nothing is
//! decided or published, and DNS keeps its last config (static stability).
//!
//! The world side: each (service, group) row's traffic is split over edges
//! by three cohorts of clients — those behind resolvers that honour the TTL
//! (they move linearly over one TTL after a new answer), those behind
//! resolvers that overstay it (linearly over `overstay`), and sticky
//! sessions (they leave with a half-life). An edge serves up to its
//! capacity (none when down); the rest of its load is unserved, shared
//! pro rata by the rows that send it.

use std::collections::{BTreeMap, BTreeSet};

use sextant_core::automation::{AuditLine, Automation, Observation, Reported};
use sextant_core::drill::{Drill, DrillAction, DrillState, Watcher};
use sextant_core::operate;
use sextant_core::routing::Routing;
use sextant_core::schedule::Schedule;
use sextant_core::signals::Signals;
use sextant_core::solver::{solve, SolveInput};
use sextant_core::{DomainPath, DrainSet, EdgeId, Fleet};

use crate::latency::{Histogram, Sample};
use crate::results::*;
use crate::scenario::{Action, Curve, Scenario};
use crate::slo;
use crate::time::rfc3339;

/// A mix of edges: (edge position, share), sorted by edge.
type Mix = Vec<(u32, f64)>;

/// Share of a failure's peak drop left when it counts as mitigated.
const MITIGATED_BELOW: f64 = 0.05;
/// Per-group series are kept when groups × steps is at most this.
const GROUP_SERIES_LIMIT: usize = 300_000;
/// Time buckets of the heatmap, at most.
const HEAT_BUCKETS: usize = 120;
/// Rows of the heatmap, at most, before aggregating to a higher level.
const HEAT_ROWS: usize = 60;
/// Audit entries kept.
const MAX_AUDIT: usize = 2000;
/// Longest drain expiry (the server's default maximum, 7 days).
const MAX_EXPIRY_MS: i64 = 7 * 24 * 3_600_000;
const DEFAULT_EXPIRY_MS: i64 = 24 * 3_600_000;

/// The clients of one (service, group) row moving between answers.
#[derive(Debug, Clone)]
struct Moving {
    start_ms: i64,
    /// Per cohort (honouring, overstaying, sticky): the split at `start_ms`.
    from: [Mix; 3],
}

/// One (service, group) with demand.
#[derive(Debug, Clone)]
struct Unit {
    service: usize,
    group: usize,
    peak_rps: f64,
    ttl_ms: i64,
    target: Mix,
    moving: Option<Moving>,
}

/// A failure being tracked for time to detect and mitigate.
#[derive(Debug, Clone)]
struct Track {
    event: usize,
    at_ms: i64,
    edges: Vec<usize>,
    degrade: bool,
    detected_ms: Option<i64>,
    mitigated_ms: Option<i64>,
    peak_drop: f64,
    recovered_ms: Option<i64>,
}

/// The control plane's state, as its loop holds it.
struct ControlPlane {
    automation: Automation,
    signals: Signals,
    drains: DrainSet,
    drills: BTreeMap<String, Drill>,
    table: Option<Routing>,
    version: u64,
    shift_due_ms: Option<i64>,
    up: bool,
}

/// Edges' last reports, as the control plane's inbox keeps them.
#[derive(Debug, Clone, Copy, Default)]
struct EdgeReport {
    at_ms: i64,
    capacity_rps: f64,
    load_rps: f64,
    error_rate: f64,
}

pub(crate) struct Engine<'a> {
    sc: &'a Scenario,
    fleet: &'a Fleet,
    edge_ids: Vec<EdgeId>,
    edge_pos: BTreeMap<EdgeId, usize>,
    edge_region: Vec<usize>,
    regions: Vec<String>,
    units: Vec<Unit>,
    group_refs: Vec<&'a sextant_core::fleet::ClientGroup>,
    /// Per service: the default group's position.
    default_group: Vec<usize>,
    // The world.
    down: Vec<u32>,
    cap_factor: Vec<f64>,
    partitioned: BTreeSet<String>,
    reports: Vec<Option<EdgeReport>>,
    /// The fresh reports as the automation reads them, and which edges
    /// (positions) they are: rebuilt only when that set changes.
    reported: BTreeMap<EdgeId, Reported>,
    reported_idx: Vec<usize>,
    // The control plane and what it published.
    cp: ControlPlane,
    in_flight: Vec<(i64, u64, std::sync::Arc<Routing>)>,
    dns_version: u64,
    config_changes_while_down: u32,
    solves: u64,
    audit: Vec<AuditEntry>,
    tracks: Vec<Track>,
    // Scratch.
    load: Vec<f64>,
    last_load: Vec<f64>,
}

fn sample_gauss(seed: u64, a: u64, b: u64) -> f64 {
    let mut x =
        seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xD1B5_4A32_D192_ED03);
    let mut next = || {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    let u1 = next().max(1e-300);
    let u2 = next();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Adds `w × mix` into `out` (unsorted; merge later).
fn add_scaled(out: &mut Mix, mix: &Mix, w: f64) {
    if w > 0.0 {
        out.extend(mix.iter().map(|(e, s)| (*e, s * w)));
    }
}

fn merge(mix: &mut Mix) {
    mix.sort_by_key(|x| x.0);
    let mut out: Mix = Vec::with_capacity(mix.len());
    for &(e, s) in mix.iter() {
        match out.last_mut() {
            Some(last) if last.0 == e => last.1 += s,
            _ => out.push((e, s)),
        }
    }
    out.retain(|x| x.1 > 1e-12);
    *mix = out;
}

impl<'a> Engine<'a> {
    pub(crate) fn new(sc: &'a Scenario) -> Self {
        let fleet = &sc.fleet;
        let edge_ids: Vec<EdgeId> = fleet.edges.keys().cloned().collect();
        let edge_pos = edge_ids
            .iter()
            .enumerate()
            .map(|(i, e)| (e.clone(), i))
            .collect();
        let mut regions: Vec<String> = fleet
            .edges
            .values()
            .map(|e| e.region().map_or_else(|| "-".to_owned(), |r| r.to_string()))
            .collect();
        regions.sort();
        regions.dedup();
        let edge_region = fleet
            .edges
            .values()
            .map(|e| {
                let r = e.region().map_or_else(|| "-".to_owned(), |r| r.to_string());
                regions.binary_search(&r).unwrap_or(0)
            })
            .collect();
        let mut units = Vec::new();
        for (si, (sid, svc)) in fleet.services.iter().enumerate() {
            let ttl_ms = sc
                .ttl_override_ms
                .unwrap_or(i64::from(svc.ttl_seconds) * 1000);
            for (gi, g) in fleet.groups.values().enumerate() {
                let d = g.demand(sid);
                if d > 0.0 {
                    units.push(Unit {
                        service: si,
                        group: gi,
                        peak_rps: d,
                        ttl_ms,
                        target: vec![],
                        moving: None,
                    });
                }
            }
        }
        let default_group = fleet
            .services
            .values()
            .map(|s| {
                fleet
                    .groups
                    .keys()
                    .position(|g| *g == s.default_group)
                    .unwrap_or(0)
            })
            .collect();
        let n = edge_ids.len();
        Self {
            sc,
            fleet,
            edge_ids,
            edge_pos,
            edge_region,
            regions,
            units,
            group_refs: fleet.groups.values().collect(),
            default_group,
            down: vec![0; n],
            cap_factor: vec![1.0; n],
            partitioned: BTreeSet::new(),
            reports: vec![None; n],
            reported: BTreeMap::new(),
            reported_idx: Vec::new(),
            cp: ControlPlane {
                automation: Automation::new(sc.health.clone(), sc.bounds),
                signals: Signals::default(),
                drains: DrainSet::new(),
                drills: BTreeMap::new(),
                table: None,
                version: 0,
                shift_due_ms: None,
                up: true,
            },
            in_flight: vec![],
            dns_version: 0,
            config_changes_while_down: 0,
            solves: 0,
            audit: vec![],
            tracks: vec![],
            load: vec![0.0; n],
            last_load: vec![0.0; n],
        }
    }

    fn demand(&self, u: &Unit, t_ms: i64, step: u64, unit_index: usize) -> f64 {
        let sc = self.sc;
        let m = &sc.groups[u.group];
        let mut f = m.scale;
        if sc.curve == Curve::Diurnal {
            let h = (t_ms as f64 / 3_600_000.0 + m.utc_offset_h).rem_euclid(24.0);
            let c = 0.5 * (1.0 + (std::f64::consts::TAU * (h - m.peak_hour) / 24.0).cos());
            f *= m.trough + (1.0 - m.trough) * c;
        }
        for s in &sc.surges {
            if t_ms >= s.from_ms
                && t_ms < s.to_ms
                && (s.groups.is_empty() || s.groups.contains(&u.group))
            {
                f *= s.factor;
            }
        }
        if sc.noise > 0.0 {
            f *= (1.0 + sc.noise * sample_gauss(sc.seed, unit_index as u64, step)).max(0.0);
        }
        u.peak_rps * f
    }

    fn capacity(&self, e: usize) -> f64 {
        if self.down[e] > 0 {
            0.0
        } else {
            self.declared(e) * self.cap_factor[e]
        }
    }

    fn declared(&self, e: usize) -> f64 {
        self.fleet
            .edges
            .get(&self.edge_ids[e])
            .map_or(0.0, |x| x.capacity_rps)
    }

    // ---------------------------------------------------------------------
    // The control plane.
    // ---------------------------------------------------------------------

    fn log(&mut self, now: i64, action: &str, target: &str, reason: &str) {
        if self.audit.len() < MAX_AUDIT {
            self.audit.push(AuditEntry {
                t_s: ((now - self.sc.start_ms) as f64) / 1000.0,
                action: action.to_owned(),
                target: target.to_owned(),
                reason: reason.to_owned(),
                version: self.cp.version,
            });
        }
    }

    fn solve_with(&mut self, drains: &DrainSet, now: i64) -> Routing {
        self.solves += 1;
        solve(SolveInput {
            fleet: self.fleet,
            signals: &self.cp.signals,
            drains,
            previous: self.cp.table.as_ref(),
            now_ms: now,
        })
    }

    /// Commits a routing (with its drains) and publishes it.
    fn commit(&mut self, drains: DrainSet, routing: Routing, now: i64, audits: &[AuditLine]) {
        self.cp.shift_due_ms = routing
            .summary
            .pending_shift
            .then_some(now + self.sc.shift_interval_ms);
        self.cp.drains = drains;
        self.cp.version += 1;
        let shared = std::sync::Arc::new(routing.clone());
        self.cp.table = Some(routing);
        self.in_flight
            .push((now + self.sc.propagation_ms, self.cp.version, shared));
        for a in audits {
            self.log(now, a.action, &a.target, &a.reason);
            self.note_detection(a, now);
        }
    }

    fn note_detection(&mut self, a: &AuditLine, now: i64) {
        let edge = self.edge_pos.get(a.target.as_str()).copied();
        for t in &mut self.tracks {
            if t.detected_ms.is_some() || t.at_ms > now {
                continue;
            }
            let hit = match a.action {
                "failover.down" | "failover.held" => edge.is_some_and(|e| t.edges.contains(&e)),
                "capacity.update" => t.degrade,
                _ => false,
            };
            if hit {
                t.detected_ms = Some(now);
            }
        }
    }

    fn line(action: &'static str, target: String, reason: String) -> AuditLine {
        AuditLine {
            action,
            target,
            reason,
            details: vec![],
        }
    }

    /// Probes, reports and verdicts: `on_signals` of the loop.
    fn on_signals(&mut self, now: i64, probe: bool) {
        let mut obs = Vec::new();
        if probe {
            for (i, id) in self.edge_ids.iter().enumerate() {
                for v in &self.sc.vantages {
                    let cut = self.partitioned.contains(v);
                    let ok = self.down[i] == 0 && !cut;
                    obs.push(Observation {
                        edge: id.to_string(),
                        voter: v.clone(),
                        ok,
                        at_ms: now,
                        error: if ok {
                            String::new()
                        } else if cut {
                            "timeout".into()
                        } else {
                            "connection refused".into()
                        },
                    });
                }
            }
        }
        let fresh = now - self.sc.health.stale_after_ms;
        let of = |r: &EdgeReport| Reported {
            capacity_rps: Some(r.capacity_rps),
            load_rps: Some(r.load_rps),
        };
        let fresh_idx: Vec<usize> = (0..self.reports.len())
            .filter(|&i| self.reports[i].as_ref().is_some_and(|r| r.at_ms >= fresh))
            .collect();
        if fresh_idx == self.reported_idx {
            // The same edges report: update in place (both in fleet order).
            for ((_, slot), &i) in self.reported.iter_mut().zip(&self.reported_idx) {
                if let Some(r) = &self.reports[i] {
                    *slot = of(r);
                }
            }
        } else {
            self.reported = fresh_idx
                .iter()
                .filter_map(|&i| Some((self.edge_ids[i].clone(), of(self.reports[i].as_ref()?))))
                .collect();
            self.reported_idx = fresh_idx;
        }
        let decision = self
            .cp
            .automation
            .step(self.fleet, &self.reported, obs, now, &rfc3339);
        self.cp.signals = decision.signals;
        if !decision.routing {
            return;
        }
        let audits = if decision.audits.is_empty() {
            vec![Self::line(
                "capacity.update",
                String::new(),
                "edges report a different capacity".into(),
            )]
        } else {
            decision.audits
        };
        let drains = self.cp.drains.clone();
        let routing = self.solve_with(&drains, now);
        self.commit(drains, routing, now, &audits);
        self.cp.automation.committed();
    }

    /// The edges' fresh reports, as drills see them.
    fn samples(&self, now: i64) -> BTreeMap<sextant_core::EdgeId, operate::EdgeSample> {
        let fresh = now - self.sc.health.stale_after_ms;
        self.fleet
            .edges
            .keys()
            .zip(&self.reports)
            .filter_map(|(id, r)| {
                let r = r.filter(|r| r.at_ms >= fresh)?;
                Some((
                    id.clone(),
                    operate::EdgeSample {
                        load_rps: r.load_rps,
                        capacity_rps: r.capacity_rps,
                        error_rate: r.error_rate,
                    },
                ))
            })
            .collect()
    }

    /// Drill looks and drain steps: the loop's timer, through
    /// `sextant_core::operate::advance` as the server calls it.
    fn scheduled(&mut self, now: i64) {
        let samples = self.samples(now);
        let empty = Routing::default();
        let routing = self.cp.table.as_ref().unwrap_or(&empty);
        let fleet = self.fleet;
        let observe = |d: &DomainPath| operate::observe(fleet, routing, &samples, d);
        let adv = operate::advance(&self.cp.drains, &self.cp.drills, &observe, now);
        for d in adv.ticked {
            self.cp.drills.insert(d.id.clone(), d);
        }
        if adv.lines.is_empty() {
            return;
        }
        let audits: Vec<AuditLine> = adv
            .lines
            .into_iter()
            .map(|l| Self::line(l.action, l.target, l.reason))
            .collect();
        let routing = self.solve_with(&adv.drains, now);
        self.commit(adv.drains, routing, now, &audits);
    }

    /// A drain planned by `sextant_core::operate::plan_drain`, as the
    /// server plans it: the drains after its first step, the routing then,
    /// and the guardrails' objections.
    #[allow(clippy::too_many_arguments)]
    fn plan_drain(
        &mut self,
        domain: &str,
        target: f64,
        steps: &[f64],
        interval_ms: i64,
        expires_ms: Option<i64>,
        reason: &str,
        drill: Option<String>,
        force: Option<String>,
        now: i64,
    ) -> Result<(DrainSet, Routing, Vec<String>), String> {
        let spec = operate::DrainSpec {
            domain: domain.to_owned(),
            fraction: target,
            steps: steps.to_vec(),
            interval_ms,
            expires_in_ms: expires_ms,
            owner: "sextant-sim".into(),
            actor: "operator".into(),
            reason: reason.to_owned(),
            force,
            drill,
        };
        let empty = Routing::default();
        let before = self.cp.table.as_ref().unwrap_or(&empty);
        let solves = std::cell::Cell::new(0u64);
        let (fleet, signals, previous) = (self.fleet, &self.cp.signals, self.cp.table.as_ref());
        let planned = operate::plan_drain(
            fleet,
            &self.cp.drains,
            before,
            &spec,
            operate::Expiry {
                default_ms: DEFAULT_EXPIRY_MS,
                max_ms: MAX_EXPIRY_MS,
            },
            &self.sc.limits,
            now,
            &|drains| {
                solves.set(solves.get() + 1);
                solve(SolveInput {
                    fleet,
                    signals,
                    drains,
                    previous,
                    now_ms: now,
                })
            },
        );
        self.solves += solves.get();
        let planned = planned.map_err(|e| e.to_string())?;
        let violations = planned.violations.iter().map(|v| v.to_string()).collect();
        Ok((planned.drains_first, planned.first, violations))
    }

    fn operator(&mut self, action: &Action, label: &str, now: i64) {
        if !self.cp.up {
            self.log(now, "refused", label, "the control plane is down");
            return;
        }
        match action {
            Action::Drain {
                domain,
                fraction,
                steps,
                interval_ms,
                expires_ms,
                force,
                reason,
            } => {
                match self.plan_drain(
                    domain,
                    *fraction,
                    steps,
                    *interval_ms,
                    *expires_ms,
                    reason,
                    None,
                    force.clone(),
                    now,
                ) {
                    Ok((drains, routing, violations)) => {
                        if !violations.is_empty() && force.is_none() {
                            self.log(now, "drain.refused", domain, &violations.join("; "));
                            return;
                        }
                        let line = Self::line("drain", domain.clone(), reason.clone());
                        self.commit(drains, routing, now, &[line]);
                    }
                    Err(e) => self.log(now, "drain.refused", domain, &e),
                }
            }
            Action::Undrain { domain } => {
                let Ok(path) = DomainPath::parse(domain) else {
                    return;
                };
                let mut drains = self.cp.drains.clone();
                let Some(mut d) = drains.get(&path).cloned() else {
                    self.log(now, "undrain.refused", domain, "not drained");
                    return;
                };
                if let Some(id) = &d.drill {
                    self.log(now, "undrain.refused", domain, &format!("owned by {id}"));
                    return;
                }
                let stepped = d
                    .progress
                    .as_ref()
                    .is_some_and(|p| p.schedule.steps.len() > 1);
                if let (true, Some(p)) = (stepped, d.progress.as_mut()) {
                    p.undrain(now, false);
                    d.fraction = p.fraction();
                }
                if !stepped || d.fraction <= 0.0 {
                    drains.remove(&path);
                } else {
                    drains.insert(d);
                }
                let routing = self.solve_with(&drains, now);
                let line = Self::line("undrain", domain.clone(), "operator".into());
                self.commit(drains, routing, now, &[line]);
            }
            Action::Drill {
                domain,
                duration_ms,
                conditions,
                steps,
                interval_ms,
                reason,
            } => {
                let id = format!("drill-{}", self.cp.drills.len() + 1);
                let target = steps.last().copied().unwrap_or(1.0);
                let schedule = Schedule::new(steps, *interval_ms, target)
                    .unwrap_or_else(|_| Schedule::immediate(target));
                let Ok(path) = DomainPath::parse(domain) else {
                    return;
                };
                let mut drill = Drill {
                    id: id.clone(),
                    domain: path,
                    reason: reason.clone(),
                    created_by: "operator".into(),
                    started_at_ms: now,
                    duration_ms: *duration_ms,
                    conditions: conditions.clone(),
                    schedule,
                    state: DrillState::Running,
                    watcher: Watcher::default(),
                    peak_utilization: 0.0,
                    peak_error_rate: 0.0,
                    drained_at_ms: None,
                    restore_started_ms: None,
                    ended_at_ms: None,
                    timeline: vec![],
                };
                let planned = self.plan_drain(
                    domain,
                    target,
                    steps,
                    *interval_ms,
                    Some((duration_ms * 2).min(MAX_EXPIRY_MS)),
                    reason,
                    Some(id.clone()),
                    None,
                    now,
                );
                let refusal = match &planned {
                    Err(e) => Some(e.clone()),
                    Ok((_, _, v)) if !v.is_empty() => Some(format!("guardrails: {}", v.join("; "))),
                    Ok(_) => None,
                };
                if let Some(reason) = refusal {
                    drill.state = DrillState::Refused {
                        reason: reason.clone(),
                    };
                    drill.ended_at_ms = Some(now);
                    drill.log(now, format!("refused: {reason}"));
                    self.log(now, "drill.refused", &id, &reason);
                    self.cp.drills.insert(id, drill);
                    return;
                }
                if let Ok((drains, routing, _)) = planned {
                    drill.log(now, format!("started: drain {domain} to {target}"));
                    self.cp.drills.insert(id.clone(), drill);
                    let line = Self::line("drill.start", id, reason.clone());
                    self.commit(drains, routing, now, &[line]);
                }
            }
            Action::AbortDrill { drill } => {
                let Some(mut d) = self.cp.drills.get(drill).cloned() else {
                    self.log(now, "drill.abort.refused", drill, "unknown drill");
                    return;
                };
                if matches!(
                    d.abort("aborted by operator".into(), now),
                    DrillAction::Nothing
                ) {
                    return;
                }
                let mut drains = self.cp.drains.clone();
                if drains
                    .get(&d.domain)
                    .is_some_and(|x| x.drill.as_deref() == Some(drill.as_str()))
                {
                    drains.remove(&d.domain);
                }
                self.cp.drills.insert(drill.clone(), d);
                let routing = self.solve_with(&drains, now);
                let line = Self::line("drill.abort", drill.clone(), "operator".into());
                self.commit(drains, routing, now, &[line]);
            }
            _ => {}
        }
    }

    // ---------------------------------------------------------------------
    // The world.
    // ---------------------------------------------------------------------

    fn apply_event(&mut self, index: usize, now: i64) {
        let ev = &self.sc.events[index];
        match &ev.action {
            Action::Outage { edges, .. } => {
                for &e in edges {
                    self.down[e] += 1;
                }
                let drop: f64 = edges.iter().map(|&e| self.last_load[e]).sum();
                self.tracks.push(Track {
                    event: index,
                    at_ms: now,
                    edges: edges.clone(),
                    degrade: false,
                    detected_ms: None,
                    mitigated_ms: None,
                    peak_drop: drop,
                    recovered_ms: None,
                });
            }
            Action::Recover { edges, .. } => {
                for &e in edges {
                    self.down[e] = self.down[e].saturating_sub(1);
                }
                for t in &mut self.tracks {
                    if !t.degrade
                        && t.recovered_ms.is_none()
                        && t.edges.iter().any(|e| edges.contains(e))
                    {
                        t.recovered_ms = Some(now);
                    }
                }
            }
            Action::Degrade {
                edges, capacity, ..
            } => {
                for &e in edges {
                    self.cap_factor[e] = *capacity;
                }
                if *capacity < 1.0 {
                    self.tracks.push(Track {
                        event: index,
                        at_ms: now,
                        edges: edges.clone(),
                        degrade: true,
                        detected_ms: None,
                        mitigated_ms: None,
                        peak_drop: 0.0,
                        recovered_ms: None,
                    });
                } else {
                    for t in &mut self.tracks {
                        if t.degrade
                            && t.recovered_ms.is_none()
                            && t.edges.iter().any(|e| edges.contains(e))
                        {
                            t.recovered_ms = Some(now);
                        }
                    }
                }
            }
            Action::Partition { vantage } => {
                self.partitioned.insert(vantage.clone());
            }
            Action::Heal { vantage } => {
                self.partitioned.remove(vantage);
            }
            Action::ControlPlaneDown => {
                self.cp.up = false;
                self.log(now, "control_plane.down", "", "simulated outage");
            }
            Action::ControlPlaneUp => {
                if !self.cp.up {
                    self.cp.up = true;
                    self.log(now, "control_plane.up", "", "back");
                }
            }
            other => {
                let (other, label) = (other.clone(), ev.label.clone());
                self.operator(&other, &label, now);
            }
        }
    }

    /// DNS and edges apply the configs whose propagation is over.
    fn deliver(&mut self, now: i64) {
        let mut latest = None;
        self.in_flight.retain(|(at, v, r)| {
            if *at <= now {
                latest = Some((*v, r.clone()));
                false
            } else {
                true
            }
        });
        let Some((version, routing)) = latest else {
            return;
        };
        if version <= self.dns_version {
            return;
        }
        if !self.cp.up {
            self.config_changes_while_down += 1;
        }
        let first = self.dns_version == 0;
        self.dns_version = version;
        self.apply_routing(&routing, now, first);
    }

    fn apply_routing(&mut self, routing: &Routing, now: i64, immediate: bool) {
        // Group ids by position, once (nth on a BTreeMap is linear).
        let sids: Vec<_> = self.fleet.services.keys().collect();
        let gids: Vec<_> = self.fleet.groups.keys().collect();
        for ui in 0..self.units.len() {
            let (s, g) = (self.units[ui].service, self.units[ui].group);
            let mix_of = |group: usize| -> Mix {
                let mut mix: Mix = routing
                    .row(sids[s], gids[group])
                    .map(|r| {
                        r.weights
                            .iter()
                            .filter(|w| w.weight > 0.0)
                            .filter_map(|w| {
                                self.edge_pos.get(&w.edge).map(|&i| (i as u32, w.weight))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let total: f64 = mix.iter().map(|x| x.1).sum();
                if total <= 0.0 {
                    return vec![];
                }
                for x in &mut mix {
                    x.1 /= total;
                }
                merge(&mut mix);
                mix
            };
            let mut target = mix_of(g);
            if target.is_empty() {
                // DNS answers a row with no usable edge from the default group.
                target = mix_of(self.default_group[s]);
            }
            let unit = &self.units[ui];
            let same = unit.target.len() == target.len()
                && unit
                    .target
                    .iter()
                    .zip(&target)
                    .all(|(a, b)| a.0 == b.0 && (a.1 - b.1).abs() < 1e-9);
            if same {
                continue;
            }
            if immediate || unit.target.is_empty() {
                let u = &mut self.units[ui];
                u.target = target;
                u.moving = None;
                continue;
            }
            let from = self.cohorts(ui, now);
            let u = &mut self.units[ui];
            u.target = target;
            u.moving = Some(Moving {
                start_ms: now,
                from,
            });
        }
    }

    /// How far each cohort still sits on its `from` split (1: all of it).
    fn decay(&self, u: &Unit, dt: i64) -> [f64; 3] {
        let lin = |tau: i64| {
            if tau <= 0 {
                0.0
            } else {
                (1.0 - dt as f64 / tau as f64).max(0.0)
            }
        };
        let hl = self.sc.sticky_half_life_ms;
        let sticky = if hl <= 0 {
            0.0
        } else {
            let v = 0.5f64.powf(dt as f64 / hl as f64);
            if v < 1e-4 {
                0.0
            } else {
                v
            }
        };
        [lin(u.ttl_ms), lin(self.sc.overstay_ms), sticky]
    }

    fn shares(&self) -> [f64; 3] {
        let (o, s) = (self.sc.overstay_share, self.sc.sticky_share);
        [1.0 - o - s, o, s]
    }

    /// Each cohort's split now.
    fn cohorts(&self, ui: usize, now: i64) -> [Mix; 3] {
        let u = &self.units[ui];
        match &u.moving {
            None => [u.target.clone(), u.target.clone(), u.target.clone()],
            Some(m) => {
                let d = self.decay(u, now - m.start_ms);
                let mut out: [Mix; 3] = Default::default();
                for c in 0..3 {
                    let mut mix = Vec::new();
                    add_scaled(&mut mix, &u.target, 1.0 - d[c]);
                    add_scaled(&mut mix, &m.from[c], d[c]);
                    merge(&mut mix);
                    out[c] = mix;
                }
                out
            }
        }
    }

    /// The unit's traffic split now (into `out`); settles finished moves.
    fn split(&mut self, ui: usize, now: i64, out: &mut Mix) {
        out.clear();
        let shares = self.shares();
        let u = &self.units[ui];
        match &u.moving {
            None => out.extend_from_slice(&u.target),
            Some(m) => {
                let d = self.decay(u, now - m.start_ms);
                if d.iter().all(|x| *x <= 0.0) {
                    out.extend_from_slice(&u.target);
                    self.units[ui].moving = None;
                    return;
                }
                let to: f64 = (0..3).map(|c| shares[c] * (1.0 - d[c])).sum();
                add_scaled(out, &u.target, to);
                for c in 0..3 {
                    add_scaled(out, &m.from[c], shares[c] * d[c]);
                }
                merge(out);
            }
        }
    }

    // ---------------------------------------------------------------------
    // The run.
    // ---------------------------------------------------------------------

    pub(crate) fn run(mut self, progress: &mut dyn FnMut(u64, u64)) -> Results {
        let sc = self.sc;
        let steps = (sc.duration_ms / sc.step_ms) as usize;
        let tick = sc.step_ms.min(sc.probe_interval_ms);
        let n_edges = self.edge_ids.len();
        let n_groups = self.fleet.groups.len();
        let shares_ok = self.units.len();
        let detailed = n_groups * steps <= GROUP_SERIES_LIMIT;
        let lat = &sc.latency;

        // Start: the control plane has been running; DNS is converged.
        let t0 = sc.start_ms;
        self.on_signals(t0, true);
        if self.cp.table.is_none() {
            let drains = self.cp.drains.clone();
            let routing = self.solve_with(&drains, t0);
            self.commit(
                drains,
                routing,
                t0,
                &[Self::line("start", String::new(), "initial routing".into())],
            );
        }
        self.in_flight.clear();
        if let Some(r) = self.cp.table.clone() {
            self.dns_version = self.cp.version;
            self.apply_routing(&r, t0, true);
        }
        let initial_versions = self.cp.version;

        // Outputs.
        let mut st = Steps::default();
        let mut region_served = vec![vec![0.0; steps]; self.regions.len()];
        let mut g_demand = vec![0.0; n_groups];
        let mut g_unserved = vec![0.0; n_groups];
        let mut g_hist: Vec<Histogram> = (0..n_groups).map(|_| Histogram::new()).collect();
        let mut g_series: Vec<GroupSeries> = if detailed {
            vec![GroupSeries::default(); n_groups]
        } else {
            vec![]
        };
        let mut e_served = vec![0.0; n_edges];
        let mut e_peak = vec![0.0f64; n_edges];
        let mut e_over = vec![0u64; n_edges];
        let mut e_down = vec![0u64; n_edges];
        let mut peak = (0.0f64, String::new(), 0.0);
        let mut cost_sum = Cost::default();
        let mut max_cons = 0.0f64;
        // Heatmap at site level; aggregated after.
        let bucket_steps = steps.div_ceil(HEAT_BUCKETS).max(1);
        let buckets = steps.div_ceil(bucket_steps);
        let level = heat_level(self.fleet);
        let heat_domain: Vec<String> = self
            .fleet
            .edges
            .values()
            .map(|e| level_of(&e.site, &level))
            .collect();
        let mut heat_names: Vec<String> = heat_domain.clone();
        heat_names.sort();
        heat_names.dedup();
        let heat_idx: Vec<usize> = heat_domain
            .iter()
            .map(|d| heat_names.binary_search(d).unwrap_or(0))
            .collect();
        let mut heat = vec![vec![0.0f64; buckets]; heat_names.len()];

        let mut split: Mix = Vec::new();
        let mut splits: Vec<(u32, u32, f64)> = Vec::new(); // unit, edge, rps
        let mut unit_demand = vec![0.0; shares_ok];
        let mut next_event = 0usize;
        let mut t = t0;
        let end = t0 + (steps as i64 - 1) * sc.step_ms;
        let mut k = 0usize;
        let mut gh_step: Vec<Histogram> = if detailed {
            (0..n_groups).map(|_| Histogram::new()).collect()
        } else {
            vec![]
        };
        while t <= end {
            // Events due now.
            while next_event < sc.events.len() && sc.events[next_event].at_ms <= t {
                self.apply_event(next_event, t);
                next_event += 1;
            }
            // The control loop.
            if self.cp.up {
                let probe = (t - t0) % sc.probe_interval_ms == 0;
                for i in 0..n_edges {
                    if self.down[i] == 0 {
                        let cap = self.declared_cap(i);
                        let load = self.last_load[i];
                        self.reports[i] = Some(EdgeReport {
                            at_ms: t,
                            capacity_rps: cap,
                            load_rps: load,
                            error_rate: if load > 0.0 {
                                ((load - cap) / load).max(0.0)
                            } else {
                                0.0
                            },
                        });
                    }
                }
                self.on_signals(t, probe);
                self.scheduled(t);
                if self.cp.shift_due_ms.is_some_and(|d| d <= t) {
                    self.cp.shift_due_ms = None;
                    let drains = self.cp.drains.clone();
                    let routing = self.solve_with(&drains, t);
                    let before = self.cp.table.clone().unwrap_or_default();
                    if !sextant_core::diff::row_changes(&before, &routing).is_empty() {
                        let line = Self::line(
                            "routing.shift_step",
                            String::new(),
                            "the next step of a shift-limited move".into(),
                        );
                        self.commit(drains, routing, t, &[line]);
                    }
                }
            }
            self.deliver(t);

            if (t - t0) % sc.step_ms == 0 {
                // Demand and loads.
                self.load.iter_mut().for_each(|x| *x = 0.0);
                splits.clear();
                for (ui, slot) in unit_demand.iter_mut().enumerate() {
                    let d = self.demand(&self.units[ui], t, k as u64, ui);
                    *slot = d;
                    self.split(ui, t, &mut split);
                    for &(e, s) in &split {
                        let rps = d * s;
                        self.load[e as usize] += rps;
                        splits.push((ui as u32, e, rps));
                    }
                }
                let caps: Vec<f64> = (0..n_edges).map(|e| self.capacity(e)).collect();
                let ratio: Vec<f64> = (0..n_edges)
                    .map(|e| {
                        let l = self.load[e];
                        if l > 0.0 {
                            (caps[e] / l).min(1.0)
                        } else {
                            1.0
                        }
                    })
                    .collect();
                let util: Vec<f64> = (0..n_edges)
                    .map(|e| {
                        let c = self.declared_cap(e);
                        if c > 0.0 {
                            self.load[e] / c
                        } else if self.load[e] > 0.0 {
                            f64::INFINITY
                        } else {
                            0.0
                        }
                    })
                    .collect();
                // Served per unit and group, latency.
                let mut served_u = vec![0.0; self.units.len()];
                let mut lost_u = vec![0.0; self.units.len()];
                let mut hist = Histogram::new();
                for &(ui, e, rps) in &splits {
                    let (ui, e) = (ui as usize, e as usize);
                    let s = rps * ratio[e];
                    served_u[ui] += s;
                    lost_u[ui] += rps * (1.0 - ratio[e]);
                    if s > 0.0 {
                        let g = self.units[ui].group;
                        let base = self.base_latency(g, e);
                        let u = util[e].min(1.5);
                        let excess = ((u - lat.congestion_knee)
                            / (1.0 - lat.congestion_knee).max(1e-9))
                        .max(0.0);
                        let ms = base * (1.0 + lat.congestion_factor * excess * excess);
                        if let Some(at) = Sample::of(ms, s) {
                            hist.add_sample(at);
                            g_hist[g].add_sample(at);
                            if detailed {
                                gh_step[g].add_sample(at);
                            }
                        }
                    }
                }
                let mut demand_t = 0.0;
                let mut served_t = 0.0;
                let mut unserved_t = 0.0;
                let mut gd = vec![0.0; if detailed { n_groups } else { 0 }];
                let mut gs = gd.clone();
                let mut gu = gd.clone();
                for (ui, u) in self.units.iter().enumerate() {
                    let d = unit_demand[ui];
                    let routed: f64 = served_u[ui] + lost_u[ui];
                    let unserved = lost_u[ui] + (d - routed).max(0.0);
                    max_cons = max_cons.max((served_u[ui] + unserved - d).abs());
                    demand_t += d;
                    served_t += served_u[ui];
                    unserved_t += unserved;
                    g_demand[u.group] += d;
                    g_unserved[u.group] += unserved;
                    if detailed {
                        gd[u.group] += d;
                        gs[u.group] += served_u[ui];
                        gu[u.group] += unserved;
                    }
                }
                if detailed {
                    for g in 0..n_groups {
                        let ser = &mut g_series[g];
                        ser.demand.push(r3(gd[g]));
                        ser.served.push(r3(gs[g]));
                        ser.unserved.push(r3(gu[g]));
                        let h = std::mem::take(&mut gh_step[g]);
                        let [p50, _, p99] = h.percentiles(lat.jitter);
                        ser.p50_ms.push(r3(p50));
                        ser.p99_ms.push(r3(p99));
                        gh_step[g] = h.cleared();
                    }
                }
                // Edges: utilization, overload, cost, regions, heat.
                let mut max_u = 0.0f64;
                let mut over = 0u32;
                let mut cost = Cost::default();
                for (e, edge) in self.fleet.edges.values().enumerate() {
                    let served = self.load[e] * ratio[e];
                    e_served[e] += served;
                    region_served[self.edge_region[e]][k] += served;
                    if self.down[e] > 0 {
                        e_down[e] += 1;
                    } else {
                        let u = util[e];
                        e_peak[e] = e_peak[e].max(u);
                        if u > max_u {
                            max_u = u;
                        }
                        if u > peak.0 {
                            peak = (u, edge.id.to_string(), (t - t0) as f64 / 1000.0);
                        }
                        if u > 1.0 + 1e-9 {
                            over += 1;
                            e_over[e] += 1;
                        }
                    }
                    let h = &mut heat[heat_idx[e]][k / bucket_steps];
                    let hu = if util[e].is_finite() { util[e] } else { 2.0 };
                    *h = h.max(hu);
                    if edge.is_third_party() {
                        let commit = edge.commit_rps * edge.cost_per_unit;
                        cost.commit += commit;
                        cost.overage += (served - edge.commit_rps).max(0.0) * edge.price_per_unit();
                    } else {
                        cost.self_built += served * edge.cost_per_unit;
                    }
                    self.last_load[e] = self.load[e];
                }
                cost.total = cost.self_built + cost.commit + cost.overage;
                cost_sum.self_built += cost.self_built;
                cost_sum.commit += cost.commit;
                cost_sum.overage += cost.overage;
                cost_sum.total += cost.total;
                // Failures: mitigated once their edges drop (almost) nothing.
                for tr in &mut self.tracks {
                    if tr.mitigated_ms.is_some() || tr.recovered_ms.is_some() {
                        continue;
                    }
                    let dropped: f64 = tr
                        .edges
                        .iter()
                        .map(|&e| self.load[e] * (1.0 - ratio[e]))
                        .sum();
                    tr.peak_drop = tr.peak_drop.max(dropped);
                    if dropped <= MITIGATED_BELOW * tr.peak_drop + 1e-6 {
                        tr.mitigated_ms = Some(t);
                    }
                }
                let [p50, p95, p99] = hist.percentiles(lat.jitter);
                st.t_s.push(((t - t0) as f64) / 1000.0);
                st.demand.push(r3(demand_t));
                st.served.push(r3(served_t));
                st.unserved.push(r3(unserved_t));
                st.p50_ms.push(r3(p50));
                st.p95_ms.push(r3(p95));
                st.p99_ms.push(r3(p99));
                st.max_utilization.push(r3(max_u));
                st.overloaded_edges.push(over);
                st.cost.push(r3(cost.total));
                st.config_version.push(self.dns_version);
                st.control_plane_up.push(self.cp.up);
                k += 1;
                progress(k as u64, steps as u64);
            }
            t += tick;
        }

        // SLO burn.
        let slo = slo::evaluate(&st.demand, &st.unserved, sc.step_ms, sc.objective);
        st.burn_5m = slo.burn_5m.iter().map(|x| r3(*x)).collect();
        st.burn_1h = slo.burn_1h.iter().map(|x| r3(*x)).collect();
        st.alerts = slo.alerts;

        let n = steps.max(1) as f64;
        let total_demand: f64 = st.demand.iter().sum();
        let total_unserved: f64 = st.unserved.iter().sum();
        let total_served: f64 = st.served.iter().sum();
        let worst = |v: &Vec<f64>| v.iter().copied().fold(0.0f64, f64::max);
        let view = &self.cp.automation.view;
        let summary = Summary {
            demand_avg_rps: r3(total_demand / n),
            served_avg_rps: r3(total_served / n),
            unserved_share: if total_demand > 0.0 {
                total_unserved / total_demand
            } else {
                0.0
            },
            availability: if total_demand > 0.0 {
                total_served / total_demand
            } else {
                1.0
            },
            peak_utilization: r3(peak.0),
            peak_utilization_edge: peak.1,
            peak_utilization_s: peak.2,
            overloaded_edge_steps: e_over.iter().sum(),
            worst_p50_ms: worst(&st.p50_ms),
            worst_p95_ms: worst(&st.p95_ms),
            worst_p99_ms: worst(&st.p99_ms),
            cost: Cost {
                self_built: r3(cost_sum.self_built / n),
                commit: r3(cost_sum.commit / n),
                overage: r3(cost_sum.overage / n),
                total: r3(cost_sum.total / n),
            },
            budget_consumed: slo.budget_consumed,
            alerts_fired: slo.summary.iter().map(|a| a.fired).sum(),
            alerts: slo.summary,
            routing_versions: self.cp.version - initial_versions,
            config_changes_while_down: self.config_changes_while_down,
            failovers: view.actions.get("failover").copied().unwrap_or(0),
            restores: view.actions.get("restore").copied().unwrap_or(0),
            held: view.actions.get("held").copied().unwrap_or(0),
            max_conservation_error: max_cons,
            solves: self.solves,
        };

        let groups = self
            .fleet
            .groups
            .keys()
            .enumerate()
            .map(|(g, id)| {
                let [p50, p95, p99] = g_hist[g].percentiles(lat.jitter);
                GroupResult {
                    id: id.to_string(),
                    demand_avg_rps: r3(g_demand[g] / n),
                    unserved_share: if g_demand[g] > 0.0 {
                        g_unserved[g] / g_demand[g]
                    } else {
                        0.0
                    },
                    p50_ms: r3(p50),
                    p95_ms: r3(p95),
                    p99_ms: r3(p99),
                    series: detailed.then(|| std::mem::take(&mut g_series[g])),
                }
            })
            .collect();
        let step_s = sc.step_ms as f64 / 1000.0;
        let edges = self
            .fleet
            .edges
            .values()
            .enumerate()
            .map(|(e, x)| EdgeResult {
                id: x.id.to_string(),
                site: x.site.to_string(),
                capacity_rps: x.capacity_rps,
                served_avg_rps: r3(e_served[e] / n),
                peak_utilization: r3(e_peak[e]),
                overload_s: e_over[e] as f64 * step_s,
                down_s: e_down[e] as f64 * step_s,
            })
            .collect();
        let regions = self
            .regions
            .iter()
            .zip(region_served)
            .map(|(name, v)| Series {
                name: name.clone(),
                values: v.into_iter().map(r3).collect(),
            })
            .collect();
        let heatmap = Heatmap {
            level,
            bucket_s: bucket_steps as f64 * step_s,
            domains: heat_names,
            max_utilization: heat
                .into_iter()
                .map(|row| row.into_iter().map(r3).collect())
                .collect(),
        };
        let events = self.event_results();
        let drills = self
            .cp
            .drills
            .values()
            .map(|d| DrillResult {
                id: d.id.clone(),
                domain: d.domain.to_string(),
                outcome: d.outcome(),
                started_s: (d.started_at_ms - t0) as f64 / 1000.0,
                drained_after_s: d.time_to_drain_ms().map(|x| x as f64 / 1000.0),
                restored_after_s: d.time_to_restore_ms().map(|x| x as f64 / 1000.0),
                peak_utilization: r3(d.peak_utilization),
                timeline: d
                    .timeline
                    .iter()
                    .map(|e| ((e.at_ms - t0) as f64 / 1000.0, e.text.clone()))
                    .collect(),
            })
            .collect();
        let mut results = Results {
            format: FORMAT,
            scenario: ScenarioInfo {
                name: sc.name.clone(),
                description: sc.description.clone(),
                seed: sc.seed,
                start: rfc3339(t0),
                duration_s: sc.duration_ms as f64 / 1000.0,
                step_s,
                fleet: sc.fleet_source.clone(),
                edges: n_edges,
                groups: n_groups,
                services: self.fleet.services.len(),
                objective: sc.objective,
            },
            summary,
            steps: st,
            regions,
            groups,
            edges,
            heatmap,
            events,
            drills,
            audit: std::mem::take(&mut self.audit),
            expectations: vec![],
            passed: true,
        };
        results.expectations = crate::expect::judge(&sc.expect, &results);
        results.passed = results.expectations.iter().all(|e| e.pass);
        results
    }

    fn declared_cap(&self, e: usize) -> f64 {
        self.declared(e) * self.cap_factor[e]
    }

    fn base_latency(&self, group: usize, edge: usize) -> f64 {
        let Some(g) = self.group_refs.get(group) else {
            return 0.0;
        };
        match g.candidates.binary_search_by_key(&edge, |c| c.edge_index) {
            Ok(i) => g.candidates[i].latency_ms,
            // Not a candidate (a fallback answer): the worst it knows.
            Err(_) => g
                .candidates
                .iter()
                .map(|c| c.latency_ms)
                .fold(0.0, f64::max),
        }
    }

    fn event_results(&self) -> Vec<EventResult> {
        let t0 = self.sc.start_ms;
        let secs = |ms: i64| ms as f64 / 1000.0;
        let mut out = Vec::new();
        let mut seen = BTreeSet::new();
        for (i, ev) in self.sc.events.iter().enumerate() {
            if ev.at_ms > t0 + self.sc.duration_ms {
                continue;
            }
            let track = self.tracks.iter().find(|t| t.event == i);
            if !seen.insert(i) {
                continue;
            }
            let (det, mit, note) = match track {
                Some(t) => {
                    let det = t.detected_ms.map(|d| secs(d - t.at_ms));
                    let mit = t.mitigated_ms.map(|m| secs(m - t.at_ms));
                    let note = match (t.mitigated_ms, t.recovered_ms) {
                        (Some(_), _) => String::new(),
                        (None, Some(r)) => {
                            format!("recovered after {} s, before mitigation", secs(r - t.at_ms))
                        }
                        (None, None) => "not mitigated by the end of the run".into(),
                    };
                    (det, mit, note)
                }
                None => (None, None, String::new()),
            };
            out.push(EventResult {
                index: ev.index,
                at_s: secs(ev.at_ms - t0),
                kind: ev.kind.clone(),
                label: ev.label.clone(),
                failure: ev.action.is_failure() && track.is_some(),
                detected_after_s: det,
                mitigated_after_s: mit,
                note,
            });
        }
        out
    }
}

/// The heatmap's level: sites, or metros or regions when there are many.
fn heat_level(fleet: &Fleet) -> String {
    for level in ["site", "metro", "region"] {
        let mut names: Vec<String> = fleet
            .edges
            .values()
            .map(|e| level_of(&e.site, level))
            .collect();
        names.sort();
        names.dedup();
        if names.len() <= HEAT_ROWS {
            return level.to_owned();
        }
    }
    "region".to_owned()
}

fn level_of(site: &DomainPath, level: &str) -> String {
    site.ancestors()
        .find(|d| d.kind().as_str() == level)
        .unwrap_or_else(|| site.clone())
        .to_string()
}
