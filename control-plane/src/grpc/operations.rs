//! `OperationsService`: drains (steps, expiry, guardrails, preview, watch),
//! drills, and the audit log.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use sextant_core::drain::Drain;
use sextant_core::drill::Drill;
use sextant_core::schedule::Phase;
use sextant_proto::v1 as pb;
use sextant_proto::v1::operations_service_client::OperationsServiceClient;
use sextant_proto::v1::operations_service_server::OperationsService;
use sextant_store::Store;
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::auth;
use crate::cluster::Node;
use crate::control_loop::{Clock, OpError};
use crate::grpc::distribution::Distribution;
use crate::state;
use crate::workflow::{self, DrainRequest, DrillRequest, WorkflowConfig};

/// Serves drains, drills and the audit log.
#[derive(Clone)]
pub struct OperationsApi {
    pub node: Node,
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub distribution: Arc<Distribution>,
    pub workflow: WorkflowConfig,
}

impl std::fmt::Debug for OperationsApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperationsApi").finish_non_exhaustive()
    }
}

pub(crate) fn drain_info(d: &Drain) -> pb::DrainInfo {
    let (steps, step, interval_ms, phase, next_due, expires) = match &d.progress {
        Some(p) => (
            p.schedule.steps.clone(),
            p.step,
            p.schedule.interval_ms,
            match &p.phase {
                Phase::Draining => "draining",
                Phase::Undraining { expired: true, .. } => "expired",
                Phase::Undraining { .. } => "undraining",
            },
            p.next_due_ms().unwrap_or(0),
            p.expires_at_ms.unwrap_or(0),
        ),
        None => (vec![d.fraction], 0, 0, "draining", 0, 0),
    };
    pb::DrainInfo {
        domain: d.domain.to_string(),
        fraction: d.fraction,
        target_fraction: d.target(),
        reason: d.reason.clone(),
        owner: d.owner.clone(),
        created_by: d.created_by.clone(),
        created_at_unix_ms: d.created_at_ms,
        expires_at_unix_ms: expires,
        steps,
        step_index: u32::try_from(step).unwrap_or(u32::MAX),
        step_interval_seconds: u64::try_from(interval_ms / 1000).unwrap_or(0),
        phase: phase.to_owned(),
        forced_reason: d.forced.clone().unwrap_or_default(),
        drill_id: d.drill.clone().unwrap_or_default(),
        next_due_unix_ms: next_due,
    }
}

fn drill_info(d: &Drill) -> pb::DrillInfo {
    pb::DrillInfo {
        id: d.id.clone(),
        domain: d.domain.to_string(),
        state: d.state.as_str().to_owned(),
        started_at_unix_ms: d.started_at_ms,
        ended_at_unix_ms: d.ended_at_ms.unwrap_or(0),
        reason: d.reason.clone(),
        outcome: d.outcome(),
        duration_seconds: u64::try_from(d.duration_ms / 1000).unwrap_or(0),
        abort_if: d.conditions.iter().map(|c| c.to_string()).collect(),
        created_by: d.created_by.clone(),
    }
}

fn secs_ms(s: u64) -> i64 {
    i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX)
}

fn copy<T: Clone>(r: &Request<T>) -> Request<T> {
    Request::from_parts(
        r.metadata().clone(),
        r.extensions().clone(),
        r.get_ref().clone(),
    )
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::DrainEvent, Status>> + Send>>;

/// The drain events between two snapshots' drain sets.
fn drain_events(
    before: &BTreeMap<String, Drain>,
    after: &BTreeMap<String, Drain>,
) -> Vec<(&'static str, pb::DrainInfo)> {
    let mut out = Vec::new();
    for (domain, d) in after {
        let kind = match before.get(domain) {
            None => "started",
            Some(b) if b.fraction == d.fraction && b.undraining() == d.undraining() => continue,
            Some(_)
                if d.progress.as_ref().is_some_and(|p| {
                    matches!(p.phase, Phase::Undraining { expired: true, .. })
                }) =>
            {
                "expired"
            }
            Some(_) if d.undraining() => "undraining",
            Some(_) => "stepped",
        };
        out.push((kind, drain_info(d)));
    }
    for (domain, d) in before {
        if !after.contains_key(domain) {
            let mut info = drain_info(d);
            info.fraction = 0.0;
            out.push(("undrained", info));
        }
    }
    out
}

#[tonic::async_trait]
impl OperationsService for OperationsApi {
    #[instrument(skip_all, fields(domain, dry_run))]
    async fn drain(
        &self,
        request: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainResponse>, Status> {
        let who = super::principal(&request)?;
        let forwarding = copy(&request);
        let req = request.into_inner();
        let span = tracing::Span::current();
        span.record("domain", req.domain.as_str());
        span.record("dry_run", req.dry_run);
        auth::may_touch(&who, &req.domain)?;
        let intent = super::intent(&who, req.actor.clone(), req.reason.clone());
        let force = (req.force || !req.force_reason.is_empty()).then(|| req.force_reason.clone());
        if force.is_some() && !req.dry_run {
            auth::may_force(&who)?;
        }
        let dreq = DrainRequest {
            domain: req.domain.clone(),
            fraction: req.fraction,
            steps: req.steps.clone(),
            interval_ms: secs_ms(req.step_interval_seconds),
            expires_in_ms: (req.expires_in_seconds > 0).then(|| secs_ms(req.expires_in_seconds)),
            owner: req.owner.clone(),
            force,
            drill: None,
        };
        if req.dry_run {
            let snap = self.node.snapshot();
            let plan =
                workflow::plan_drain(&snap, &dreq, &intent, &self.workflow, self.clock.now_ms())?;
            let (changes, changes_total) = super::row_changes(&plan.first.changes);
            return Ok(Response::new(pb::DrainResponse {
                drain: Some(drain_info(&plan.drain)),
                routing_version_before: snap.version(),
                routing_version_after: snap.version(),
                changes,
                shifts: super::shifts(&plan.first.shifts),
                dry_run: true,
                changes_total,
                impact: Some(super::impact(&plan.impact, &plan.violations)),
            }));
        }
        let handle = match super::writer(&self.node, &forwarding)? {
            super::Writer::Local(h) => h,
            super::Writer::Remote { leader, channel } => {
                tracing::debug!(%leader, "forwarding the drain to the leader");
                let r = OperationsServiceClient::new(channel)
                    .drain(super::forwarded(
                        forwarding.into_inner(),
                        &self.node.me.id,
                        &who,
                    ))
                    .await?;
                return Ok(Response::new(r.into_inner()));
            }
        };
        let out = handle.drain(dreq, intent).await?;
        let (changes, changes_total) = super::row_changes(&out.changes);
        Ok(Response::new(pb::DrainResponse {
            drain: out.drain.as_ref().map(drain_info),
            routing_version_before: out.version_before,
            routing_version_after: out.version_after,
            changes,
            shifts: super::shifts(&out.shifts),
            dry_run: false,
            changes_total,
            impact: out.impact.as_ref().map(|i| super::impact(i, &[])),
        }))
    }

    #[instrument(skip_all, fields(domain))]
    async fn undrain(
        &self,
        request: Request<pb::UndrainRequest>,
    ) -> Result<Response<pb::UndrainResponse>, Status> {
        let who = super::principal(&request)?;
        let forwarding = copy(&request);
        let req = request.into_inner();
        tracing::Span::current().record("domain", req.domain.as_str());
        auth::may_touch(&who, &req.domain)?;
        let intent = super::intent(&who, req.actor, req.reason);
        if req.dry_run {
            let snap = self.node.snapshot();
            let fleet = snap.fleet.clone().ok_or(OpError::NoFleet)?;
            let now = self.clock.now_ms();
            let (drains, _) = workflow::plan_undrain(&snap, &req.domain, req.immediate, None, now)?;
            let preview = snap.preview(&fleet, &drains, now);
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
                    .undrain(super::forwarded(
                        forwarding.into_inner(),
                        &self.node.me.id,
                        &who,
                    ))
                    .await?;
                return Ok(Response::new(r.into_inner()));
            }
        };
        let out = handle.undrain(req.domain, req.immediate, intent).await?;
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

    type WatchDrainsStream = EventStream;

    async fn watch_drains(
        &self,
        request: Request<pb::WatchDrainsRequest>,
    ) -> Result<Response<Self::WatchDrainsStream>, Status> {
        let only = request.into_inner().domain;
        let mut snaps = self.node.subscribe();
        let distribution = self.distribution.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let keep = |d: &Drain| only.is_empty() || d.domain.as_str() == only;
            let mut last: BTreeMap<String, Drain> = BTreeMap::new();
            let mut version = 0u64;
            let mut acked = (u32::MAX, 0, u32::MAX, 0);
            let mut first = true;
            // An event went out before every subscriber held its version:
            // follow the ACKs even once no drain is left (an undrain).
            let mut unsettled = false;
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                let snap = snaps.borrow_and_update().clone();
                let now: BTreeMap<String, Drain> = snap
                    .drains
                    .iter()
                    .filter(|d| keep(d))
                    .map(|d| (d.domain.to_string(), d.clone()))
                    .collect();
                let events: Vec<(&str, pb::DrainInfo)> = if first {
                    now.values().map(|d| ("current", drain_info(d))).collect()
                } else {
                    drain_events(&last, &now)
                };
                // Watching one domain that has no drain (an undrain that
                // finished before the watch began): say so once, with the
                // ACKs, so a waiting client can tell it is done.
                let absent = first && !only.is_empty() && now.is_empty();
                first = false;
                if snap.version() != version {
                    version = snap.version();
                    acked = (u32::MAX, 0, u32::MAX, 0);
                }
                let counts = ack_counts(&distribution, version);
                let ack_moved = counts != acked;
                acked = counts;
                let mut out: Vec<pb::DrainEvent> = events
                    .into_iter()
                    .map(|(kind, drain)| pb::DrainEvent {
                        kind: kind.into(),
                        drain: Some(drain),
                        routing_version: version,
                        moved_share: snap.table.as_ref().map_or(0.0, |t| t.meta.churn),
                        acked_proxies: counts.0,
                        total_proxies: counts.1,
                        acked_dns: counts.2,
                        total_dns: counts.3,
                    })
                    .collect();
                if out.is_empty() && (absent || ack_moved && (unsettled || !now.is_empty())) {
                    out.push(pb::DrainEvent {
                        kind: if absent { "absent" } else { "acked" }.into(),
                        drain: None,
                        routing_version: version,
                        moved_share: 0.0,
                        acked_proxies: counts.0,
                        total_proxies: counts.1,
                        acked_dns: counts.2,
                        total_dns: counts.3,
                    });
                }
                if !out.is_empty() {
                    unsettled = counts.0 != counts.1 || counts.2 != counts.3;
                }
                for e in out {
                    if tx.send(Ok(e)).await.is_err() {
                        return;
                    }
                }
                last = now;
                tokio::select! {
                    changed = snaps.changed() => if changed.is_err() { return },
                    _ = tick.tick() => {}
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    #[instrument(skip_all, fields(domain))]
    async fn start_drill(
        &self,
        request: Request<pb::StartDrillRequest>,
    ) -> Result<Response<pb::StartDrillResponse>, Status> {
        let who = super::principal(&request)?;
        let forwarding = copy(&request);
        let req = request.into_inner();
        tracing::Span::current().record("domain", req.domain.as_str());
        auth::may_touch(&who, &req.domain)?;
        let intent = super::intent(&who, req.actor.clone(), req.reason.clone());
        let dreq = DrillRequest {
            domain: req.domain.clone(),
            duration_ms: secs_ms(req.duration_seconds),
            abort_if: req.abort_if.clone(),
            steps: req.steps.clone(),
            interval_ms: secs_ms(req.step_interval_seconds),
        };
        if req.dry_run {
            let snap = self.node.snapshot();
            let now = self.clock.now_ms();
            let (drill, plan) =
                workflow::plan_drill(&snap, &dreq, &intent, &self.workflow, "dry-run".into(), now)?;
            return match plan {
                Ok(p) => Ok(Response::new(pb::StartDrillResponse {
                    drill_id: String::new(),
                    drill: Some(drill_info(&drill)),
                    impact: Some(super::impact(&p.impact, &p.violations)),
                })),
                Err(reason) => Err(Status::failed_precondition(format!(
                    "the drill would be refused: {reason}"
                ))),
            };
        }
        let handle = match super::writer(&self.node, &forwarding)? {
            super::Writer::Local(h) => h,
            super::Writer::Remote { leader, channel } => {
                tracing::debug!(%leader, "forwarding the drill to the leader");
                let r = OperationsServiceClient::new(channel)
                    .start_drill(super::forwarded(
                        forwarding.into_inner(),
                        &self.node.me.id,
                        &who,
                    ))
                    .await?;
                return Ok(Response::new(r.into_inner()));
            }
        };
        let out = handle.start_drill(dreq, intent).await?;
        let drill = out.drill.as_ref();
        Ok(Response::new(pb::StartDrillResponse {
            drill_id: drill.map(|d| d.id.clone()).unwrap_or_default(),
            drill: drill.map(drill_info),
            impact: out.impact.as_ref().map(|i| super::impact(i, &[])),
        }))
    }

    async fn abort_drill(
        &self,
        request: Request<pb::AbortDrillRequest>,
    ) -> Result<Response<pb::AbortDrillResponse>, Status> {
        let who = super::principal(&request)?;
        let forwarding = copy(&request);
        let req = request.into_inner();
        if let Some(d) = self.node.snapshot().drills.get(&req.drill_id) {
            auth::may_touch(&who, &d.domain.to_string())?;
        }
        let intent = super::intent(&who, req.actor, req.reason);
        match super::writer(&self.node, &forwarding)? {
            super::Writer::Local(h) => {
                h.abort_drill(req.drill_id, intent).await?;
            }
            super::Writer::Remote { channel, .. } => {
                OperationsServiceClient::new(channel)
                    .abort_drill(super::forwarded(
                        forwarding.into_inner(),
                        &self.node.me.id,
                        &who,
                    ))
                    .await?;
            }
        }
        Ok(Response::new(pb::AbortDrillResponse {}))
    }

    async fn list_drills(
        &self,
        _: Request<pb::ListDrillsRequest>,
    ) -> Result<Response<pb::ListDrillsResponse>, Status> {
        let snap = self.node.snapshot();
        Ok(Response::new(pb::ListDrillsResponse {
            drills: snap.drills.values().map(drill_info).collect(),
        }))
    }

    async fn get_drill_report(
        &self,
        request: Request<pb::GetDrillReportRequest>,
    ) -> Result<Response<pb::DrillReport>, Status> {
        let id = request.into_inner().drill_id;
        let snap = self.node.snapshot();
        let d = snap
            .drills
            .get(&id)
            .ok_or_else(|| OpError::UnknownDrill(id.clone()))?;
        // The audit records about the drill complete its own timeline.
        let records = state::load_audit(self.store.as_ref())
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let domain = d.domain.to_string();
        let end = d.ended_at_ms.unwrap_or(i64::MAX);
        let timeline = records
            .into_iter()
            .filter(|r| {
                r.target == id
                    || (r.target == domain && r.at_ms >= d.started_at_ms && r.at_ms <= end)
            })
            .map(super::audit_record)
            .collect();
        let ms = |x: Option<i64>| x.map_or(0, |v| u64::try_from(v).unwrap_or(0));
        Ok(Response::new(pb::DrillReport {
            drill: Some(drill_info(d)),
            timeline,
            peak_utilization: d.peak_utilization,
            peak_error_rate: d.peak_error_rate,
            time_to_drain_ms: ms(d.time_to_drain_ms()),
            time_to_restore_ms: ms(d.time_to_restore_ms()),
            outcome: d.outcome(),
            events: d
                .timeline
                .iter()
                .map(|e| pb::DrillEvent {
                    at_unix_ms: e.at_ms,
                    text: e.text.clone(),
                })
                .collect(),
        }))
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
            records: page.into_iter().map(super::audit_record).collect(),
        }))
    }
}

/// (acked proxies, proxies, acked DNS servers, DNS servers) for `version`,
/// counting connected subscribers.
fn ack_counts(d: &Distribution, version: u64) -> (u32, u32, u32, u32) {
    // Read only: `version` need not be the current one, against which the
    // stale marks are kept.
    let subs = d.registry.list();
    let count = |kind: &str, acked: bool| {
        u32::try_from(
            subs.iter()
                .filter(|s| {
                    s.connected && s.kind == kind && (!acked || s.version_applied >= version)
                })
                .count(),
        )
        .unwrap_or(u32::MAX)
    };
    (
        count("proxy", true),
        count("proxy", false),
        count("dns", true),
        count("dns", false),
    )
}
