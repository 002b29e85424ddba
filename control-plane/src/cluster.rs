//! Replicas: one leader, any number of followers, on one store.
//!
//! Every replica campaigns for the leader key (`/sextant/v1/cluster/leader`,
//! written only if absent, attached to the replica's lease). The winner runs
//! the control loop — the only writer of routing — and keeps its lease
//! alive; if it cannot (it died, or lost the store for longer than the
//! lease TTL), the lease expires, the key disappears, and the others
//! campaign again. A new leader starts its loop from what the store holds,
//! so routing versions continue without a gap, and the commit's
//! compare-and-swap on the routing pointer stops a deposed leader that has
//! not noticed yet from writing anything.
//!
//! Followers follow the store: a watch on the routing pointer (every commit
//! moves it) reloads the state, so they serve reads and config streams from
//! the same snapshots as the leader, and keep serving the last one when the
//! store is unreachable. Writes sent to a follower are forwarded to the
//! leader (the gRPC layer does that, see [`Role`]).
//!
//! With the embedded store the same code runs, and the one replica is
//! always the leader.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sextant_store::{Compare, Store, StoreError, Txn, TxnOp};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn, Instrument};

use crate::control_loop::{self, Clock, LoopHandle, Snapshot};
use crate::state;

const LEADER: &str = "/sextant/v1/cluster/leader";
const REPLICAS: &str = "/sextant/v1/cluster/replicas/";
const ROUTING_CURRENT: &str = "/sextant/v1/routing/current";

/// What a replica says about itself in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaInfo {
    pub id: String,
    /// gRPC URL other replicas and clients reach it at.
    pub url: String,
    pub started_at_ms: i64,
    pub software: String,
}

/// Who writes, as this replica sees it.
#[derive(Debug, Clone)]
pub enum Role {
    /// This replica is the leader; writes go to its loop.
    Leader(LoopHandle),
    /// Another replica leads; writes are forwarded to it.
    Follower { leader: ReplicaInfo },
    /// No leader is known (an election is under way, or the store is
    /// unreachable): writes are refused.
    NoLeader { reason: String },
}

/// This replica's view of the cluster, shared by the gRPC services.
#[derive(Clone)]
pub struct Node {
    pub me: ReplicaInfo,
    pub store: Arc<dyn Store>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    role: watch::Receiver<Role>,
    /// TLS for calls to other replicas (this replica's certificate as the
    /// client identity); `None`: plaintext (`--insecure`).
    peer_tls: Option<sextant_tls::ClientTls>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Sets the TLS used to reach other replicas.
    pub fn with_peer_tls(mut self, tls: Option<sextant_tls::ClientTls>) -> Self {
        self.peer_tls = tls;
        self
    }

    /// An endpoint to another replica at `url` (TLS when this one has it).
    pub fn peer_endpoint(&self, url: &str) -> Result<tonic::transport::Endpoint, tonic::Status> {
        sextant_tls::control_plane_endpoint(url, self.peer_tls.as_ref())
            .map_err(|e| tonic::Status::internal(format!("cannot reach replica {url}: {e}")))
    }

    /// The latest snapshot (from the loop on the leader, from the store on a
    /// follower).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshots.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshots.clone()
    }

    pub fn role(&self) -> Role {
        self.role.borrow().clone()
    }

    pub fn roles(&self) -> watch::Receiver<Role> {
        self.role.clone()
    }

    /// Waits until the node holds the committed state (its first load).
    pub async fn loaded(&self) {
        let mut s = self.snapshots.clone();
        while !s.borrow_and_update().loaded {
            if s.changed().await.is_err() {
                return;
            }
        }
    }

    /// Replicas registered in the store (alive: their lease holds).
    pub async fn replicas(&self) -> Result<Vec<ReplicaInfo>, StoreError> {
        Ok(self
            .store
            .get_prefix(REPLICAS)
            .await?
            .kvs
            .into_iter()
            .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
            .collect())
    }
}

/// Election timing.
#[derive(Debug, Clone)]
pub struct ElectionConfig {
    /// Lease TTL: how long a dead leader keeps the key.
    pub lease_ttl: Duration,
    /// Settings of the loop the leader runs.
    pub loop_config: control_loop::LoopConfig,
}

impl Default for ElectionConfig {
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(3),
            loop_config: control_loop::LoopConfig::default(),
        }
    }
}

/// Starts the election and the snapshot source; returns the node.
pub fn start(
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    reports: Arc<crate::inbox::Reports>,
    me: ReplicaInfo,
    config: ElectionConfig,
) -> Node {
    let (snap_tx, snapshots) = watch::channel(Arc::new(Snapshot::default()));
    let (role_tx, role) = watch::channel(Role::NoLeader {
        reason: "election under way".into(),
    });
    let node = Node {
        me: me.clone(),
        store: store.clone(),
        snapshots,
        role,
        peer_tls: None,
    };
    let span = tracing::info_span!("cluster", replica = %me.id);
    tokio::spawn(run(store, clock, reports, me, config, snap_tx, role_tx).instrument(span));
    node
}

/// What feeds the node's snapshots now.
enum Source {
    Leader {
        handle: LoopHandle,
        relay: JoinHandle<()>,
        task: JoinHandle<()>,
    },
    Follower(JoinHandle<()>),
    None,
}

impl Source {
    async fn stop(self) {
        match self {
            Source::Leader {
                handle,
                relay,
                task,
            } => {
                relay.abort();
                drop(handle);
                // The loop ends when the last handle is gone; services may
                // hold clones for a moment, so do not wait forever.
                let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
            }
            Source::Follower(t) => t.abort(),
            Source::None => {}
        }
    }
}

fn encode(info: &ReplicaInfo) -> Vec<u8> {
    serde_json::to_vec(info).unwrap_or_default()
}

async fn run(
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    reports: Arc<crate::inbox::Reports>,
    me: ReplicaInfo,
    config: ElectionConfig,
    snap_tx: watch::Sender<Arc<Snapshot>>,
    role_tx: watch::Sender<Role>,
) {
    let snap_tx = Arc::new(snap_tx);
    let mut source = Source::Follower(tokio::spawn(follow(store.clone(), snap_tx.clone())));
    let mut backoff = Duration::from_millis(200);
    loop {
        let lease = match store.lease_grant(config.lease_ttl).await {
            Ok(l) => l,
            Err(e) => {
                role_tx.send_replace(Role::NoLeader {
                    reason: format!("cannot reach the store: {e}"),
                });
                if matches!(source, Source::Leader { .. }) {
                    std::mem::replace(&mut source, Source::None).stop().await;
                }
                if matches!(source, Source::None) {
                    source = Source::Follower(tokio::spawn(follow(store.clone(), snap_tx.clone())));
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(200);
        let campaign = Txn::new()
            .when([Compare::absent(LEADER)])
            .and_then([
                TxnOp::Put {
                    key: LEADER.to_owned(),
                    value: encode(&me),
                    lease: Some(lease.id),
                },
                TxnOp::Put {
                    key: format!("{REPLICAS}{}", me.id),
                    value: encode(&me),
                    lease: Some(lease.id),
                },
            ])
            .or_else([
                TxnOp::Get {
                    key: LEADER.to_owned(),
                },
                TxnOp::Put {
                    key: format!("{REPLICAS}{}", me.id),
                    value: encode(&me),
                    lease: Some(lease.id),
                },
            ]);
        let resp = match store.txn(campaign).await {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "campaign failed");
                let _ = store.lease_revoke(lease.id).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if resp.succeeded {
            info!("elected leader");
            std::mem::replace(&mut source, Source::None).stop().await;
            match control_loop::start(
                store.clone(),
                clock.clone(),
                reports.clone(),
                config.loop_config.clone(),
            )
            .await
            {
                Ok((handle, task)) => {
                    // Publish the loop's state before announcing the role, so
                    // that nothing reads a leader without its state.
                    snap_tx.send_replace(handle.snapshot());
                    let relay = tokio::spawn(relay(handle.subscribe(), snap_tx.clone()));
                    role_tx.send_replace(Role::Leader(handle.clone()));
                    source = Source::Leader {
                        handle,
                        relay,
                        task,
                    };
                    hold(store.as_ref(), lease.id, config.lease_ttl).await;
                    warn!("lost the leader lease; stepping down");
                    role_tx.send_replace(Role::NoLeader {
                        reason: "the leader stepped down".into(),
                    });
                    std::mem::replace(&mut source, Source::None).stop().await;
                    let _ = store.lease_revoke(lease.id).await;
                }
                Err(e) => {
                    warn!(error = %e, "cannot start the control loop; resigning");
                    let _ = store.lease_revoke(lease.id).await;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            source = Source::Follower(tokio::spawn(follow(store.clone(), snap_tx.clone())));
            continue;
        }
        // Someone else leads: follow until its key goes away.
        let current = resp.responses.first().and_then(|r| match r {
            sextant_store::OpResponse::Get { kvs } => kvs.first().and_then(|kv| {
                serde_json::from_slice::<ReplicaInfo>(&kv.value)
                    .ok()
                    .map(|info| (info, kv.lease))
            }),
            _ => None,
        });
        let Some((leader, leader_lease)) = current else {
            // The key vanished between compare and read: campaign again.
            let _ = store.lease_revoke(lease.id).await;
            continue;
        };
        if leader.id == me.id && leader.started_at_ms != me.started_at_ms {
            // A previous run of this very replica (ids are unique per
            // cluster) died holding the key: it cannot come back, so do not
            // wait for its lease to expire.
            info!("the leader key belongs to an earlier run of this replica; taking over");
            if let Some(old) = leader_lease {
                let _ = store.lease_revoke(old).await;
            }
            let _ = store.lease_revoke(lease.id).await;
            continue;
        }
        info!(leader = %leader.id, "following");
        role_tx.send_replace(Role::Follower {
            leader: leader.clone(),
        });
        if matches!(source, Source::None) {
            source = Source::Follower(tokio::spawn(follow(store.clone(), snap_tx.clone())));
        }
        wait_for_vacancy(store.as_ref(), lease.id, config.lease_ttl, resp.revision).await;
        let _ = store.lease_revoke(lease.id).await;
    }
}

/// Keeps the lease alive until it is lost (or cannot be renewed for a TTL).
async fn hold(store: &dyn Store, lease: sextant_store::LeaseId, ttl: Duration) {
    let mut last_ok = Instant::now();
    let every = ttl / 3;
    loop {
        tokio::time::sleep(every).await;
        match store.lease_keep_alive(lease).await {
            Ok(_) => last_ok = Instant::now(),
            Err(StoreError::LeaseNotFound(_)) => return,
            Err(e) => {
                warn!(error = %e, "lease keep-alive failed");
                // Step down before the lease can have expired elsewhere.
                if last_ok.elapsed() + every >= ttl {
                    return;
                }
            }
        }
    }
}

/// Keeps our lease (and replica entry) alive while waiting for the leader
/// key to be deleted.
async fn wait_for_vacancy(
    store: &dyn Store,
    lease: sextant_store::LeaseId,
    ttl: Duration,
    rev: i64,
) {
    let mut watch = match store.watch(LEADER, rev + 1).await {
        Ok(w) => w,
        Err(e) => {
            warn!(error = %e, "cannot watch the leader key");
            tokio::time::sleep(Duration::from_millis(500)).await;
            return;
        }
    };
    let mut tick = tokio::time::interval(ttl / 3);
    loop {
        tokio::select! {
            batch = watch.next() => match batch {
                Some(Ok(b)) => {
                    if b.events.iter().any(|e| e.kind == sextant_store::EventKind::Delete && e.kv.key == LEADER) {
                        info!("the leader is gone; campaigning");
                        return;
                    }
                }
                Some(Err(e)) => {
                    warn!(error = %e, "leader watch failed");
                    return;
                }
                None => return,
            },
            _ = tick.tick() => {
                if let Err(e) = store.lease_keep_alive(lease).await {
                    warn!(error = %e, "replica lease keep-alive failed");
                    if matches!(e, StoreError::LeaseNotFound(_)) {
                        return;
                    }
                }
            }
        }
    }
}

/// Forwards the loop's snapshots to the node.
async fn relay(mut from: watch::Receiver<Arc<Snapshot>>, to: Arc<watch::Sender<Arc<Snapshot>>>) {
    loop {
        let s = from.borrow_and_update().clone();
        to.send_replace(s);
        if from.changed().await.is_err() {
            return;
        }
    }
}

/// Follows the store: reloads the state whenever the routing pointer moves
/// (every commit moves it), and publishes it. Keeps the last snapshot while
/// the store is unreachable.
async fn follow(store: Arc<dyn Store>, to: Arc<watch::Sender<Arc<Snapshot>>>) {
    let mut backoff = Duration::from_millis(100);
    let mut held: Option<state::State> = None;
    loop {
        let rev = match store.status().await {
            Ok(s) => s.revision,
            Err(e) => {
                warn!(error = %e, "follower cannot reach the store; serving the last state");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        let mut watch = match store.watch(ROUTING_CURRENT, rev + 1).await {
            Ok(w) => w,
            Err(e) => {
                warn!(error = %e, "follower cannot watch the store");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        // Load after the watch is in place: nothing written in between is missed.
        match state::load_since(store.as_ref(), held.as_ref()).await {
            Ok(s) => {
                to.send_replace(Arc::new(Snapshot::from_state(&s)));
                held = Some(s);
                backoff = Duration::from_millis(100);
            }
            Err(e) => {
                warn!(error = %e, "follower cannot load the state");
                tokio::time::sleep(backoff).await;
                continue;
            }
        }
        loop {
            match watch.next().await {
                Some(Ok(_)) => match state::load_since(store.as_ref(), held.as_ref()).await {
                    Ok(s) => {
                        to.send_replace(Arc::new(Snapshot::from_state(&s)));
                        held = Some(s);
                    }
                    Err(e) => {
                        warn!(error = %e, "follower cannot load the state");
                        break;
                    }
                },
                Some(Err(e)) => {
                    warn!(error = %e, "follower watch ended");
                    break;
                }
                None => break,
            }
        }
        tokio::time::sleep(backoff).await;
    }
}
