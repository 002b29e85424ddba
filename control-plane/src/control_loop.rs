//! The control loop: the one owner of change (DESIGN.md, "The control loop").
//!
//! Operator intents arrive as [`Command`]s on a channel. For each, the loop
//! takes the current state and the time, asks the pure decision code in
//! `sextant-core` for the next routing table, commits the state change, the
//! table and the audit record in one store transaction, and only then
//! publishes the new [`Snapshot`] to readers (gRPC services, and later the
//! config stream). Nothing else writes routing. Reads never go through the
//! loop: they use the latest published snapshot.

use std::sync::Arc;

use sextant_core::automation::{Automation, FailoverView, Reported};
use sextant_core::diff::{self, RowChange, Shift};
use sextant_core::drain::{Drain, DrainError};
use sextant_core::drill::{Drill, DrillAction, DrillState};
use sextant_core::failover::Bounds;
use sextant_core::fleet::FleetError;
use sextant_core::health::HealthConfig;
use sextant_core::impact::Impact;
use sextant_core::operate;
use sextant_core::routing::{Routing, RoutingMeta, RoutingTable};
use sextant_core::schedule::ScheduleError;
use sextant_core::signals::Signals;
use sextant_core::solver::{solve, SolveInput};
use sextant_core::{DomainPath, DrainSet, Fleet, FleetSpec};
use sextant_store::Store;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn, Instrument};

use crate::audit::AuditRecord;
use crate::inbox::Reports;
use crate::state::{self, Commit, LoadedRib, RibMeta, State, StateError};
use crate::workflow::{self, DrainRequest, DrillRequest, WorkflowConfig};

/// A source of time for the loop. Decision code never reads a clock; the
/// loop reads this one and passes the time in.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }
}

/// What readers see: the state as last committed.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub fleet: Option<Arc<Fleet>>,
    pub fleet_generation: u64,
    pub drains: DrainSet,
    /// Every drill, running or past.
    pub drills: Arc<std::collections::BTreeMap<String, Drill>>,
    pub signals: Signals,
    /// Automated failover: held edges (alarms) and counters.
    pub failover: Arc<FailoverView>,
    pub table: Option<Arc<RoutingTable>>,
    /// The prefix → origin ASN map from the last loaded BGP RIB dump.
    pub rib: Option<LoadedRib>,
    /// False only for the placeholder a replica holds before its first
    /// read of the store.
    pub loaded: bool,
}

impl Snapshot {
    /// A snapshot of committed state, as a follower sees it.
    pub fn from_state(state: &State) -> Self {
        Self::of(state, &Signals::default(), Arc::default())
    }

    fn of(state: &State, signals: &Signals, failover: Arc<FailoverView>) -> Self {
        Self {
            fleet: state.fleet.clone(),
            fleet_generation: state.fleet_generation,
            drains: state.drains.clone(),
            drills: Arc::new(state.drills.clone()),
            signals: signals.clone(),
            failover,
            table: state.table.clone(),
            rib: state.rib.clone(),
            loaded: true,
        }
    }

    pub fn version(&self) -> u64 {
        self.table.as_ref().map_or(0, |t| t.meta.version.0)
    }

    /// The routing that `fleet` and `drains` would produce now, starting
    /// from this snapshot's table, and how it differs from it.
    pub fn preview(&self, fleet: &Fleet, drains: &DrainSet, now_ms: i64) -> Preview {
        let routing = self.solve(fleet, drains, now_ms);
        self.preview_of(fleet, routing)
    }

    /// The routing that `fleet` and `drains` would produce now.
    pub fn solve(&self, fleet: &Fleet, drains: &DrainSet, now_ms: i64) -> Routing {
        crate::blocking::heavy(|| {
            solve(SolveInput {
                fleet,
                signals: &self.signals,
                drains,
                previous: self.table.as_ref().map(|t| &t.routing),
                now_ms,
            })
        })
    }

    /// How `routing` differs from this snapshot's table.
    pub fn preview_of(&self, fleet: &Fleet, routing: Routing) -> Preview {
        let empty = Routing::default();
        let before = self.table.as_ref().map_or(&empty, |t| &t.routing);
        Preview {
            changes: diff::row_changes(before, &routing),
            shifts: diff::shifts(fleet, before, &routing),
            churn: diff::moved_share(before, &routing),
            routing,
        }
    }
}

/// A routing computed but not committed, with its effect.
#[derive(Debug, Clone)]
pub struct Preview {
    pub routing: Routing,
    pub changes: Vec<RowChange>,
    pub shifts: Vec<Shift>,
    pub churn: f64,
}

/// Why an operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error(transparent)]
    InvalidFleet(#[from] FleetError),
    #[error(transparent)]
    Drain(#[from] DrainError),
    #[error("bad step schedule or expiry: {0}")]
    Schedule(#[from] ScheduleError),
    #[error("bad drill: {0}")]
    BadDrill(String),
    #[error("no fleet has been applied yet; apply one first (sextantctl apply -f FLEET)")]
    NoFleet,
    #[error("{0} is not drained")]
    NotDrained(String),
    #[error("{domain} is drained by drill {drill}: abort the drill instead (sextantctl drill abort {drill})")]
    OwnedByDrill { domain: String, drill: String },
    #[error("--force needs a reason (--force-reason TEXT), which the audit log records")]
    ForceNeedsReason,
    #[error("{what} refused by guardrails: {}{}", violations.join("; "), if *forceable { "; to override: --force --force-reason TEXT" } else { "" })]
    Refused {
        what: String,
        violations: Vec<String>,
        forceable: bool,
    },
    #[error("drill {id} refused: {reason} (recorded: sextantctl drill report {id})")]
    DrillRefused { id: String, reason: String },
    #[error("no drill {0}")]
    UnknownDrill(String),
    #[error("the stored fleet is at generation {actual}, not the expected {expected}; re-read and retry")]
    GenerationMismatch { expected: u64, actual: u64 },
    #[error("cannot commit the change: {0}")]
    State(#[from] StateError),
    #[error("the control loop has stopped")]
    Stopped,
}

/// Who asks and why.
#[derive(Debug, Clone, Default)]
pub struct Intent {
    pub actor: String,
    pub reason: String,
}

/// The result of an accepted change.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub version_before: u64,
    pub version_after: u64,
    pub fleet_generation: u64,
    /// False when the change was a no-op and nothing was written.
    pub changed: bool,
    pub changes: Vec<RowChange>,
    pub shifts: Vec<Shift>,
    /// The drain as stored, for drains.
    pub drain: Option<Drain>,
    /// What the change does at its target (drains).
    pub impact: Option<Impact>,
    /// The drill, for drill commands.
    pub drill: Option<Drill>,
    /// The RIB map now loaded, for RIB loads.
    pub rib: Option<RibMeta>,
}

type Reply = oneshot::Sender<Result<Outcome, OpError>>;

/// An operator intent for the loop.
#[derive(Debug)]
pub enum Command {
    ApplyFleet {
        spec: FleetSpec,
        expected_generation: Option<u64>,
        force: Option<String>,
        intent: Intent,
        reply: Reply,
    },
    Drain {
        req: DrainRequest,
        intent: Intent,
        reply: Reply,
    },
    Undrain {
        domain: String,
        immediate: bool,
        intent: Intent,
        reply: Reply,
    },
    StartDrill {
        req: DrillRequest,
        intent: Intent,
        reply: Reply,
    },
    AbortDrill {
        id: String,
        intent: Intent,
        reply: Reply,
    },
    LoadRib {
        rib: NewRib,
        intent: Intent,
        reply: Reply,
    },
    /// Stores a created or revoked token, with its audit record.
    PutToken {
        token: crate::auth::StoredToken,
        action: &'static str,
        intent: Intent,
        reply: Reply,
    },
}

/// A RIB map decoded from a dump, for [`LoopHandle::load_rib`].
#[derive(Debug)]
pub struct NewRib {
    pub map: Arc<sextant_bgp::rib::RibMap>,
    pub stats: sextant_bgp::rib::RibStats,
    /// Where the dump came from.
    pub source: String,
    /// The digest of the dump's bytes.
    pub dump_digest: String,
}

/// A handle to the running loop.
#[derive(Debug, Clone)]
pub struct LoopHandle {
    tx: mpsc::Sender<Command>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
}

impl LoopHandle {
    /// The latest published snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshots.borrow().clone()
    }

    /// A receiver that sees every new snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshots.clone()
    }

    /// Replaces the prefix → origin ASN map; the DNS view gets it with the
    /// next routing version.
    pub async fn load_rib(&self, rib: NewRib, intent: Intent) -> Result<Outcome, OpError> {
        self.call(|reply| Command::LoadRib { rib, intent, reply })
            .await
    }

    /// Stores a token (`action`: `token.create` or `token.revoke`) and its
    /// audit record; routing does not change.
    pub async fn put_token(
        &self,
        token: crate::auth::StoredToken,
        action: &'static str,
        intent: Intent,
    ) -> Result<Outcome, OpError> {
        self.call(|reply| Command::PutToken {
            token,
            action,
            intent,
            reply,
        })
        .await
    }

    async fn call(&self, make: impl FnOnce(Reply) -> Command) -> Result<Outcome, OpError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| OpError::Stopped)?;
        rx.await.map_err(|_| OpError::Stopped)?
    }

    pub async fn apply_fleet(
        &self,
        spec: FleetSpec,
        expected_generation: Option<u64>,
        intent: Intent,
    ) -> Result<Outcome, OpError> {
        self.apply_fleet_forced(spec, expected_generation, None, intent)
            .await
    }

    pub async fn apply_fleet_forced(
        &self,
        spec: FleetSpec,
        expected_generation: Option<u64>,
        force: Option<String>,
        intent: Intent,
    ) -> Result<Outcome, OpError> {
        self.call(|reply| Command::ApplyFleet {
            spec,
            expected_generation,
            force,
            intent,
            reply,
        })
        .await
    }

    pub async fn drain(&self, req: DrainRequest, intent: Intent) -> Result<Outcome, OpError> {
        self.call(|reply| Command::Drain { req, intent, reply })
            .await
    }

    pub async fn undrain(
        &self,
        domain: String,
        immediate: bool,
        intent: Intent,
    ) -> Result<Outcome, OpError> {
        self.call(|reply| Command::Undrain {
            domain,
            immediate,
            intent,
            reply,
        })
        .await
    }

    pub async fn start_drill(&self, req: DrillRequest, intent: Intent) -> Result<Outcome, OpError> {
        self.call(|reply| Command::StartDrill { req, intent, reply })
            .await
    }

    pub async fn abort_drill(&self, id: String, intent: Intent) -> Result<Outcome, OpError> {
        self.call(|reply| Command::AbortDrill { id, intent, reply })
            .await
    }
}

/// One audit record to write with a change.
#[derive(Debug, Clone)]
struct Audit {
    action: &'static str,
    target: String,
    actor: String,
    reason: String,
    details: Vec<String>,
}

impl Audit {
    fn new(
        action: &'static str,
        target: impl Into<String>,
        intent: &Intent,
        details: Vec<String>,
    ) -> Self {
        Self {
            action,
            target: target.into(),
            actor: intent.actor.clone(),
            reason: intent.reason.clone(),
            details,
        }
    }
}

/// A state change the loop is about to commit.
struct Change {
    fleet: Arc<Fleet>,
    new_fleet: Option<(FleetSpec, u64)>,
    drains: DrainSet,
    commit: Commit,
    audits: Vec<Audit>,
    /// The routing, when already computed (a plan's preview).
    preview: Option<Preview>,
    impact: Option<Impact>,
}

/// How soon to retry scheduled work that failed (store unavailable, ...).
const RETRY_MS: i64 = 2_000;

/// Settings of the control loop.
#[derive(Debug, Clone)]
pub struct LoopConfig {
    /// Time between the steps of a move held back by a policy's max_shift.
    pub shift_interval_ms: i64,
    pub workflow: WorkflowConfig,
    /// How verdicts are reached.
    pub health: HealthConfig,
    /// How much capacity automated failover may remove.
    pub bounds: Bounds,
    /// How often verdicts are re-evaluated without new signals (missed
    /// heartbeats, stale votes, damping decay).
    pub health_tick_ms: i64,
}

impl Default for LoopConfig {
    fn default() -> Self {
        Self {
            shift_interval_ms: 30_000,
            workflow: WorkflowConfig::default(),
            health: HealthConfig::default(),
            bounds: Bounds::default(),
            health_tick_ms: 500,
        }
    }
}

struct Loop {
    config: LoopConfig,
    /// When to take the next step of a shift-limited move.
    shift_due_ms: Option<i64>,
    /// When to retry scheduled work that failed.
    retry_at_ms: Option<i64>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    reports: Arc<Reports>,
    state: State,
    signals: Signals,
    health: Automation,
    /// When verdicts are next re-evaluated by timer.
    health_due_ms: Option<i64>,
    /// When scheduled work (drain steps, drills' looks) last ran: drills
    /// look again a tick later, however often other events wake the loop.
    scheduled_at_ms: i64,
    publish: watch::Sender<Arc<Snapshot>>,
}

/// Reads the committed state, brings its routing up to date if the decision
/// code now computes something else, and starts the loop.
pub async fn start(
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    reports: Arc<Reports>,
    config: LoopConfig,
) -> Result<(LoopHandle, tokio::task::JoinHandle<()>), StateError> {
    let state = state::load(store.as_ref()).await?;
    info!(
        routing_version = state.version.0,
        fleet_generation = state.fleet_generation,
        drains = state.drains.len(),
        drills = state.drills.len(),
        "state loaded"
    );
    let signals = Signals::default();
    let (publish, snapshots) =
        watch::channel(Arc::new(Snapshot::of(&state, &signals, Arc::default())));
    let health = Automation::new(config.health.clone(), config.bounds);
    let mut lp = Loop {
        health,
        health_due_ms: None,
        scheduled_at_ms: 0,
        config,
        shift_due_ms: None,
        retry_at_ms: None,
        store,
        clock,
        reports,
        state,
        signals,
        publish,
    };
    lp.refresh_at_start().await?;
    let (tx, rx) = mpsc::channel(64);
    let task = tokio::spawn(lp.run(rx).instrument(tracing::info_span!("control_loop")));
    Ok((LoopHandle { tx, snapshots }, task))
}

impl Loop {
    async fn refresh_at_start(&mut self) -> Result<(), StateError> {
        let Some(fleet) = self.state.fleet.clone() else {
            return Ok(());
        };
        let preview = self
            .snapshot()
            .preview(&fleet, &self.state.drains, self.clock.now_ms());
        if self.state.table.is_some() && preview.changes.is_empty() {
            return Ok(());
        }
        info!("stored routing is out of date; recomputing");
        let next = self.next_table(preview.routing, preview.churn, "start-up recompute");
        let commit = Commit {
            table: Some(next.clone()),
            ..Commit::default()
        };
        let rev = state::commit(self.store.as_ref(), &self.state, &commit).await?;
        self.adopt(next, rev);
        self.publish();
        Ok(())
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot::of(
            &self.state,
            &self.signals,
            Arc::new(self.health.view.clone()),
        )
    }

    fn publish(&self) {
        self.publish.send_replace(Arc::new(self.snapshot()));
    }

    fn next_table(&self, routing: Routing, churn: f64, cause: &str) -> RoutingTable {
        RoutingTable {
            meta: RoutingMeta {
                version: self.state.version.next(),
                computed_at_ms: self.clock.now_ms(),
                fleet_generation: self.state.fleet_generation,
                cause: cause.to_owned(),
                churn,
            },
            routing,
        }
    }

    fn adopt(&mut self, table: RoutingTable, rev: sextant_store::Revision) {
        // A move held back by max_shift continues after the step interval.
        self.shift_due_ms = table
            .routing
            .summary
            .pending_shift
            .then(|| self.clock.now_ms() + self.config.shift_interval_ms);
        self.state.version = table.meta.version;
        self.state.routing_rev = rev;
        self.state.table = Some(Arc::new(table));
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        loop {
            let wait = self.next_wakeup_ms().map(|at| {
                std::time::Duration::from_millis(
                    u64::try_from(at.saturating_sub(self.clock.now_ms())).unwrap_or(0),
                )
            });
            let reports = self.reports.clone();
            let cmd = tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(c) => c,
                    None => break,
                },
                () = reports.arrived() => {
                    let r = self.on_signals().await;
                    if let Err(e) = self.settle(r).await {
                        warn!(error = %e, "failover commit failed; will retry");
                        self.retry_at_ms = Some(self.clock.now_ms() + RETRY_MS);
                    }
                    continue;
                }
                _ = tokio::time::sleep(wait.unwrap_or(std::time::Duration::from_secs(3600))), if wait.is_some() => {
                    let r = self.on_timer().await;
                    if let Err(e) = self.settle(r).await {
                        warn!(error = %e, "scheduled work failed; will retry");
                        self.retry_at_ms = Some(self.clock.now_ms() + RETRY_MS);
                    }
                    continue;
                }
            };
            self.handle(cmd).await;
        }
        info!("control loop stopped");
    }

    /// When the loop must act by itself next: a shift step, a drain step or
    /// expiry, a drill's look at the signals, a retry.
    fn next_wakeup_ms(&self) -> Option<i64> {
        let drains = self
            .state
            .drains
            .iter()
            .filter_map(|d| d.progress.as_ref().and_then(|p| p.next_due_ms()));
        let drills = self
            .state
            .drills
            .values()
            .any(|d| {
                d.state.active()
                    || d.ended_at_ms.is_none() && !matches!(d.state, DrillState::Refused { .. })
            })
            .then(|| self.scheduled_at_ms + self.config.workflow.drill_tick_ms);
        [
            self.shift_due_ms,
            self.retry_at_ms,
            drills,
            self.health_due_ms,
        ]
        .into_iter()
        .flatten()
        .chain(drains)
        .min()
    }

    /// Work the loop scheduled for itself.
    async fn on_timer(&mut self) -> Result<Outcome, OpError> {
        self.retry_at_ms = None;
        let now = self.clock.now_ms();
        if self.health_due_ms.is_some_and(|d| d <= now) {
            let out = self.on_signals().await?;
            if out.changed {
                return Ok(out);
            }
        }
        let out = self.scheduled(now).await?;
        if out.changed {
            return Ok(out);
        }
        match self.shift_due_ms {
            Some(due) if due <= now => {
                self.shift_due_ms = None;
                self.reconcile(
                    "routing.shift_step",
                    "the next step of a shift-limited move",
                )
                .await
            }
            _ => Ok(out),
        }
    }

    /// Drain steps and expiries that are due, and drills' looks at the
    /// signals, in one commit.
    async fn scheduled(&mut self, now: i64) -> Result<Outcome, OpError> {
        self.scheduled_at_ms = now;
        let Some(fleet) = self.state.fleet.clone() else {
            return Ok(self.unchanged());
        };
        let snap = self.snapshot();
        let samples =
            workflow::samples(&self.reports, now, self.config.workflow.report_freshness_ms);
        let empty = Routing::default();
        let routing = snap.table.as_ref().map_or(&empty, |t| &t.routing);
        let observe = |d: &DomainPath| operate::observe(&fleet, routing, &samples, d);
        let adv = operate::advance(&self.state.drains, &self.state.drills, &observe, now);
        // Watchers and peaks live in memory between looks.
        for d in &adv.ticked {
            self.state.drills.insert(d.id.clone(), d.clone());
        }
        if adv.is_empty() {
            return Ok(self.unchanged());
        }
        let audits: Vec<Audit> = adv
            .lines
            .iter()
            .map(|l| {
                if l.action == "drill.abort" {
                    warn!(drill = %l.target, reason = %l.reason, "drill aborted");
                }
                Audit::new(
                    l.action,
                    l.target.clone(),
                    &Intent {
                        actor: "sextant-cp".into(),
                        reason: l.reason.clone(),
                    },
                    l.details.clone(),
                )
            })
            .collect();
        let commit = Commit {
            put_drains: adv.put_drains,
            delete_drains: adv.delete_drains,
            put_drills: adv.put_drills.clone(),
            ..Commit::default()
        };
        let out = if adv.routing_moves || !audits.is_empty() {
            let change = Change {
                fleet,
                new_fleet: None,
                drains: adv.drains,
                commit,
                audits,
                preview: None,
                impact: None,
            };
            self.change(change).await?
        } else {
            let rev = state::commit(self.store.as_ref(), &self.state, &commit).await?;
            self.state.routing_rev = rev;
            self.unchanged()
        };
        for d in adv.put_drills {
            self.state.drills.insert(d.id.clone(), d);
        }
        self.publish();
        Ok(out)
    }

    /// Re-solves with the current state and commits if the routing moves.
    /// Takes in queued health observations, re-evaluates verdicts, and
    /// fails over (or back) when they change what routing may use.
    async fn on_signals(&mut self) -> Result<Outcome, OpError> {
        let obs = self.reports.take();
        let now = self.clock.now_ms();
        let Some(fleet) = self.state.fleet.clone() else {
            return Ok(self.unchanged());
        };
        let fresh = self.health.config().stale_after_ms;
        let reported: std::collections::BTreeMap<_, _> = self
            .reports
            .fresh(now - fresh)
            .into_iter()
            .map(|(id, r)| {
                (
                    sextant_core::EdgeId::from(id.as_str()),
                    Reported {
                        capacity_rps: Some(r.report.capacity_rps),
                        load_rps: Some(r.report.rps),
                    },
                )
            })
            .collect();
        let decision = self
            .health
            .step(&fleet, &reported, obs, now, &crate::timefmt::rfc3339);
        self.health_due_ms = self
            .health
            .active()
            .then(|| now + self.config.health_tick_ms);
        for t in &decision.transitions {
            info!(edge = %t.edge, from = t.from.as_str(), to = t.to.as_str(), reason = %t.verdict.reason, "health verdict changed");
        }
        let shown = decision.signals != self.signals;
        self.signals = decision.signals;
        if !decision.routing {
            if shown {
                self.publish();
            }
            return Ok(self.unchanged());
        }
        let audits = if decision.audits.is_empty() {
            vec![Audit::new(
                "capacity.update",
                String::new(),
                &Intent {
                    actor: "sextant-cp".into(),
                    reason: "edges report a different capacity".into(),
                },
                vec![],
            )]
        } else {
            decision
                .audits
                .into_iter()
                .map(|a| {
                    Audit::new(
                        a.action,
                        a.target,
                        &Intent {
                            actor: "sextant-cp".into(),
                            reason: a.reason,
                        },
                        a.details,
                    )
                })
                .collect()
        };
        for a in &audits {
            if a.action == "failover.held" {
                warn!(edge = %a.target, reason = %a.reason, "automated failover held at its bound");
            }
        }
        let change = Change {
            fleet,
            new_fleet: None,
            drains: self.state.drains.clone(),
            commit: Commit::default(),
            audits,
            preview: None,
            impact: None,
        };
        let out = self.change(change).await?;
        self.health.committed();
        // Publish again so readers see the counters of the commit.
        self.publish();
        Ok(out)
    }

    async fn reconcile(&mut self, action: &'static str, why: &str) -> Result<Outcome, OpError> {
        let Some(fleet) = self.state.fleet.clone() else {
            return Ok(self.unchanged());
        };
        let preview = self
            .snapshot()
            .preview(&fleet, &self.state.drains, self.clock.now_ms());
        if preview.changes.is_empty() {
            self.shift_due_ms = None;
            return Ok(self.unchanged());
        }
        let intent = Intent {
            actor: "sextant-cp".into(),
            reason: why.into(),
        };
        let change = Change {
            fleet,
            new_fleet: None,
            drains: self.state.drains.clone(),
            commit: Commit::default(),
            audits: vec![Audit::new(action, String::new(), &intent, vec![])],
            preview: Some(preview),
            impact: None,
        };
        self.change(change).await
    }

    fn unchanged(&self) -> Outcome {
        let v = self.state.version.0;
        Outcome {
            version_before: v,
            version_after: v,
            fleet_generation: self.state.fleet_generation,
            ..Outcome::default()
        }
    }

    async fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::ApplyFleet {
                spec,
                expected_generation,
                force,
                intent,
                reply,
            } => {
                let r = self
                    .apply_fleet(spec, expected_generation, force, intent)
                    .await;
                let _ = reply.send(self.settle(r).await);
            }
            Command::Drain { req, intent, reply } => {
                let r = self.drain(req, intent).await;
                let _ = reply.send(self.settle(r).await);
            }
            Command::Undrain {
                domain,
                immediate,
                intent,
                reply,
            } => {
                let r = self.undrain(&domain, immediate, intent).await;
                let _ = reply.send(self.settle(r).await);
            }
            Command::StartDrill { req, intent, reply } => {
                let r = self.start_drill(req, intent).await;
                let _ = reply.send(self.settle(r).await);
            }
            Command::AbortDrill { id, intent, reply } => {
                let r = self.abort_drill(&id, intent).await;
                let _ = reply.send(self.settle(r).await);
            }
            Command::LoadRib { rib, intent, reply } => {
                let r = self.load_rib(rib, intent).await;
                let _ = reply.send(self.settle(r).await);
            }
            Command::PutToken {
                token,
                action,
                intent,
                reply,
            } => {
                let r = self.put_token(token, action, intent).await;
                let _ = reply.send(self.settle(r).await);
            }
        }
    }

    /// After a failed commit, re-read the store so that the loop's view is
    /// what is committed, not what it hoped to commit.
    async fn settle(&mut self, r: Result<Outcome, OpError>) -> Result<Outcome, OpError> {
        if let Err(OpError::State(e)) = &r {
            warn!(error = %e, "commit failed; reloading state from the store");
            match state::load(self.store.as_ref()).await {
                Ok(s) => {
                    self.state = s;
                    self.publish();
                }
                Err(e) => warn!(error = %e, "reload failed"),
            }
        }
        r
    }

    /// Commits a new fleet and/or drains with the routing they produce, and
    /// their audit records.
    async fn change(&mut self, change: Change) -> Result<Outcome, OpError> {
        let Change {
            fleet,
            new_fleet,
            drains,
            mut commit,
            audits,
            preview,
            impact,
        } = change;
        let now = self.clock.now_ms();
        let snapshot = self.snapshot();
        let preview = preview.unwrap_or_else(|| snapshot.preview(&fleet, &drains, now));
        let before = self.state.version.0;
        if let Some((_, generation)) = &new_fleet {
            self.state.fleet_generation = *generation;
        }
        let cause = audits
            .first()
            .map(|a| format!("{} {}", a.action, a.target).trim().to_owned())
            .unwrap_or_default();
        let table = self.next_table(preview.routing, preview.churn, &cause);
        let after = table.meta.version.0;
        let (records, seq) = self.audit_records(audits, now, before, after);
        commit.fleet = new_fleet;
        commit.table = Some(table.clone());
        commit.audit = records;
        let result = state::commit(self.store.as_ref(), &self.state, &commit).await;
        let rev = match result {
            Ok(rev) => rev,
            Err(e) => {
                self.state.fleet_generation = snapshot.fleet_generation;
                return Err(e.into());
            }
        };
        self.state.fleet = Some(fleet);
        self.state.drains = drains;
        self.state.audit_seq = seq;
        for d in &commit.put_drills {
            self.state.drills.insert(d.id.clone(), d.clone());
        }
        if let Some(rib) = &commit.rib {
            self.state.rib = Some(rib.clone());
        }
        self.adopt(table, rev);
        self.publish();
        info!(cause = %cause, version = after, churn = preview.churn, "routing committed");
        Ok(Outcome {
            version_before: before,
            version_after: after,
            fleet_generation: self.state.fleet_generation,
            changed: true,
            changes: preview.changes,
            shifts: preview.shifts,
            drain: commit.put_drains.into_iter().next(),
            impact,
            drill: commit.put_drills.into_iter().next(),
            rib: commit.rib.map(|r| r.meta),
        })
    }

    /// The records of `audits`, numbered after the state's last one, and
    /// the last number.
    fn audit_records(
        &self,
        audits: Vec<Audit>,
        now: i64,
        before: u64,
        after: u64,
    ) -> (Vec<AuditRecord>, u64) {
        let mut seq = self.state.audit_seq;
        let records = audits
            .into_iter()
            .map(|a| {
                seq += 1;
                AuditRecord {
                    seq,
                    at_ms: now,
                    actor: a.actor,
                    action: a.action.to_owned(),
                    target: a.target,
                    reason: a.reason,
                    routing_version_before: before,
                    routing_version_after: after,
                    details: a.details,
                }
            })
            .collect();
        (records, seq)
    }

    async fn put_token(
        &mut self,
        token: crate::auth::StoredToken,
        action: &'static str,
        intent: Intent,
    ) -> Result<Outcome, OpError> {
        let v = self.state.version.0;
        let details = vec![
            format!("name={}", token.name),
            format!("role={}", token.role.as_str()),
            format!("scopes={}", token.scopes.join(",")),
            format!("expires_at_ms={}", token.expires_at_ms),
        ];
        let audit = Audit::new(action, format!("token/{}", token.id), &intent, details);
        let (audit, seq) = self.audit_records(vec![audit], self.clock.now_ms(), v, v);
        let commit = Commit {
            put_tokens: vec![token],
            audit,
            ..Commit::default()
        };
        state::commit(self.store.as_ref(), &self.state, &commit).await?;
        self.state.audit_seq = seq;
        Ok(Outcome {
            changed: true,
            ..self.unchanged()
        })
    }

    async fn load_rib(&mut self, rib: NewRib, intent: Intent) -> Result<Outcome, OpError> {
        let fleet = self.state.fleet.clone().ok_or(OpError::NoFleet)?;
        let digest = crate::blocking::heavy(|| rib.map.digest());
        if let Some(current) = &self.state.rib {
            if current.meta.digest == digest {
                return Ok(Outcome {
                    rib: Some(current.meta.clone()),
                    ..self.unchanged()
                });
            }
        }
        let generation = self.state.rib.as_ref().map_or(0, |r| r.meta.generation) + 1;
        let s = &rib.stats;
        let meta = RibMeta {
            generation,
            source: rib.source.clone(),
            loaded_at_ms: self.clock.now_ms(),
            loaded_by: intent.actor.clone(),
            entries: s.entries,
            skipped: s.skipped,
            multi_origin: s.multi_origin,
            other_records: s.other_records,
            digest: digest.clone(),
            dump_digest: rib.dump_digest.clone(),
        };
        let details = vec![
            format!("source={}", rib.source),
            format!("ipv4_prefixes={}", rib.map.v4_len()),
            format!("ipv6_prefixes={}", rib.map.v6_len()),
            format!("origin_asns={}", rib.map.origins()),
            format!("digest={digest}"),
        ];
        let commit = Commit {
            rib: Some(LoadedRib { meta, map: rib.map }),
            ..Commit::default()
        };
        let change = Change {
            fleet,
            new_fleet: None,
            drains: self.state.drains.clone(),
            commit,
            audits: vec![Audit::new(
                "bgp.load-rib",
                format!("generation {generation}"),
                &intent,
                details,
            )],
            preview: None,
            impact: None,
        };
        self.change(change).await
    }

    async fn apply_fleet(
        &mut self,
        spec: FleetSpec,
        expected: Option<u64>,
        force: Option<String>,
        intent: Intent,
    ) -> Result<Outcome, OpError> {
        if let Some(expected) = expected {
            if expected != self.state.fleet_generation {
                return Err(OpError::GenerationMismatch {
                    expected,
                    actual: self.state.fleet_generation,
                });
            }
        }
        if matches!(&force, Some(r) if r.trim().is_empty()) {
            return Err(OpError::ForceNeedsReason);
        }
        let fleet = crate::blocking::heavy(|| Fleet::from_spec(spec.clone()))?;
        if self.state.fleet.as_ref().is_some_and(|f| f.spec() == &spec) {
            return Ok(self.unchanged());
        }
        let now = self.clock.now_ms();
        let preview = self.snapshot().preview(&fleet, &self.state.drains, now);
        // The blast-radius brake: a new fleet takes effect in one step.
        let limits = &self.config.workflow.limits;
        if let Some(table) = &self.state.table {
            let moved = diff::moved_share(&table.routing, &preview.routing);
            if moved > limits.max_move_share + 1e-9 && force.is_none() {
                return Err(OpError::Refused {
                    what: "fleet apply".into(),
                    violations: vec![sextant_core::impact::Violation::BlastRadius {
                        moved_share: moved,
                        max: limits.max_move_share,
                    }
                    .to_string()
                    .replace(
                        "use steps (--steps) or --force",
                        "apply it in smaller changes or force it",
                    )],
                    forceable: true,
                });
            }
        }
        let generation = self.state.fleet_generation + 1;
        let mut details = vec![
            format!("generation={generation}"),
            format!("edges={}", fleet.edges.len()),
            format!("groups={}", fleet.groups.len()),
            format!("services={}", fleet.services.len()),
        ];
        if let Some(f) = &force {
            details.push(format!("forced={f}"));
        }
        let audits = vec![Audit::new(
            "fleet.apply",
            format!("generation {generation}"),
            &intent,
            details,
        )];
        let change = Change {
            fleet: Arc::new(fleet),
            new_fleet: Some((spec, generation)),
            drains: self.state.drains.clone(),
            commit: Commit::default(),
            audits,
            preview: Some(preview),
            impact: None,
        };
        self.change(change).await
    }

    async fn drain(&mut self, req: DrainRequest, intent: Intent) -> Result<Outcome, OpError> {
        let fleet = self.state.fleet.clone().ok_or(OpError::NoFleet)?;
        let now = self.clock.now_ms();
        let plan =
            workflow::plan_drain(&self.snapshot(), &req, &intent, &self.config.workflow, now)?;
        workflow::admit(&plan)?;
        let d = &plan.drain;
        let mut details = vec![
            format!("fraction={}", d.fraction),
            format!("target={}", d.target()),
        ];
        if let Some(p) = &d.progress {
            if p.schedule.steps.len() > 1 {
                details.push(format!("steps={:?}", p.schedule.steps));
                details.push(format!("interval_ms={}", p.schedule.interval_ms));
            }
            if let Some(exp) = p.expires_at_ms {
                details.push(format!("expires_at_ms={exp}"));
            }
        }
        if let Some(f) = &d.forced {
            details.push(format!("forced={f}"));
            if !plan.violations.is_empty() {
                details.push(format!(
                    "overrode={}",
                    plan.violations
                        .iter()
                        .map(|v| v.to_string())
                        .collect::<Vec<_>>()
                        .join("; ")
                ));
            }
        }
        if let Some(p) = self.state.drains.get(&d.domain) {
            details.push(format!("replaces_fraction={}", p.fraction));
        }
        let audits = vec![Audit::new("drain", d.domain.to_string(), &intent, details)];
        let change = Change {
            fleet,
            new_fleet: None,
            drains: plan.drains_first,
            commit: Commit {
                put_drains: vec![plan.drain],
                ..Commit::default()
            },
            audits,
            preview: Some(plan.first),
            impact: Some(plan.impact),
        };
        self.change(change).await
    }

    async fn undrain(
        &mut self,
        domain: &str,
        immediate: bool,
        intent: Intent,
    ) -> Result<Outcome, OpError> {
        let fleet = self.state.fleet.clone().ok_or(OpError::NoFleet)?;
        let now = self.clock.now_ms();
        let (drains, stepping) =
            workflow::plan_undrain(&self.snapshot(), domain, immediate, None, now)?;
        let path = DomainPath::parse(domain).map_err(DrainError::from)?;
        let was = self.state.drains.get(&path).map_or(0.0, |d| d.fraction);
        let mut details = vec![format!("was_fraction={was}")];
        let commit = match &stepping {
            Some(d) => {
                details.push(format!("stepping_down_to={}", d.fraction));
                Commit {
                    put_drains: vec![d.clone()],
                    ..Commit::default()
                }
            }
            None => Commit {
                delete_drains: vec![path.clone()],
                ..Commit::default()
            },
        };
        let audits = vec![Audit::new("undrain", path.to_string(), &intent, details)];
        let change = Change {
            fleet,
            new_fleet: None,
            drains,
            commit,
            audits,
            preview: None,
            impact: None,
        };
        self.change(change).await
    }

    fn next_drill_id(&self) -> String {
        let n = self
            .state
            .drills
            .keys()
            .filter_map(|k| k.strip_prefix("drill-").and_then(|n| n.parse::<u64>().ok()))
            .max()
            .unwrap_or(0);
        format!("drill-{}", n + 1)
    }

    async fn start_drill(&mut self, req: DrillRequest, intent: Intent) -> Result<Outcome, OpError> {
        let fleet = self.state.fleet.clone().ok_or(OpError::NoFleet)?;
        let now = self.clock.now_ms();
        let id = self.next_drill_id();
        let (mut drill, plan) = workflow::plan_drill(
            &self.snapshot(),
            &req,
            &intent,
            &self.config.workflow,
            id.clone(),
            now,
        )?;
        match plan {
            Err(reason) => {
                // Refused drills are recorded too: their report says why.
                drill.state = DrillState::Refused {
                    reason: reason.clone(),
                };
                drill.ended_at_ms = Some(now);
                drill.log(now, format!("refused: {reason}"));
                let commit = Commit {
                    put_drills: vec![drill.clone()],
                    ..Commit::default()
                };
                let audits = vec![Audit::new(
                    "drill.refused",
                    id.clone(),
                    &intent,
                    vec![format!("domain={}", drill.domain), format!("why={reason}")],
                )];
                let change = Change {
                    fleet,
                    new_fleet: None,
                    drains: self.state.drains.clone(),
                    commit,
                    audits,
                    preview: None,
                    impact: None,
                };
                self.change(change).await?;
                Err(OpError::DrillRefused { id, reason })
            }
            Ok(plan) => {
                let details = vec![
                    format!("domain={}", drill.domain),
                    format!("duration_ms={}", drill.duration_ms),
                    format!(
                        "abort_if={}",
                        drill
                            .conditions
                            .iter()
                            .map(|c| c.to_string())
                            .collect::<Vec<_>>()
                            .join(" | ")
                    ),
                ];
                let audits = vec![Audit::new("drill.start", id, &intent, details)];
                let change = Change {
                    fleet,
                    new_fleet: None,
                    drains: plan.drains_first,
                    commit: Commit {
                        put_drains: vec![plan.drain],
                        put_drills: vec![drill],
                        ..Commit::default()
                    },
                    audits,
                    preview: Some(plan.first),
                    impact: Some(plan.impact),
                };
                self.change(change).await
            }
        }
    }

    async fn abort_drill(&mut self, id: &str, intent: Intent) -> Result<Outcome, OpError> {
        let fleet = self.state.fleet.clone().ok_or(OpError::NoFleet)?;
        let mut drill = self
            .state
            .drills
            .get(id)
            .cloned()
            .ok_or_else(|| OpError::UnknownDrill(id.to_owned()))?;
        let now = self.clock.now_ms();
        let reason = format!("aborted by {}: {}", intent.actor, intent.reason);
        if matches!(drill.abort(reason, now), DrillAction::Nothing) {
            return Ok(Outcome {
                drill: Some(drill),
                ..self.unchanged()
            });
        }
        let mut drains = self.state.drains.clone();
        let mut commit = Commit {
            put_drills: vec![drill.clone()],
            ..Commit::default()
        };
        if drains
            .get(&drill.domain)
            .is_some_and(|d| d.drill.as_deref() == Some(id))
        {
            drains.remove(&drill.domain);
            commit.delete_drains.push(drill.domain.clone());
        }
        let audits = vec![Audit::new("drill.abort", id.to_owned(), &intent, vec![])];
        let change = Change {
            fleet,
            new_fleet: None,
            drains,
            commit,
            audits,
            preview: None,
            impact: None,
        };
        self.change(change).await
    }
}
