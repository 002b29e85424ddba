//! `SignalsService`: edge reports are accepted and kept (the latest per
//! edge, shown by `sextantctl get edges`); turning them into health
//! verdicts and probe results arrive with the health issue.

use std::sync::Arc;

use sextant_proto::v1 as pb;
use sextant_proto::v1::signals_service_server::SignalsService;
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, instrument};

use crate::control_loop::{Clock, Snapshot};
pub use crate::inbox::{Received, Reports};

/// Serves signal streams.
#[derive(Clone)]
pub struct SignalsApi {
    pub state: watch::Receiver<Arc<Snapshot>>,
    pub reports: Arc<Reports>,
    pub clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for SignalsApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignalsApi").finish_non_exhaustive()
    }
}

/// Checks one report; the error names the field.
fn check(report: &pb::EdgeReport, known: impl Fn(&str) -> bool) -> Result<(), Status> {
    if !known(&report.node_id) {
        return Err(Status::failed_precondition(format!(
            "node_id {:?} is not an edge of the fleet",
            report.node_id
        )));
    }
    for (field, v) in [
        ("rps", report.rps),
        ("error_rate", report.error_rate),
        ("bytes_per_second", report.bytes_per_second),
        ("capacity_rps", report.capacity_rps),
    ] {
        if !v.is_finite() || v < 0.0 {
            return Err(Status::invalid_argument(format!(
                "report of {}: {field} must be a finite number >= 0, got {v}",
                report.node_id
            )));
        }
    }
    if report.error_rate > 1.0 {
        return Err(Status::invalid_argument(format!(
            "report of {}: error_rate must be in [0, 1], got {}",
            report.node_id, report.error_rate
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl SignalsService for SignalsApi {
    #[instrument(skip_all)]
    async fn report_edge(
        &self,
        request: Request<Streaming<pb::EdgeReport>>,
    ) -> Result<Response<pb::ReportAck>, Status> {
        let mut stream = request.into_inner();
        let mut accepted = 0u64;
        let mut node: Option<String> = None;
        while let Some(report) = stream.message().await? {
            let snap = self.state.borrow().clone();
            check(&report, |id| {
                snap.fleet
                    .as_ref()
                    .is_some_and(|f| f.edges.contains_key(id))
            })?;
            match &node {
                Some(n) if *n != report.node_id => {
                    return Err(Status::invalid_argument(format!(
                        "one stream reports for one edge: {n}, then {}",
                        report.node_id
                    )))
                }
                None => {
                    debug!(node = %report.node_id, "edge reporting");
                    node = Some(report.node_id.clone());
                }
                _ => {}
            }
            self.reports.put(
                report.node_id.clone(),
                Received {
                    report,
                    received_at_ms: self.clock.now_ms(),
                },
            );
            accepted += 1;
        }
        Ok(Response::new(pb::ReportAck { accepted }))
    }

    async fn report_probes(
        &self,
        _: Request<Streaming<pb::ProbeBatch>>,
    ) -> Result<Response<pb::ReportAck>, Status> {
        Err(Status::unimplemented(
            "probe results are not accepted yet: they arrive with health signals",
        ))
    }
}
