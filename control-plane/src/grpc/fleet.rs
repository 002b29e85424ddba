//! `FleetService`.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;

use sextant_core::diff;
use sextant_core::{Fleet, FleetSpec};
use sextant_proto::v1 as pb;
use sextant_proto::v1::fleet_service_client::FleetServiceClient;
use sextant_proto::v1::fleet_service_server::FleetService;
use tonic::{Request, Response, Status, Streaming};
use tracing::instrument;

use crate::cluster::Node;
use crate::control_loop::{Clock, OpError};

/// Serves the fleet model.
#[derive(Clone)]
pub struct FleetApi {
    pub node: Node,
    pub clock: Arc<dyn Clock>,
    pub reports: Arc<super::signals::Reports>,
    /// The blast-radius brake's limit, for the preview of `diff`.
    pub max_move_share: f64,
}

impl std::fmt::Debug for FleetApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetApi").finish_non_exhaustive()
    }
}

fn parse(document: &str, format: i32) -> Result<FleetSpec, Status> {
    let spec = match pb::DocumentFormat::try_from(format) {
        Ok(pb::DocumentFormat::Json) => FleetSpec::from_json(document),
        Ok(pb::DocumentFormat::Toml | pb::DocumentFormat::Unspecified) => {
            FleetSpec::from_toml(document)
        }
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "format: unknown document format {format}"
            )))
        }
    };
    spec.map_err(|e| OpError::InvalidFleet(e).into())
}

/// A report older than this does not count for utilization.
const REPORT_FRESH_MS: i64 = 5_000;

#[tonic::async_trait]
impl FleetService for FleetApi {
    #[instrument(skip_all, fields(actor))]
    async fn apply(
        &self,
        request: Request<Streaming<pb::ApplyFleetRequest>>,
    ) -> Result<Response<pb::ApplyFleetResponse>, Status> {
        let who = super::principal(&request)?;
        let writer = super::writer(&self.node, &request)?;
        let (req, document) =
            super::collect_document(request.into_inner(), |m: &mut pb::ApplyFleetRequest| {
                std::mem::take(&mut m.document)
            })
            .await?;
        let spec = parse(&document, req.format)?;
        let handle = match writer {
            super::Writer::Local(h) => h,
            super::Writer::Remote { leader, channel } => {
                tracing::debug!(%leader, "forwarding the fleet apply to the leader");
                let mut first = Some(req);
                let pieces: Vec<pb::ApplyFleetRequest> = super::split_document(&document)
                    .into_iter()
                    .map(|document| pb::ApplyFleetRequest {
                        document,
                        ..first.take().unwrap_or_default()
                    })
                    .collect();
                let r = FleetServiceClient::new(channel)
                    .max_decoding_message_size(64 << 20)
                    .apply(super::forwarded(
                        futures::stream::iter(pieces),
                        &self.node.me.id,
                        &who,
                    ))
                    .await?;
                return Ok(Response::new(r.into_inner()));
            }
        };
        let intent = super::intent(&who, req.actor, req.reason);
        tracing::Span::current().record("actor", intent.actor.as_str());
        let expected = (req.expected_generation != 0).then_some(req.expected_generation);
        let force = (req.force || !req.force_reason.is_empty()).then(|| req.force_reason.clone());
        let out = handle
            .apply_fleet_forced(spec, expected, force, intent)
            .await?;
        Ok(Response::new(pb::ApplyFleetResponse {
            generation: out.fleet_generation,
            routing_version_before: out.version_before,
            routing_version_after: out.version_after,
            changed: out.changed,
        }))
    }

    type GetStream = Pin<Box<dyn Stream<Item = Result<pb::GetFleetResponse, Status>> + Send>>;

    async fn get(
        &self,
        request: Request<pb::GetFleetRequest>,
    ) -> Result<Response<Self::GetStream>, Status> {
        let format = request.into_inner().format;
        let snap = self.node.snapshot();
        let Some(fleet) = &snap.fleet else {
            let empty = pb::GetFleetResponse::default();
            return Ok(Response::new(Box::pin(futures::stream::iter([Ok(empty)]))));
        };
        let (document, format) = match pb::DocumentFormat::try_from(format) {
            Ok(pb::DocumentFormat::Json) => (
                serde_json::to_string_pretty(fleet.spec())
                    .map_err(|e| Status::internal(format!("cannot encode the fleet: {e}")))?,
                pb::DocumentFormat::Json,
            ),
            _ => (
                fleet
                    .spec()
                    .to_toml()
                    .map_err(|e| Status::internal(e.to_string()))?,
                pb::DocumentFormat::Toml,
            ),
        };
        let generation = snap.fleet_generation;
        let pieces = super::split_document(&document)
            .into_iter()
            .map(move |document| {
                Ok(pb::GetFleetResponse {
                    document,
                    format: format.into(),
                    generation,
                })
            });
        Ok(Response::new(Box::pin(futures::stream::iter(pieces))))
    }

    async fn diff(
        &self,
        request: Request<Streaming<pb::DiffFleetRequest>>,
    ) -> Result<Response<pb::DiffFleetResponse>, Status> {
        let (req, document) =
            super::collect_document(request.into_inner(), |m: &mut pb::DiffFleetRequest| {
                std::mem::take(&mut m.document)
            })
            .await?;
        let spec = parse(&document, req.format)?;
        let fleet = crate::blocking::heavy(|| Fleet::from_spec(spec)).map_err(OpError::from)?;
        let snap = self.node.snapshot();
        let empty = FleetSpec::default();
        let before = snap.fleet.as_ref().map_or(&empty, |f| f.spec());
        let changes = diff::fleet_changes(before, fleet.spec())
            .into_iter()
            .map(|c| pb::FleetChange {
                kind: match c.kind {
                    diff::ChangeKind::Added => pb::fleet_change::Kind::Added,
                    diff::ChangeKind::Removed => pb::fleet_change::Kind::Removed,
                    diff::ChangeKind::Changed => pb::fleet_change::Kind::Changed,
                }
                .into(),
                object: c.object.to_owned(),
                id: c.id,
                details: c.details,
            })
            .collect();
        let preview = snap.preview(&fleet, &snap.drains, self.clock.now_ms());
        let (routing_changes, routing_changes_total) = super::row_changes(&preview.changes);
        let impact = snap.table.as_ref().map(|t| {
            let imp = sextant_core::impact::impact(&fleet, &t.routing, &preview.routing);
            let violations: Vec<sextant_core::impact::Violation> = (imp.moved_share
                > self.max_move_share + 1e-9)
                .then_some(sextant_core::impact::Violation::BlastRadius {
                    moved_share: imp.moved_share,
                    max: self.max_move_share,
                })
                .into_iter()
                .collect();
            super::impact(&imp, &violations)
        });
        Ok(Response::new(pb::DiffFleetResponse {
            changes,
            routing_changes,
            shifts: super::shifts(&preview.shifts),
            routing_changes_total,
            impact,
        }))
    }

    async fn list_edges(
        &self,
        request: Request<pb::ListEdgesRequest>,
    ) -> Result<Response<pb::ListEdgesResponse>, Status> {
        let req = request.into_inner();
        let snap = self.node.snapshot();
        let Some(fleet) = &snap.fleet else {
            return Ok(Response::new(pb::ListEdgesResponse::default()));
        };
        let (page, next_page_token) = super::page(
            fleet.edges.values(),
            |e| e.id.to_string(),
            req.page_size,
            &req.page_token,
        );
        let edges = page
            .into_iter()
            .map(|e| {
                let factor = snap.drains.factor(e.domains());
                let load = snap
                    .table
                    .as_ref()
                    .and_then(|t| t.routing.edges.get(&e.id))
                    .map_or(0.0, |l| l.predicted_load_rps);
                let (addresses, cname) = match &e.target {
                    sextant_core::fleet::EdgeTarget::SelfBuilt { addresses } => (
                        addresses.iter().map(|a| a.to_string()).collect(),
                        String::new(),
                    ),
                    sextant_core::fleet::EdgeTarget::ThirdParty { cname } => {
                        (vec![], cname.clone())
                    }
                };
                let reported = self.reports.get(e.id.as_str());
                let report = reported.as_ref().map(|r| &r.report);
                let sig = snap.signals.edges.get(&e.id);
                let effective = snap.signals.capacity(&e.id, e.capacity_rps) * factor;
                let fresh = reported
                    .as_ref()
                    .is_some_and(|r| self.clock.now_ms() - r.received_at_ms <= REPORT_FRESH_MS);
                let health = match sig {
                    Some(s) if s.held => "down",
                    Some(s) => s.health.as_str(),
                    None => "unknown",
                };
                pb::Edge {
                    health_reason: sig.map(|s| s.reason.clone()).unwrap_or_default(),
                    health_since_unix_ms: sig.map_or(0, |s| s.since_ms),
                    damping_penalty: sig.map_or(0.0, |s| s.penalty),
                    damped: sig.is_some_and(|s| s.damped),
                    failover_held: sig.is_some_and(|s| s.held),
                    utilization: match report {
                        Some(r) if fresh && effective > 0.0 => r.rps / effective,
                        _ => 0.0,
                    },
                    reported_rps: report.map_or(0.0, |r| r.rps),
                    reported_error_rate: report.map_or(0.0, |r| r.error_rate),
                    reported_capacity_rps: report.map_or(0.0, |r| r.capacity_rps),
                    reported_config_version: report.map_or(0, |r| r.config_version),
                    last_report_unix_ms: reported.as_ref().map_or(0, |r| r.received_at_ms),
                    id: e.id.to_string(),
                    kind: e.kind_str().to_owned(),
                    site: e.site.to_string(),
                    provider: e
                        .provider
                        .as_ref()
                        .map(|p| p.to_string())
                        .unwrap_or_default(),
                    addresses,
                    cname,
                    capacity_rps: e.capacity_rps,
                    effective_capacity_rps: effective,
                    drain_factor: factor,
                    health: health.to_owned(),
                    predicted_load_rps: load,
                    health_check: e.health_check.clone(),
                    cost_per_unit: e.cost_per_unit,
                    commit_rps: e.commit_rps,
                    overage_price: e.overage_price,
                }
            })
            .collect();
        Ok(Response::new(pb::ListEdgesResponse {
            edges,
            routing_version: snap.version(),
            next_page_token,
        }))
    }

    async fn list_domains(
        &self,
        _: Request<pb::ListDomainsRequest>,
    ) -> Result<Response<pb::ListDomainsResponse>, Status> {
        let snap = self.node.snapshot();
        let Some(fleet) = &snap.fleet else {
            return Ok(Response::new(pb::ListDomainsResponse::default()));
        };
        let domains = fleet
            .domains
            .iter()
            .map(|(path, info)| pb::Domain {
                path: path.to_string(),
                kind: path.kind().as_str().to_owned(),
                edges: u32::try_from(info.edges.len()).unwrap_or(u32::MAX),
                origins: u32::try_from(info.origins.len()).unwrap_or(u32::MAX),
                capacity_rps: info.capacity_rps,
                drained_fraction: snap.drains.get(path).map_or(0.0, |d| d.fraction),
            })
            .collect();
        Ok(Response::new(pb::ListDomainsResponse { domains }))
    }

    async fn list_services(
        &self,
        _: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        let snap = self.node.snapshot();
        let services = snap
            .fleet
            .iter()
            .flat_map(|f| f.services.values())
            .map(|s| pb::Service {
                id: s.id.to_string(),
                hostname: s.hostname.clone(),
                zone: s.zone.clone(),
                ttl_seconds: s.ttl_seconds,
                default_group: s.default_group.to_string(),
                mode: s.mode.as_str().to_owned(),
            })
            .collect();
        Ok(Response::new(pb::ListServicesResponse { services }))
    }

    async fn list_groups(
        &self,
        request: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        let req = request.into_inner();
        let snap = self.node.snapshot();
        let (page, next_page_token) = super::page(
            snap.fleet.iter().flat_map(|f| f.groups.values()),
            |g| g.id.to_string(),
            req.page_size,
            &req.page_token,
        );
        let groups = page
            .into_iter()
            .map(|g| pb::ClientGroup {
                id: g.id.to_string(),
                prefixes: g.prefixes.iter().map(|p| p.to_string()).collect(),
                countries: g.countries.clone(),
                asns: g.asns.clone(),
                demand_rps: g
                    .demand_rps
                    .iter()
                    .map(|(s, d)| (s.to_string(), *d))
                    .collect(),
                candidate_latency_ms: g
                    .candidates
                    .iter()
                    .map(|c| (c.edge.to_string(), c.latency_ms))
                    .collect(),
                rib_prefixes: snap.rib.as_ref().map_or(0, |r| {
                    g.asns.iter().map(|&a| r.map.count_of(a) as u64).sum()
                }),
            })
            .collect();
        Ok(Response::new(pb::ListGroupsResponse {
            groups,
            next_page_token,
        }))
    }
}
