//! `SteeringService`.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use prost::Message;
use sextant_core::routing::RoutingTable;
use sextant_proto::v1 as pb;
use sextant_proto::v1::steering_service_server::SteeringService;
use sextant_store::Store;
use tonic::{Request, Response, Status};

use crate::cluster::Node;
use crate::control_loop::Clock;
use crate::state;
use sextant_core::{explain, n_minus_one};

/// Group rows per chunk are added until a chunk reaches this size, far
/// below gRPC's default 4 MiB message limit.
pub const CHUNK_TARGET_BYTES: usize = 1024 * 1024;

/// Serves routing tables.
#[derive(Clone)]
pub struct SteeringApi {
    pub node: Node,
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for SteeringApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SteeringApi").finish_non_exhaustive()
    }
}

/// Splits a routing table into chunks of at most about
/// [`CHUNK_TARGET_BYTES`], filtered to one service and/or group.
pub fn chunks(table: &RoutingTable, service: &str, group: &str) -> Vec<pb::RoutingTableChunk> {
    let header = |index: u32| pb::RoutingTableChunk {
        version: table.meta.version.0,
        computed_at_unix_ms: table.meta.computed_at_ms,
        fleet_generation: table.meta.fleet_generation,
        chunk_index: index,
        churn: table.meta.churn,
        ..pb::RoutingTableChunk::default()
    };
    let mut first = header(0);
    first.edges = table
        .routing
        .edges
        .iter()
        .map(|(id, l)| pb::EdgeLoad {
            edge: id.to_string(),
            predicted_load_rps: l.predicted_load_rps,
            effective_capacity_rps: l.effective_capacity_rps,
            utilization: l.utilization,
            origins: l
                .origins
                .iter()
                .map(|o| pb::OriginWeight {
                    origin: o.origin.to_string(),
                    weight: o.weight,
                })
                .collect(),
        })
        .collect();
    let mut out = Vec::new();
    let mut current = first;
    let mut size = current.encoded_len();
    for (s, g, row) in table.routing.rows() {
        if (!service.is_empty() && s.as_str() != service)
            || (!group.is_empty() && g.as_str() != group)
        {
            continue;
        }
        let row = pb::GroupRouting {
            service: s.to_string(),
            group: g.to_string(),
            weights: super::weights(&row.weights),
            unserved: row.unserved,
            demand_rps: row.demand_rps,
            failed_open: row.failed_open,
            notes: row.notes.clone(),
        };
        let len = row.encoded_len() + 8;
        if size + len > CHUNK_TARGET_BYTES && !current.groups.is_empty() {
            let next = header(current.chunk_index + 1);
            out.push(std::mem::replace(&mut current, next));
            size = current.encoded_len();
        }
        size += len;
        current.groups.push(row);
    }
    current.last = true;
    out.push(current);
    out
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::RoutingTableChunk, Status>> + Send>>;

#[tonic::async_trait]
impl SteeringService for SteeringApi {
    type GetRoutingTableStream = ChunkStream;

    async fn get_routing_table(
        &self,
        request: Request<pb::GetRoutingTableRequest>,
    ) -> Result<Response<Self::GetRoutingTableStream>, Status> {
        let req = request.into_inner();
        let snap = self.node.snapshot();
        let table = if req.version == 0 || req.version == snap.version() {
            snap.table.clone().ok_or_else(|| {
                Status::failed_precondition("no routing table yet: apply a fleet first")
            })?
        } else {
            let kept = state::load_version(self.store.as_ref(), req.version)
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            Arc::new(kept.ok_or_else(|| {
                Status::not_found(format!(
                    "routing version {} is not kept (see `sextantctl versions`)",
                    req.version
                ))
            })?)
        };
        if let Some(fleet) = &snap.fleet {
            if !req.service.is_empty() && !fleet.services.contains_key(req.service.as_str()) {
                return Err(Status::not_found(format!(
                    "unknown service {:?}",
                    req.service
                )));
            }
            if !req.group.is_empty() && !fleet.groups.contains_key(req.group.as_str()) {
                return Err(Status::not_found(format!("unknown group {:?}", req.group)));
            }
        }
        let items = chunks(&table, &req.service, &req.group);
        Ok(Response::new(Box::pin(futures::stream::iter(
            items.into_iter().map(Ok),
        ))))
    }

    async fn explain(
        &self,
        request: Request<pb::ExplainRequest>,
    ) -> Result<Response<pb::ExplainResponse>, Status> {
        let req = request.into_inner();
        let snap = self.node.snapshot();
        let (Some(fleet), Some(table)) = (&snap.fleet, &snap.table) else {
            return Err(Status::failed_precondition(
                "no routing table yet: apply a fleet first",
            ));
        };
        if req.group.is_empty() {
            return Err(Status::invalid_argument(
                "group: required (which client group to explain)",
            ));
        }
        let row = explain::explain(
            fleet,
            &snap.signals,
            &snap.drains,
            &table.routing,
            &req.service,
            &req.group,
        )
        .map_err(|e| Status::not_found(e.to_string()))?;
        Ok(Response::new(pb::ExplainResponse {
            version: table.meta.version.0,
            service: row.service.to_string(),
            group: row.group.to_string(),
            unserved: row.unserved,
            demand_rps: row.demand_rps,
            edges: row
                .edges
                .into_iter()
                .map(|e| pb::WeightExplanation {
                    edge: e.edge.to_string(),
                    weight: e.weight,
                    latency_ms: e.latency_ms,
                    cost_per_unit: e.cost_per_unit,
                    utilization: e.utilization,
                    binding: e.binding.iter().map(|b| b.as_str().to_owned()).collect(),
                    drains: e.drains,
                    health: e.health,
                    reason: e.reason,
                    load_rps: e.load_rps,
                    limit_rps: e.limit_rps,
                    marginal_cost: e.marginal_cost,
                })
                .collect(),
            notes: row.notes,
            mode: row.mode,
            failed_open: row.failed_open,
            shift_limited: row.shift_limited,
        }))
    }

    async fn n_minus_one(
        &self,
        _: Request<pb::NMinusOneRequest>,
    ) -> Result<Response<pb::NMinusOneReport>, Status> {
        let snap = self.node.snapshot();
        let (Some(fleet), Some(table)) = (snap.fleet.clone(), snap.table.clone()) else {
            return Err(Status::failed_precondition(
                "no routing table yet: apply a fleet first",
            ));
        };
        let now = self.clock.now_ms();
        let version = table.meta.version.0;
        // One solve per region and provider: off the async workers.
        let report = tokio::task::spawn_blocking(move || {
            n_minus_one::n_minus_one(&fleet, &snap.signals, &snap.drains, &table.routing, now)
        })
        .await
        .map_err(|e| Status::internal(format!("N-1 computation failed: {e}")))?;
        let conv = |d: &n_minus_one::DomainUtilization| pb::DomainUtilization {
            domain: d.domain.to_string(),
            load_rps: d.load_rps,
            capacity_rps: d.capacity_rps,
            utilization: d.utilization,
        };
        Ok(Response::new(pb::NMinusOneReport {
            version,
            baseline: report.baseline.iter().map(conv).collect(),
            scenarios: report
                .scenarios
                .iter()
                .map(|s| pb::LossScenario {
                    lost: s.lost.to_string(),
                    unserved_rps: s.unserved_rps,
                    max_utilization: s.max_utilization,
                    domains: s.domains.iter().map(conv).collect(),
                })
                .collect(),
        }))
    }

    async fn list_versions(
        &self,
        _: Request<pb::ListVersionsRequest>,
    ) -> Result<Response<pb::ListVersionsResponse>, Status> {
        let metas = state::list_versions(self.store.as_ref())
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(pb::ListVersionsResponse {
            versions: metas
                .into_iter()
                .map(|m| pb::RoutingVersionInfo {
                    version: m.version.0,
                    computed_at_unix_ms: m.computed_at_ms,
                    fleet_generation: m.fleet_generation,
                    cause: m.cause,
                    churn: m.churn,
                })
                .collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sextant_core::routing::{EdgeWeight, GroupRouting};
    use sextant_core::{EdgeId, GroupId, ServiceId};

    #[test]
    fn big_tables_are_split_under_the_message_limit_and_nothing_is_lost() {
        let mut table = RoutingTable::default();
        let rows = table
            .routing
            .services
            .entry(ServiceId::from("www"))
            .or_default();
        for g in 0..10_000 {
            rows.insert(
                GroupId::new(format!("group-{g:05}")),
                GroupRouting {
                    demand_rps: 10.0,
                    weights: (0..20)
                        .map(|e| EdgeWeight {
                            edge: EdgeId::new(format!("edge-{e:04}")),
                            weight: 0.05,
                        })
                        .collect(),
                    ..GroupRouting::default()
                },
            );
        }
        let out = chunks(&table, "", "");
        assert!(out.len() > 2, "{} chunks", out.len());
        for (i, c) in out.iter().enumerate() {
            assert!(
                c.encoded_len() < 2 * CHUNK_TARGET_BYTES,
                "chunk {i}: {}",
                c.encoded_len()
            );
            assert_eq!(c.chunk_index as usize, i);
            assert_eq!(c.last, i + 1 == out.len());
        }
        let total: usize = out.iter().map(|c| c.groups.len()).sum();
        assert_eq!(total, 10_000);
        let one = chunks(&table, "www", "group-00042");
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].groups.len(), 1);
    }
}
