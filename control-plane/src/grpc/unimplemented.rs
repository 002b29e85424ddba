//! Services of the v1 contract that later issues implement. They answer
//! UNIMPLEMENTED with what is missing, so that clients built against the
//! full contract get a clear answer rather than a transport error.

use std::pin::Pin;

use futures::Stream;
use sextant_proto::v1 as pb;
use sextant_proto::v1::distribution_service_server::DistributionService;
use sextant_proto::v1::signals_service_server::SignalsService;
use tonic::{Request, Response, Status, Streaming};

/// `SignalsService`, not implemented yet.
#[derive(Debug, Clone, Default)]
pub struct SignalsApi;

#[tonic::async_trait]
impl SignalsService for SignalsApi {
    async fn report_edge(
        &self,
        _: Request<Streaming<pb::EdgeReport>>,
    ) -> Result<Response<pb::ReportAck>, Status> {
        Err(Status::unimplemented(
            "edge reports are not accepted yet: they arrive with health signals",
        ))
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

/// `DistributionService`, not implemented yet.
#[derive(Debug, Clone, Default)]
pub struct DistributionApi;

#[tonic::async_trait]
impl DistributionService for DistributionApi {
    type SubscribeStream = Pin<Box<dyn Stream<Item = Result<pb::ConfigUpdate, Status>> + Send>>;

    async fn subscribe(
        &self,
        _: Request<Streaming<pb::SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        Err(Status::unimplemented(
            "config distribution is not implemented yet: it arrives with the edge proxy",
        ))
    }
}
