//! `OperationsService`: drains and the audit log. Drills and drain watches
//! arrive with the operator-workflow issue and answer UNIMPLEMENTED until
//! then.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use sextant_core::drain::Drain;
use sextant_core::DrainSet;
use sextant_proto::v1 as pb;
use sextant_proto::v1::operations_service_client::OperationsServiceClient;
use sextant_proto::v1::operations_service_server::OperationsService;
use sextant_store::Store;
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::cluster::Node;
use crate::control_loop::{Clock, OpError};
use crate::state;

/// Serves drains and the audit log.
#[derive(Clone)]
pub struct OperationsApi {
    pub node: Node,
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for OperationsApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperationsApi").finish_non_exhaustive()
    }
}

fn drain_info(d: &Drain) -> pb::DrainInfo {
    pb::DrainInfo {
        domain: d.domain.to_string(),
        fraction: d.fraction,
        target_fraction: d.fraction,
        reason: d.reason.clone(),
        owner: d.owner.clone(),
        created_by: d.created_by.clone(),
        created_at_unix_ms: d.created_at_ms,
        ..pb::DrainInfo::default()
    }
}

fn unsupported(what: &str) -> Status {
    Status::unimplemented(format!(
        "{what} is not supported yet: it arrives with step schedules and drills"
    ))
}

#[tonic::async_trait]
impl OperationsService for OperationsApi {
    #[instrument(skip_all, fields(domain, dry_run))]
    async fn drain(
        &self,
        request: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainResponse>, Status> {
        let forwarding = Request::from_parts(
            request.metadata().clone(),
            request.extensions().clone(),
            request.get_ref().clone(),
        );
        let req = request.into_inner();
        let span = tracing::Span::current();
        span.record("domain", req.domain.as_str());
        span.record("dry_run", req.dry_run);
        if !req.steps.is_empty() || req.step_interval_seconds != 0 {
            return Err(unsupported("a drain step schedule"));
        }
        if req.expires_in_seconds != 0 {
            return Err(unsupported("a drain expiry"));
        }
        if req.force || !req.force_reason.is_empty() {
            return Err(unsupported("--force"));
        }
        let fraction = if req.fraction == 0.0 {
            1.0
        } else {
            req.fraction
        };
        let intent = super::intent(req.actor, req.reason);
        if req.dry_run {
            let snap = self.node.snapshot();
            let fleet = snap.fleet.clone().ok_or(OpError::NoFleet)?;
            let now = self.clock.now_ms();
            let path = Drain::check(&fleet, &req.domain, fraction, &intent.reason)
                .map_err(OpError::from)?;
            let drain = Drain {
                domain: path,
                fraction,
                reason: intent.reason,
                owner: if req.owner.is_empty() {
                    intent.actor.clone()
                } else {
                    req.owner
                },
                created_by: intent.actor,
                created_at_ms: now,
            };
            let mut drains: DrainSet = snap.drains.clone();
            drains.insert(drain.clone());
            let preview = snap.preview(&fleet, &drains, now);
            let (changes, changes_total) = super::row_changes(&preview.changes);
            return Ok(Response::new(pb::DrainResponse {
                drain: Some(drain_info(&drain)),
                routing_version_before: snap.version(),
                routing_version_after: snap.version(),
                changes,
                shifts: super::shifts(&preview.shifts),
                dry_run: true,
                changes_total,
            }));
        }
        let handle = match super::writer(&self.node, &forwarding)? {
            super::Writer::Local(h) => h,
            super::Writer::Remote { leader, channel } => {
                tracing::debug!(%leader, "forwarding the drain to the leader");
                let r = OperationsServiceClient::new(channel)
                    .drain(super::forwarded(forwarding.into_inner(), &self.node.me.id))
                    .await?;
                return Ok(Response::new(r.into_inner()));
            }
        };
        let out = handle
            .drain(req.domain, fraction, req.owner, intent)
            .await?;
        let (changes, changes_total) = super::row_changes(&out.changes);
        Ok(Response::new(pb::DrainResponse {
            drain: out.drain.as_ref().map(drain_info),
            routing_version_before: out.version_before,
            routing_version_after: out.version_after,
            changes,
            shifts: super::shifts(&out.shifts),
            dry_run: false,
            changes_total,
        }))
    }

    #[instrument(skip_all, fields(domain))]
    async fn undrain(
        &self,
        request: Request<pb::UndrainRequest>,
    ) -> Result<Response<pb::UndrainResponse>, Status> {
        let forwarding = Request::from_parts(
            request.metadata().clone(),
            request.extensions().clone(),
            request.get_ref().clone(),
        );
        let req = request.into_inner();
        tracing::Span::current().record("domain", req.domain.as_str());
        let intent = super::intent(req.actor, req.reason);
        if req.dry_run {
            let snap = self.node.snapshot();
            let fleet = snap.fleet.clone().ok_or(OpError::NoFleet)?;
            let path = sextant_core::DomainPath::parse(&req.domain)
                .map_err(|e| OpError::Drain(e.into()))?;
            let mut drains = snap.drains.clone();
            drains
                .remove(&path)
                .ok_or_else(|| OpError::NotDrained(path.to_string()))?;
            let preview = snap.preview(&fleet, &drains, self.clock.now_ms());
            let (changes, changes_total) = super::row_changes(&preview.changes);
            return Ok(Response::new(pb::UndrainResponse {
                routing_version_before: snap.version(),
                routing_version_after: snap.version(),
                changes,
                dry_run: true,
                changes_total,
                shifts: super::shifts(&preview.shifts),
            }));
        }
        let handle = match super::writer(&self.node, &forwarding)? {
            super::Writer::Local(h) => h,
            super::Writer::Remote { leader, channel } => {
                tracing::debug!(%leader, "forwarding the undrain to the leader");
                let r = OperationsServiceClient::new(channel)
                    .undrain(super::forwarded(forwarding.into_inner(), &self.node.me.id))
                    .await?;
                return Ok(Response::new(r.into_inner()));
            }
        };
        let out = handle.undrain(req.domain, intent).await?;
        let (changes, changes_total) = super::row_changes(&out.changes);
        Ok(Response::new(pb::UndrainResponse {
            routing_version_before: out.version_before,
            routing_version_after: out.version_after,
            changes,
            dry_run: false,
            changes_total,
            shifts: super::shifts(&out.shifts),
        }))
    }

    async fn list_drains(
        &self,
        _: Request<pb::ListDrainsRequest>,
    ) -> Result<Response<pb::ListDrainsResponse>, Status> {
        let snap = self.node.snapshot();
        Ok(Response::new(pb::ListDrainsResponse {
            drains: snap.drains.iter().map(drain_info).collect(),
        }))
    }

    type WatchDrainsStream = Pin<Box<dyn Stream<Item = Result<pb::DrainEvent, Status>> + Send>>;

    async fn watch_drains(
        &self,
        _: Request<pb::WatchDrainsRequest>,
    ) -> Result<Response<Self::WatchDrainsStream>, Status> {
        Err(unsupported("watching drain progress"))
    }

    async fn start_drill(
        &self,
        _: Request<pb::StartDrillRequest>,
    ) -> Result<Response<pb::StartDrillResponse>, Status> {
        Err(unsupported("drills"))
    }

    async fn abort_drill(
        &self,
        _: Request<pb::AbortDrillRequest>,
    ) -> Result<Response<pb::AbortDrillResponse>, Status> {
        Err(unsupported("drills"))
    }

    async fn list_drills(
        &self,
        _: Request<pb::ListDrillsRequest>,
    ) -> Result<Response<pb::ListDrillsResponse>, Status> {
        Err(unsupported("drills"))
    }

    async fn get_drill_report(
        &self,
        _: Request<pb::GetDrillReportRequest>,
    ) -> Result<Response<pb::DrillReport>, Status> {
        Err(unsupported("drills"))
    }

    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        let req = request.into_inner();
        let mut records = state::load_audit(self.store.as_ref())
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        records.retain(|r| r.at_ms >= req.since_unix_ms);
        if req.limit > 0 {
            let keep = req.limit as usize;
            if records.len() > keep {
                records.drain(..records.len() - keep);
            }
        }
        let (page, next_page_token) = super::page(
            records,
            |r| format!("{:020}", r.seq),
            req.page_size,
            &req.page_token,
        );
        Ok(Response::new(pb::ListAuditResponse {
            next_page_token,
            records: page
                .into_iter()
                .map(|r| pb::AuditRecord {
                    seq: r.seq,
                    at_unix_ms: r.at_ms,
                    actor: r.actor,
                    action: r.action,
                    target: r.target,
                    reason: r.reason,
                    routing_version_before: r.routing_version_before,
                    routing_version_after: r.routing_version_after,
                    details: r.details,
                })
                .collect(),
        }))
    }
}
