//! `ClusterService`.

use std::sync::Arc;

use sextant_proto::v1 as pb;
use sextant_proto::v1::cluster_service_server::ClusterService;
use sextant_store::Store;
use tonic::{Request, Response, Status};

use crate::cluster::{Node, Role};
use crate::grpc::distribution::Distribution;

/// Serves the control plane's own status.
#[derive(Clone)]
pub struct ClusterApi {
    pub node: Node,
    pub store: Arc<dyn Store>,
    /// This replica's id and address.
    pub replica: String,
    pub address: String,
    pub started_at_ms: i64,
    pub distribution: Arc<Distribution>,
    /// A subscriber behind the current version for longer than this is stale.
    pub stale_after_ms: u64,
    /// `mtls+token` or `insecure`.
    pub auth_mode: &'static str,
}

/// Subscribers as `status` shows them; stale ones flagged.
pub fn subscribers(d: &Distribution, stale_after_ms: u64, now_ms: u64) -> Vec<pb::Subscriber> {
    let current = d.publisher.current().version;
    d.registry
        .statuses(current, d.publisher.published_at_ms(), now_ms)
        .into_iter()
        .map(|s| pb::Subscriber {
            stale: s.behind_since_ms > 0
                && now_ms.saturating_sub(s.behind_since_ms) > stale_after_ms,
            node_id: s.node_id,
            kind: s.kind,
            site: s.site,
            connected: s.connected,
            version_applied: s.version_applied,
            version_sent: s.version_sent,
            last_contact_unix_ms: i64::try_from(s.last_contact_ms).unwrap_or(0),
            last_nack_version: s.last_nack_version,
            last_nack_reason: s.last_nack_reason,
        })
        .collect()
}

impl std::fmt::Debug for ClusterApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterApi").finish_non_exhaustive()
    }
}

#[tonic::async_trait]
impl ClusterService for ClusterApi {
    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let snap = self.node.snapshot();
        let (store_kind, store_health, store_revision) = match self.store.status().await {
            Ok(s) => (
                s.kind.to_owned(),
                "ok".to_owned(),
                u64::try_from(s.revision).unwrap_or(0),
            ),
            Err(e) => ("unknown".to_owned(), e.to_string(), 0),
        };
        let mut alarms = Vec::new();
        if self.auth_mode == "insecure" {
            alarms.push(
                "insecure: plaintext gRPC without authentication (--insecure); anyone who reaches the port may drain"
                    .to_owned(),
            );
        }
        let now = u64::try_from(self.distribution.clock.now_ms()).unwrap_or(0);
        let subscribers = subscribers(&self.distribution, self.stale_after_ms, now);
        let stale = subscribers.iter().filter(|s| s.stale).count();
        if stale > 0 {
            alarms.push(format!(
                "{stale} subscribers hold an old config for more than {} s",
                self.stale_after_ms / 1000
            ));
        }
        if let Some(a) = self.distribution.alarm() {
            alarms.push(a);
        }
        if let Some(t) = &snap.table {
            let failed_open: Vec<String> = t
                .routing
                .rows()
                .filter(|(_, _, r)| r.failed_open)
                .map(|(s, g, _)| format!("{s}/{g}"))
                .collect();
            if !failed_open.is_empty() {
                let names = failed_open
                    .iter()
                    .take(10)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ");
                let more = failed_open.len().saturating_sub(10);
                alarms.push(format!(
                    "{} group rows failed open: every candidate edge looks down, so the signals are \
                     suspect and traffic is steered as if all were up ({names}{})",
                    failed_open.len(),
                    if more > 0 { format!(" and {more} more") } else { String::new() }
                ));
            }
            let unserved = t
                .routing
                .rows()
                .filter(|(_, _, r)| r.unserved > 0.0)
                .count();
            if unserved > 0 {
                alarms.push(format!("{unserved} group rows have unserved demand"));
            }
        }
        for h in &snap.failover.held {
            alarms.push(format!(
                "automated failover held: edge {} looks down but stays in the routing: {}; drain it or fix the signals",
                h.edge, h.why
            ));
        }
        let leader_id = match self.node.role() {
            Role::Leader(_) => Some(self.node.me.id.clone()),
            Role::Follower { leader } => Some(leader.id),
            Role::NoLeader { reason } => {
                alarms.push(format!("no leader: {reason}; writes are refused"));
                None
            }
        };
        let mut replicas: Vec<pb::Replica> = match self.node.replicas().await {
            Ok(rs) => rs
                .into_iter()
                .map(|r| pb::Replica {
                    leader: leader_id.as_deref() == Some(r.id.as_str()),
                    id: r.id,
                    address: r.url,
                    software: r.software,
                })
                .collect(),
            Err(_) => vec![],
        };
        if !replicas.iter().any(|r| r.id == self.node.me.id) {
            replicas.push(pb::Replica {
                id: self.node.me.id.clone(),
                address: self.node.me.url.clone(),
                leader: leader_id.as_deref() == Some(self.node.me.id.as_str()),
                software: self.node.me.software.clone(),
            });
        }
        replicas.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(Response::new(pb::StatusResponse {
            replica: self.replica.clone(),
            replicas,
            store_kind,
            store_health,
            store_revision,
            routing_version: snap.version(),
            fleet_generation: snap.fleet_generation,
            subscribers,
            active_drains: u32::try_from(snap.drains.len()).unwrap_or(u32::MAX),
            alarms,
            software: env!("CARGO_PKG_VERSION").to_owned(),
            started_at_unix_ms: self.started_at_ms,
            insecure: self.auth_mode == "insecure",
            auth_mode: self.auth_mode.to_owned(),
        }))
    }
}
