//! End to end: the real `sextant-probe` against an in-test control plane
//! (`FleetService.ListEdges`, `SignalsService.ReportProbes`) and in-test
//! targets, all on loopback.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use sextant_proto::v1 as pb;
use sextant_proto::v1::fleet_service_server::{FleetService, FleetServiceServer};
use sextant_proto::v1::signals_service_server::{SignalsService, SignalsServiceServer};
use sextant_tests::{eventually, Prober};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, Streaming};

const INTERVAL: Duration = Duration::from_millis(500);
const VANTAGE: &str = "probe-e2e-1";

/// A batch as the fake control plane received it.
#[derive(Debug, Clone)]
struct Received {
    at: Instant,
    /// Which `ReportProbes` call it came on (1, 2, …).
    stream: u64,
    batch: pb::ProbeBatch,
}

#[derive(Debug)]
struct State {
    edges: Vec<pb::Edge>,
    batches: Mutex<Vec<Received>>,
    streams: AtomicU64,
    /// Bumped to make every open `ReportProbes` call fail.
    cut: watch::Sender<u64>,
}

#[derive(Debug, Clone)]
struct Fake(Arc<State>);

fn unimplemented<T>() -> Result<T, Status> {
    Err(Status::unimplemented("not in this fake"))
}

#[tonic::async_trait]
impl FleetService for Fake {
    async fn apply(
        &self,
        _: Request<Streaming<pb::ApplyFleetRequest>>,
    ) -> Result<Response<pb::ApplyFleetResponse>, Status> {
        unimplemented()
    }

    type GetStream = tokio_stream::Empty<Result<pb::GetFleetResponse, Status>>;

    async fn get(
        &self,
        _: Request<pb::GetFleetRequest>,
    ) -> Result<Response<Self::GetStream>, Status> {
        unimplemented()
    }

    async fn diff(
        &self,
        _: Request<Streaming<pb::DiffFleetRequest>>,
    ) -> Result<Response<pb::DiffFleetResponse>, Status> {
        unimplemented()
    }

    /// Two edges a page, whatever the page size asked: the prober must
    /// follow the tokens.
    async fn list_edges(
        &self,
        request: Request<pb::ListEdgesRequest>,
    ) -> Result<Response<pb::ListEdgesResponse>, Status> {
        let token = request.into_inner().page_token;
        let from: usize = if token.is_empty() {
            0
        } else {
            token
                .parse()
                .map_err(|_| Status::invalid_argument("bad page token"))?
        };
        let edges = &self.0.edges;
        let to = (from + 2).min(edges.len());
        Ok(Response::new(pb::ListEdgesResponse {
            edges: edges.get(from..to).unwrap_or_default().to_vec(),
            routing_version: 1,
            next_page_token: if to < edges.len() {
                to.to_string()
            } else {
                String::new()
            },
        }))
    }

    async fn list_domains(
        &self,
        _: Request<pb::ListDomainsRequest>,
    ) -> Result<Response<pb::ListDomainsResponse>, Status> {
        unimplemented()
    }

    async fn list_services(
        &self,
        _: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        unimplemented()
    }

    async fn list_groups(
        &self,
        _: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        unimplemented()
    }
}

#[tonic::async_trait]
impl SignalsService for Fake {
    async fn report_edge(
        &self,
        _: Request<Streaming<pb::EdgeReport>>,
    ) -> Result<Response<pb::ReportAck>, Status> {
        unimplemented()
    }

    async fn report_probes(
        &self,
        request: Request<Streaming<pb::ProbeBatch>>,
    ) -> Result<Response<pb::ReportAck>, Status> {
        let stream = self.0.streams.fetch_add(1, Ordering::SeqCst) + 1;
        let mut cut = self.0.cut.subscribe();
        let mut batches = request.into_inner();
        let mut accepted = 0;
        loop {
            tokio::select! {
                m = batches.message() => match m? {
                    Some(batch) => {
                        accepted += 1;
                        if let Ok(mut b) = self.0.batches.lock() {
                            b.push(Received { at: Instant::now(), stream, batch });
                        }
                    }
                    None => return Ok(Response::new(pb::ReportAck { accepted })),
                },
                _ = cut.changed() => return Err(Status::unavailable("stream cut by the test")),
            }
        }
    }
}

/// The fake control plane, on a runtime of its own so that a restart can
/// drop every connection at once, like a crash.
struct ControlPlane {
    state: Arc<State>,
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl ControlPlane {
    fn start(state: Arc<State>, addr: SocketAddr) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(addr))
            .with_context(|| format!("bind {addr}"))?;
        let addr = listener.local_addr()?;
        let fake = Fake(state.clone());
        runtime.spawn(
            tonic::transport::Server::builder()
                .add_service(FleetServiceServer::new(fake.clone()))
                .add_service(SignalsServiceServer::new(fake))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        Ok(Self {
            state,
            addr,
            runtime: Some(runtime),
        })
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drops the server and every connection, then serves again on the same
    /// address.
    fn restart(&mut self) -> Result<()> {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        let (state, addr) = (self.state.clone(), self.addr);
        *self = eventually(
            Duration::from_secs(3),
            "rebinding the control plane",
            || Self::start(state.clone(), addr).ok(),
        )?;
        Ok(())
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// An HTTP target answering every request with `status` (then closing).
async fn http_target(status: Arc<AtomicU16>, requests: Arc<AtomicU64>) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (status, requests) = (status.clone(), requests.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut chunk = [0u8; 512];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
                if !head.starts_with(b"GET /healthz HTTP/1.1\r\n") {
                    return;
                }
                requests.fetch_add(1, Ordering::Relaxed);
                let code = status.load(Ordering::Relaxed);
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    Ok(addr)
}

fn edge(id: &str, health_check: String) -> pb::Edge {
    pb::Edge {
        id: id.into(),
        kind: "third_party".into(),
        health_check,
        ..pb::Edge::default()
    }
}

fn result<'a>(batch: &'a pb::ProbeBatch, edge: &str) -> Option<&'a pb::ProbeResult> {
    batch.results.iter().find(|r| r.edge == edge)
}

fn batches(state: &State) -> Vec<Received> {
    state.batches.lock().map(|b| b.clone()).unwrap_or_default()
}

/// The first batch received after `since` that satisfies `check`.
fn batch_after(
    state: &State,
    since: Instant,
    check: impl Fn(&Received) -> bool,
) -> Option<Received> {
    batches(state)
        .into_iter()
        .find(|r| r.at >= since && check(r))
}

#[test]
fn prober_reports_rounds_follows_changes_and_reconnects() -> Result<()> {
    let started = Instant::now();
    let targets = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let status = Arc::new(AtomicU16::new(200));
    let requests = Arc::new(AtomicU64::new(0));
    let web = targets.block_on(http_target(status.clone(), requests.clone()))?;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?
    };
    let state = Arc::new(State {
        edges: vec![
            edge("cdn-http", format!("http://{web}/healthz")),
            edge("cdn-tcp", closed.to_string()),
            edge("cdn-bad", "ftp://x".into()),
        ],
        batches: Mutex::new(Vec::new()),
        streams: AtomicU64::new(0),
        cut: watch::channel(0).0,
    });
    let mut cp = ControlPlane::start(state.clone(), "127.0.0.1:0".parse()?)?;

    let prober = Prober::start(
        &cp.url(),
        VANTAGE,
        &[
            "--interval",
            "500ms",
            "--timeout",
            "300ms",
            "--refresh",
            "500ms",
            "--allow-targets",
            "127.0.0.0/8,::1/128",
        ],
    )?;

    // Results: ok, refused, bad health check.
    let first = eventually(Duration::from_secs(5), "a first batch", || {
        batches(&state).into_iter().next()
    })
    .with_context(|| prober.process.log())?;
    let b = &first.batch;
    ensure!(b.vantage_id == VANTAGE, "{b:?}");
    ensure!(b.results.len() == 3, "{b:?}");
    let http = result(b, "cdn-http").context("cdn-http")?;
    ensure!(http.ok && http.error.is_empty(), "{http:?}");
    ensure!(http.latency_ms > 0.0 && http.at_unix_ms > 0, "{http:?}");
    let tcp = result(b, "cdn-tcp").context("cdn-tcp")?;
    ensure!(
        !tcp.ok && tcp.error == "connect: connection refused",
        "{tcp:?}"
    );
    let bad = result(b, "cdn-bad").context("cdn-bad")?;
    ensure!(
        !bad.ok
            && bad
                .error
                .starts_with("bad health_check \"ftp://x\": unsupported scheme"),
        "{bad:?}"
    );
    ensure!(requests.load(Ordering::Relaxed) > 0, "no GET /healthz seen");

    // About one batch per interval, on one stream, rounds not drifting:
    // six batches in a row keep the cadence. A stall of the whole machine
    // (a shared CI host) can delay one round; the next six must then hold.
    let steady = |window: &[Received]| -> Result<(), String> {
        if !window.iter().all(|r| r.stream == 1) {
            return Err("more than one stream".into());
        }
        let spread = window[5].at - window[0].at;
        if spread < INTERVAL * 4 || spread > INTERVAL * 7 {
            return Err(format!("5 rounds took {spread:?}"));
        }
        for pair in window.windows(2) {
            let gap = pair[1].batch.results[0].at_unix_ms - pair[0].batch.results[0].at_unix_ms;
            if !(350..=800).contains(&gap) {
                return Err(format!("rounds {gap} ms apart"));
            }
        }
        Ok(())
    };
    let mut last = String::new();
    eventually(Duration::from_secs(10), "six steady batches", || {
        let b = batches(&state);
        if b.len() < 6 {
            return None;
        }
        match steady(&b[b.len() - 6..]) {
            Ok(()) => Some(()),
            Err(e) => {
                last = e;
                None
            }
        }
    })
    .with_context(|| format!("last window: {last}"))?;

    // The target turns 503: failed within two intervals.
    status.store(503, Ordering::Relaxed);
    let switched = Instant::now();
    let failed = eventually(INTERVAL * 2 + Duration::from_millis(250), "a 503", || {
        batch_after(&state, switched, |r| {
            result(&r.batch, "cdn-http").is_some_and(|h| !h.ok && h.error == "status 503")
        })
    })?;
    ensure!(
        failed.at - switched <= INTERVAL * 2 + Duration::from_millis(250),
        "{:?}",
        failed.at - switched
    );
    status.store(200, Ordering::Relaxed);

    // The stream is cut: the prober opens another and goes on.
    state.cut.send_modify(|n| *n += 1);
    let cut = Instant::now();
    eventually(Duration::from_secs(4), "a batch on a new stream", || {
        batch_after(&state, cut, |r| r.stream >= 2)
    })
    .with_context(|| prober.process.log())?;

    // The control plane restarts (every connection dropped): same again,
    // and the target is seen ok again.
    let before = state.streams.load(Ordering::SeqCst);
    cp.restart()?;
    let restarted = Instant::now();
    let after = eventually(Duration::from_secs(5), "a batch after the restart", || {
        batch_after(&state, restarted, |r| {
            r.stream > before && result(&r.batch, "cdn-http").is_some_and(|h| h.ok)
        })
    })
    .with_context(|| prober.process.log())?;
    ensure!(after.batch.vantage_id == VANTAGE);

    // Metrics and logs.
    ensure!(prober.metric("sextant_probe_targets ")? == Some(3.0));
    ensure!(prober.metric("sextant_probe_rounds_total ")?.unwrap_or(0.0) >= 8.0);
    ensure!(
        prober
            .metric("sextant_probe_results_total{result=\"ok\"} ")?
            .unwrap_or(0.0)
            >= 8.0
    );
    ensure!(
        prober
            .metric("sextant_probe_results_total{result=\"fail\"} ")?
            .unwrap_or(0.0)
            >= 16.0
    );
    ensure!(prober
        .metric("sextant_probe_batches_dropped_total ")?
        .is_some());
    let (code, body) = sextant_tests::http_get(prober.admin, "/healthz")?;
    ensure!(
        code == 200 && body.contains("probing 3 targets"),
        "{code} {body}"
    );

    let log = prober.process.log();
    ensure!(
        log.contains(&format!("probing 3 targets from vantage {VANTAGE}")),
        "{log}"
    );
    let warns = |edge: &str, what: &str| {
        log.lines()
            .filter(|l| {
                l.contains("WARN") && l.contains(what) && l.contains(&format!("edge={edge}"))
            })
            .count()
    };
    // Failing targets are told once, not every round.
    ensure!(warns("cdn-tcp", "probe failing") == 1, "{log}");
    ensure!(warns("cdn-bad", "probe failing") == 1, "{log}");
    ensure!(warns("cdn-http", "probe failing") == 1, "{log}");
    ensure!(warns("cdn-http", "probe ok again") == 1, "{log}");

    prober.process.stop()?;
    ensure!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    Ok(())
}
