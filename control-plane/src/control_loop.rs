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

use sextant_core::diff::{self, RowChange, Shift};
use sextant_core::drain::{Drain, DrainError};
use sextant_core::fleet::FleetError;
use sextant_core::routing::{Routing, RoutingMeta, RoutingTable};
use sextant_core::signals::Signals;
use sextant_core::solver::{solve, SolveInput};
use sextant_core::{DomainPath, DrainSet, Fleet, FleetSpec};
use sextant_store::Store;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn, Instrument};

use crate::audit::AuditRecord;
use crate::state::{self, Commit, State, StateError};

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
    pub signals: Signals,
    pub table: Option<Arc<RoutingTable>>,
    /// False only for the placeholder a replica holds before its first
    /// read of the store.
    pub loaded: bool,
}

impl Snapshot {
    /// A snapshot of committed state, as a follower sees it.
    pub fn from_state(state: &State) -> Self {
        Self::of(state, &Signals::default())
    }

    fn of(state: &State, signals: &Signals) -> Self {
        Self {
            fleet: state.fleet.clone(),
            fleet_generation: state.fleet_generation,
            drains: state.drains.clone(),
            signals: signals.clone(),
            table: state.table.clone(),
            loaded: true,
        }
    }

    pub fn version(&self) -> u64 {
        self.table.as_ref().map_or(0, |t| t.meta.version.0)
    }

    /// The routing that `fleet` and `drains` would produce now, starting
    /// from this snapshot's table, and how it differs from it.
    pub fn preview(&self, fleet: &Fleet, drains: &DrainSet, now_ms: i64) -> Preview {
        let empty = Routing::default();
        let before = self.table.as_ref().map_or(&empty, |t| &t.routing);
        let routing = solve(SolveInput {
            fleet,
            signals: &self.signals,
            drains,
            previous: self.table.as_ref().map(|t| &t.routing),
            now_ms,
        });
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
    #[error("no fleet has been applied yet; apply one first (sextantctl apply -f FLEET)")]
    NoFleet,
    #[error("{0} is not drained")]
    NotDrained(String),
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
#[derive(Debug, Clone)]
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
}

/// An operator intent for the loop.
#[derive(Debug)]
pub enum Command {
    ApplyFleet {
        spec: FleetSpec,
        expected_generation: Option<u64>,
        intent: Intent,
        reply: oneshot::Sender<Result<Outcome, OpError>>,
    },
    Drain {
        domain: String,
        fraction: f64,
        owner: String,
        intent: Intent,
        reply: oneshot::Sender<Result<Outcome, OpError>>,
    },
    Undrain {
        domain: String,
        intent: Intent,
        reply: oneshot::Sender<Result<Outcome, OpError>>,
    },
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

    async fn call(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<Outcome, OpError>>) -> Command,
    ) -> Result<Outcome, OpError> {
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
        self.call(|reply| Command::ApplyFleet {
            spec,
            expected_generation,
            intent,
            reply,
        })
        .await
    }

    pub async fn drain(
        &self,
        domain: String,
        fraction: f64,
        owner: String,
        intent: Intent,
    ) -> Result<Outcome, OpError> {
        self.call(|reply| Command::Drain {
            domain,
            fraction,
            owner,
            intent,
            reply,
        })
        .await
    }

    pub async fn undrain(&self, domain: String, intent: Intent) -> Result<Outcome, OpError> {
        self.call(|reply| Command::Undrain {
            domain,
            intent,
            reply,
        })
        .await
    }
}

/// A state change the loop is about to commit.
struct Change {
    fleet: Arc<Fleet>,
    new_fleet: Option<(FleetSpec, u64)>,
    drains: DrainSet,
    commit: Commit,
    action: &'static str,
    target: String,
    details: Vec<String>,
}

/// How soon to retry scheduled work that failed (store unavailable, ...).
const RETRY_MS: i64 = 2_000;

/// Settings of the control loop.
#[derive(Debug, Clone, Copy)]
pub struct LoopConfig {
    /// Time between the steps of a move held back by a policy's max_shift.
    pub shift_interval_ms: i64,
}

impl Default for LoopConfig {
    fn default() -> Self {
        Self {
            shift_interval_ms: 30_000,
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
    state: State,
    signals: Signals,
    publish: watch::Sender<Arc<Snapshot>>,
}

/// Reads the committed state, brings its routing up to date if the decision
/// code now computes something else, and starts the loop.
pub async fn start(
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    config: LoopConfig,
) -> Result<(LoopHandle, tokio::task::JoinHandle<()>), StateError> {
    let state = state::load(store.as_ref()).await?;
    info!(
        routing_version = state.version.0,
        fleet_generation = state.fleet_generation,
        drains = state.drains.len(),
        "state loaded"
    );
    let signals = Signals::default();
    let (publish, snapshots) = watch::channel(Arc::new(Snapshot::of(&state, &signals)));
    let mut lp = Loop {
        config,
        shift_due_ms: None,
        retry_at_ms: None,
        store,
        clock,
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
        Snapshot::of(&self.state, &self.signals)
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
            let cmd = tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(c) => c,
                    None => break,
                },
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

    /// When the loop must act by itself next (a pending shift step, a retry).
    fn next_wakeup_ms(&self) -> Option<i64> {
        [self.shift_due_ms, self.retry_at_ms]
            .into_iter()
            .flatten()
            .min()
    }

    /// Work the loop scheduled for itself.
    async fn on_timer(&mut self) -> Result<Outcome, OpError> {
        self.retry_at_ms = None;
        let now = self.clock.now_ms();
        match self.shift_due_ms {
            Some(due) if due <= now => {
                self.shift_due_ms = None;
                self.reconcile(
                    "routing.shift_step",
                    "the next step of a shift-limited move",
                )
                .await
            }
            _ => Ok(self.unchanged()),
        }
    }

    /// Re-solves with the current state and commits if the routing moves.
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
        let change = Change {
            fleet,
            new_fleet: None,
            drains: self.state.drains.clone(),
            commit: Commit::default(),
            action,
            target: String::new(),
            details: vec![],
        };
        let intent = Intent {
            actor: "sextant-cp".into(),
            reason: why.into(),
        };
        self.change(change, intent).await
    }

    fn unchanged(&self) -> Outcome {
        let v = self.state.version.0;
        Outcome {
            version_before: v,
            version_after: v,
            fleet_generation: self.state.fleet_generation,
            changed: false,
            changes: vec![],
            shifts: vec![],
            drain: None,
        }
    }

    async fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::ApplyFleet {
                spec,
                expected_generation,
                intent,
                reply,
            } => {
                let r = self.apply_fleet(spec, expected_generation, intent).await;
                let _ = reply.send(self.settle(r).await);
            }
            Command::Drain {
                domain,
                fraction,
                owner,
                intent,
                reply,
            } => {
                let r = self.drain(&domain, fraction, owner, intent).await;
                let _ = reply.send(self.settle(r).await);
            }
            Command::Undrain {
                domain,
                intent,
                reply,
            } => {
                let r = self.undrain(&domain, intent).await;
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

    /// Commits a new fleet and/or drains with the routing they produce.
    async fn change(&mut self, change: Change, intent: Intent) -> Result<Outcome, OpError> {
        let Change {
            fleet,
            new_fleet,
            drains,
            mut commit,
            action,
            target,
            details,
        } = change;
        let now = self.clock.now_ms();
        let snapshot = self.snapshot();
        let preview = snapshot.preview(&fleet, &drains, now);
        let before = self.state.version.0;
        if let Some((_, generation)) = &new_fleet {
            self.state.fleet_generation = *generation;
        }
        let table = self.next_table(
            preview.routing,
            preview.churn,
            &format!("{action} {target}"),
        );
        let after = table.meta.version.0;
        let record = AuditRecord {
            seq: self.state.audit_seq + 1,
            at_ms: now,
            actor: intent.actor,
            action: action.to_owned(),
            target,
            reason: intent.reason,
            routing_version_before: before,
            routing_version_after: after,
            details,
        };
        commit.fleet = new_fleet;
        commit.table = Some(table.clone());
        commit.audit = vec![record];
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
        self.state.audit_seq += 1;
        self.adopt(table, rev);
        self.publish();
        info!(
            action,
            version = after,
            churn = preview.churn,
            "routing committed"
        );
        Ok(Outcome {
            version_before: before,
            version_after: after,
            fleet_generation: self.state.fleet_generation,
            changed: true,
            changes: preview.changes,
            shifts: preview.shifts,
            drain: commit.put_drains.into_iter().next(),
        })
    }

    async fn apply_fleet(
        &mut self,
        spec: FleetSpec,
        expected: Option<u64>,
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
        let fleet = Fleet::from_spec(spec.clone())?;
        if self.state.fleet.as_ref().is_some_and(|f| f.spec() == &spec) {
            let v = self.state.version.0;
            return Ok(Outcome {
                version_before: v,
                version_after: v,
                fleet_generation: self.state.fleet_generation,
                changed: false,
                changes: vec![],
                shifts: vec![],
                drain: None,
            });
        }
        let generation = self.state.fleet_generation + 1;
        let details = vec![
            format!("generation={generation}"),
            format!("edges={}", fleet.edges.len()),
            format!("groups={}", fleet.groups.len()),
            format!("services={}", fleet.services.len()),
        ];
        let drains = self.state.drains.clone();
        let change = Change {
            fleet: Arc::new(fleet),
            new_fleet: Some((spec, generation)),
            drains,
            commit: Commit::default(),
            action: "fleet.apply",
            target: format!("generation {generation}"),
            details,
        };
        self.change(change, intent).await
    }

    async fn drain(
        &mut self,
        domain: &str,
        fraction: f64,
        owner: String,
        intent: Intent,
    ) -> Result<Outcome, OpError> {
        let fleet = self.state.fleet.clone().ok_or(OpError::NoFleet)?;
        let path = Drain::check(&fleet, domain, fraction, &intent.reason)?;
        let drain = Drain {
            domain: path.clone(),
            fraction,
            reason: intent.reason.clone(),
            owner: if owner.is_empty() {
                intent.actor.clone()
            } else {
                owner
            },
            created_by: intent.actor.clone(),
            created_at_ms: self.clock.now_ms(),
        };
        let mut drains = self.state.drains.clone();
        let previous = drains.insert(drain.clone());
        let mut details = vec![format!("fraction={fraction}")];
        if let Some(p) = previous {
            details.push(format!("replaces_fraction={}", p.fraction));
        }
        let commit = Commit {
            put_drains: vec![drain],
            ..Commit::default()
        };
        let change = Change {
            fleet,
            new_fleet: None,
            drains,
            commit,
            action: "drain",
            target: path.to_string(),
            details,
        };
        self.change(change, intent).await
    }

    async fn undrain(&mut self, domain: &str, intent: Intent) -> Result<Outcome, OpError> {
        let fleet = self.state.fleet.clone().ok_or(OpError::NoFleet)?;
        let path = DomainPath::parse(domain).map_err(DrainError::from)?;
        let mut drains = self.state.drains.clone();
        let removed = drains
            .remove(&path)
            .ok_or_else(|| OpError::NotDrained(path.to_string()))?;
        let commit = Commit {
            delete_drains: vec![path.clone()],
            ..Commit::default()
        };
        let details = vec![format!("was_fraction={}", removed.fraction)];
        let change = Change {
            fleet,
            new_fleet: None,
            drains,
            commit,
            action: "undrain",
            target: path.to_string(),
            details,
        };
        self.change(change, intent).await
    }
}
