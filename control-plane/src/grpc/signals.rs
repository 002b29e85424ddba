//! `SignalsService`: edge reports (kept, the latest per edge, and queued as
//! the edge agent's health vote) and probe batches from vantage points
//! (queued as votes). The leader's loop turns the votes into verdicts.
//!
//! Edges and probers may connect to any replica: a follower keeps the
//! latest reports for its own reads and forwards every report and batch to
//! the leader on a stream of its own (per incoming stream), so the leader
//! judges from all of them. A forwarded stream that reaches a replica that
//! no longer leads is refused; the follower then re-opens it to the new
//! leader.

use std::sync::Arc;

use sextant_proto::v1 as pb;
use sextant_proto::v1::signals_service_client::SignalsServiceClient;
use sextant_proto::v1::signals_service_server::SignalsService;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, instrument};

use crate::auth::{self, NodeKind};
use crate::cluster::{Node, Role};
use crate::control_loop::{Clock, Snapshot};
pub use crate::inbox::{Observation, Received, Reports};

/// Serves signal streams.
#[derive(Clone)]
pub struct SignalsApi {
    pub state: watch::Receiver<Arc<Snapshot>>,
    pub reports: Arc<Reports>,
    pub clock: Arc<dyn Clock>,
    pub node: Node,
}

/// Where this replica sends what it receives.
enum Route<T> {
    /// The leader: into the local inbox.
    Here,
    /// A follower: to the leader's stream.
    Leader(mpsc::Sender<T>),
    /// No leader: nobody judges now; reports are kept for reads only.
    Nowhere,
}

/// A forwarding stream to the leader, re-opened when the leader changes or
/// the stream breaks.
struct Forwarder<T> {
    open: Option<(String, mpsc::Sender<T>)>,
}

impl<T: Send + 'static> Forwarder<T> {
    fn new() -> Self {
        Self { open: None }
    }

    /// The route for the next message; `start` opens a stream to a leader.
    fn route(
        &mut self,
        node: &Node,
        forwarded: bool,
        start: impl FnOnce(tonic::transport::Channel, Request<ReceiverStream<T>>),
    ) -> Result<Route<T>, Status> {
        match node.role() {
            Role::Leader(_) => Ok(Route::Here),
            Role::Follower { .. } | Role::NoLeader { .. } if forwarded => Err(Status::unavailable(
                "this replica no longer leads: forward to the new leader",
            )),
            Role::NoLeader { .. } => Ok(Route::Nowhere),
            Role::Follower { leader } => {
                if let Some((id, tx)) = &self.open {
                    if *id == leader.id && !tx.is_closed() {
                        return Ok(Route::Leader(tx.clone()));
                    }
                }
                let channel = node
                    .peer_endpoint(&leader.url)?
                    .connect_timeout(std::time::Duration::from_secs(3))
                    .connect_lazy();
                let (tx, rx) = mpsc::channel(256);
                let mut req = Request::new(ReceiverStream::new(rx));
                if let Ok(v) = node.me.id.parse() {
                    req.metadata_mut().insert(super::FORWARDED_BY, v);
                }
                start(channel, req);
                debug!(leader = %leader.id, "forwarding signals to the leader");
                self.open = Some((leader.id, tx.clone()));
                Ok(Route::Leader(tx))
            }
        }
    }
}

/// Sends `msg` to the leader's stream; a full or broken stream drops it
/// (signals are perishable; the next one follows in a second).
fn send_on<T>(tx: &mpsc::Sender<T>, msg: T) {
    if tx.try_send(msg).is_err() {
        debug!("forwarding stream full or closed; a signal was dropped");
    }
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
        let who = super::principal(&request)?;
        let forwarded = request.metadata().contains_key(super::FORWARDED_BY);
        let mut stream = request.into_inner();
        let mut accepted = 0u64;
        let mut node: Option<String> = None;
        let mut fwd = Forwarder::new();
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
                    auth::may_act_as(&who, NodeKind::Edge, &report.node_id)?;
                    debug!(node = %report.node_id, "edge reporting");
                    node = Some(report.node_id.clone());
                }
                _ => {}
            }
            let route = fwd.route(&self.node, forwarded, |channel, req| {
                tokio::spawn(async move {
                    if let Err(e) = SignalsServiceClient::new(channel).report_edge(req).await {
                        debug!(error = %e, "forwarded edge reports ended");
                    }
                });
            })?;
            let received = Received {
                report: report.clone(),
                received_at_ms: self.clock.now_ms(),
            };
            match route {
                Route::Here => self.reports.put(report.node_id.clone(), received),
                Route::Leader(tx) => {
                    self.reports.keep(report.node_id.clone(), received);
                    send_on(&tx, report);
                }
                Route::Nowhere => self.reports.keep(report.node_id.clone(), received),
            }
            accepted += 1;
        }
        Ok(Response::new(pb::ReportAck { accepted }))
    }

    #[instrument(skip_all)]
    async fn report_probes(
        &self,
        request: Request<Streaming<pb::ProbeBatch>>,
    ) -> Result<Response<pb::ReportAck>, Status> {
        let who = super::principal(&request)?;
        let forwarded = request.metadata().contains_key(super::FORWARDED_BY);
        let mut stream = request.into_inner();
        let mut accepted = 0u64;
        let mut vantage: Option<String> = None;
        let mut fwd = Forwarder::new();
        while let Some(batch) = stream.message().await? {
            let snap = self.state.borrow().clone();
            let obs = check_batch(&batch, self.clock.now_ms(), |id| {
                snap.fleet
                    .as_ref()
                    .is_some_and(|f| f.edges.contains_key(id))
            })?;
            match &vantage {
                Some(v) if *v != batch.vantage_id => {
                    return Err(Status::invalid_argument(format!(
                        "one stream reports for one vantage point: {v}, then {}",
                        batch.vantage_id
                    )))
                }
                None => {
                    auth::may_act_as(&who, NodeKind::Probe, &batch.vantage_id)?;
                    debug!(vantage = %batch.vantage_id, "prober reporting");
                    vantage = Some(batch.vantage_id.clone());
                }
                _ => {}
            }
            accepted += obs.len() as u64;
            let route = fwd.route(&self.node, forwarded, |channel, req| {
                tokio::spawn(async move {
                    if let Err(e) = SignalsServiceClient::new(channel).report_probes(req).await {
                        debug!(error = %e, "forwarded probe batches ended");
                    }
                });
            })?;
            match route {
                Route::Here => self.reports.push(obs),
                Route::Leader(tx) => send_on(&tx, batch),
                Route::Nowhere => {}
            }
        }
        Ok(Response::new(pb::ReportAck { accepted }))
    }
}

/// Longest vantage id.
const MAX_VANTAGE_LEN: usize = 128;
/// Most results in one batch.
const MAX_RESULTS: usize = 100_000;

/// Checks a probe batch whole (one malformed result refuses the batch;
/// nothing is queued) and turns it into observations stamped `now_ms`;
/// results about edges not in the fleet are left out.
fn check_batch(
    batch: &pb::ProbeBatch,
    now_ms: i64,
    known: impl Fn(&str) -> bool,
) -> Result<Vec<Observation>, Status> {
    let v = &batch.vantage_id;
    if v.is_empty()
        || v.len() > MAX_VANTAGE_LEN
        || v.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(Status::invalid_argument(format!(
            "probe batch: vantage_id must be 1..={MAX_VANTAGE_LEN} characters without spaces, got {v:?}"
        )));
    }
    if v == sextant_core::health::AGENT {
        return Err(Status::invalid_argument(format!(
            "probe batch: vantage_id {v:?} is reserved for edges' own reports"
        )));
    }
    if sextant_core::health::is_bgp(v) {
        return Err(Status::invalid_argument(format!(
            "probe batch: vantage_id {v:?} is reserved: names starting with {:?} are BGP routers' votes (BMP)",
            sextant_core::health::BGP_PREFIX
        )));
    }
    if batch.results.len() > MAX_RESULTS {
        return Err(Status::invalid_argument(format!(
            "probe batch from {v}: {} results, more than {MAX_RESULTS}",
            batch.results.len()
        )));
    }
    let mut out = Vec::with_capacity(batch.results.len());
    for (i, r) in batch.results.iter().enumerate() {
        if !r.latency_ms.is_finite() || r.latency_ms < 0.0 {
            return Err(Status::invalid_argument(format!(
                "probe batch from {v}: results[{i}].latency_ms must be a finite number >= 0, got {}",
                r.latency_ms
            )));
        }
        // A prober's edge list may lag a fleet change by its refresh
        // interval: results about edges the fleet no longer has are left
        // out, not a reason to refuse the others.
        if known(&r.edge) {
            out.push(Observation {
                edge: r.edge.clone(),
                voter: v.clone(),
                ok: r.ok,
                at_ms: now_ms,
                error: r.error.chars().take(200).collect(),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(vantage: &str, edges: &[(&str, bool)]) -> pb::ProbeBatch {
        pb::ProbeBatch {
            vantage_id: vantage.into(),
            results: edges
                .iter()
                .map(|(e, ok)| pb::ProbeResult {
                    edge: (*e).into(),
                    at_unix_ms: 0,
                    ok: *ok,
                    latency_ms: 1.0,
                    error: if *ok { String::new() } else { "refused".into() },
                })
                .collect(),
        }
    }

    #[test]
    fn good_batches_become_observations() {
        let obs = check_batch(&batch("p1", &[("e1", true), ("e2", false)]), 7, |e| {
            e.starts_with('e')
        })
        .expect("valid");
        assert_eq!(obs.len(), 2);
        assert_eq!(
            (obs[1].voter.as_str(), obs[1].ok, obs[1].at_ms),
            ("p1", false, 7)
        );
        assert_eq!(obs[1].error, "refused");
        let obs = check_batch(&batch("p1", &[("gone", true), ("e1", true)]), 7, |e| {
            e == "e1"
        })
        .expect("valid");
        assert_eq!(
            obs.len(),
            1,
            "results about edges not in the fleet are left out"
        );
    }

    #[test]
    fn bad_batches_are_refused_naming_the_field() {
        let known = |e: &str| e == "e1";
        for (b, want) in [
            (batch("", &[]), "vantage_id must be"),
            (batch("a b", &[]), "vantage_id must be"),
            (batch("agent", &[]), "reserved"),
            (batch("bgp:r1", &[]), "reserved"),
        ] {
            let e = check_batch(&b, 0, known).expect_err("refused");
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().contains(want), "{}", e.message());
        }
        let mut nan = batch("p1", &[("e1", true)]);
        nan.results[0].latency_ms = f64::NAN;
        assert!(check_batch(&nan, 0, known)
            .expect_err("nan")
            .message()
            .contains("results[0].latency_ms"));
    }
}
