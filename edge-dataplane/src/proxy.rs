//! The HTTP reverse proxy: forwards each request to an origin picked by the
//! pushed weights, with connection reuse and passive health.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use http_body_util::{Either, Empty, Full};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::access::{AccessLog, Exchange};
use crate::h1proxy::Pool;
use crate::subscriber::Applied;
use crate::upstream::{
    mono_ms, mono_ms_at, EndpointState, Endpoints, Failed, Origin, Pick, Upstream,
};

/// The config in service, swapped atomically; requests in flight keep the
/// version they started with.
pub type Current = ArcSwapOption<Applied<Upstream>>;

type ClientBody = Either<Incoming, Empty<Bytes>>;
/// What the proxy answers with: the origin's body, or its own short text.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// Records a failure of `ep`, an endpoint of origin `origin`, for passive
/// health; an ejection it causes is counted and said.
fn endpoint_failed(stats: &Stats, origin: &str, ep: &EndpointState, why: &str) {
    if ep.failure(mono_ms()) {
        stats.ejections.fetch_add(1, Ordering::Relaxed);
        warn!(origin, endpoint = %ep.addr, why, "endpoint ejected");
    }
}

/// Counters shared by the proxy, the reporter and the metrics.
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: AtomicU64,
    /// Responses by class: 1xx..5xx at index 1..5; index 0 unused.
    pub responses: [AtomicU64; 6],
    /// Requests that got no origin response (connect errors, timeouts,
    /// answers cut or malformed), after any retry.
    pub upstream_errors: AtomicU64,
    /// Attempts sent to an ejected endpoint because none was healthy.
    pub panic_picks: AtomicU64,
    pub response_bytes: AtomicU64,
    pub active_connections: AtomicI64,
    pub ejections: AtomicU64,
    /// Client connections handed from the HTTP/1.1 fast path to hyper
    /// (HTTP/2, HTTP/1.0, chunked request bodies, `Expect`, `CONNECT`).
    pub handoffs: AtomicU64,
    /// Request heads refused as malformed or too large.
    pub bad_requests: AtomicU64,
    /// Times a worker stopped accepting, at its connection limit.
    pub connection_limit_hits: AtomicU64,
    /// WebSocket tunnels opened (an origin's 101), and those open now.
    pub websockets: AtomicU64,
    pub websockets_open: AtomicI64,
}

/// Everything a request needs.
#[derive(Debug)]
pub struct Proxy {
    pub node_id: String,
    pub current: Arc<Current>,
    pub endpoints: Arc<Endpoints>,
    pub stats: Arc<Stats>,
    pub upstream_timeout: Duration,
    pub connect_timeout: Duration,
    /// How long a WebSocket tunnel may carry no byte either way.
    pub websocket_idle: Duration,
    /// How long a stopping worker lets open connections finish.
    pub shutdown_grace: Duration,
    /// How long a request's head and body may take to arrive, from its
    /// first byte, on the HTTP/1.1 fast path (and a head, or the wait for
    /// one, on connections hyper serves over HTTP/1.x).
    pub request_timeout: Duration,
    /// How long a client connection may carry nothing (no request, answer
    /// or tunnel under way) before the edge closes it.
    pub client_idle: Duration,
    /// How long a write to a client may make no progress, on connections
    /// hyper serves (the fast path has the same limit, `CLIENT_IO`).
    pub client_write_timeout: Duration,
    /// Client connections one worker keeps open at once (0: no limit);
    /// past it, new ones wait in the listen backlog.
    pub connection_limit: usize,
    /// Where each exchange is logged, if anywhere.
    pub access_log: Option<Arc<AccessLog>>,
}

/// Fields that belong to one connection and are never forwarded
/// (RFC 9110 §7.6.1; `Trailer` is end-to-end since RFC 9110 §6.6.2).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in Connection are hop-by-hop too, except Host and
    // Content-Length, which a message cannot do without.
    if headers.contains_key(hyper::header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(hyper::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .filter(|n| n != hyper::header::HOST && n != hyper::header::CONTENT_LENGTH)
            .collect();
        for n in named {
            headers.remove(n);
        }
    }
    for h in HOP_BY_HOP {
        if headers.contains_key(h) {
            headers.remove(h);
        }
    }
}

/// Why a request is answered by the proxy itself instead of forwarded.
fn refuse(parts: &hyper::http::request::Parts) -> Option<(StatusCode, String)> {
    let bad = |what: String| Some((StatusCode::BAD_REQUEST, what));
    if parts.method == Method::CONNECT {
        // RFC 8441: HTTP/2's extended CONNECT carries a WebSocket; its
        // target is checked as any request's below.
        match parts.extensions.get::<hyper::ext::Protocol>() {
            Some(p) if p.as_str().eq_ignore_ascii_case("websocket") => {
                if parts.uri.authority().is_none() {
                    return bad("an extended CONNECT without :authority".into());
                }
            }
            Some(p) => {
                return Some((
                    StatusCode::NOT_IMPLEMENTED,
                    format!(
                        "CONNECT for {:?} is not served (only websocket)",
                        p.as_str()
                    ),
                ))
            }
            None => return Some((StatusCode::NOT_IMPLEMENTED, "CONNECT is not served".into())),
        }
    }
    if parts.uri.path() == "*" && parts.method != Method::OPTIONS {
        return bad(format!(
            "{} * (asterisk-form is for OPTIONS only)",
            parts.method
        ));
    }
    if let Some(a) = parts.uri.authority() {
        if a.as_str().contains('@') {
            return bad("userinfo in the request target".into());
        }
        if !crate::h1::valid_host(a.as_str().as_bytes()) {
            return bad(format!("invalid authority {:?}", a.as_str()));
        }
    }
    // RFC 9112 §3.2: one valid Host; HTTP/1.1 must send it.
    let hosts = parts.headers.get_all(hyper::header::HOST);
    let count = hosts.iter().count();
    if count > 1 || (count == 0 && parts.version == hyper::Version::HTTP_11) {
        return bad(crate::h1::HeadError::HostCount(count).to_string());
    }
    if let Some(h) = hosts.iter().find(|h| !crate::h1::valid_host(h.as_bytes())) {
        let e = crate::h1::HeadError::BadHost(String::from_utf8_lossy(h.as_bytes()).into());
        return bad(e.to_string());
    }
    // Only chunked is decoded; another coding would reach the origin as if
    // it were the content (RFC 9112 §6.1).
    unsupported_coding(&parts.headers).map(|e| (StatusCode::NOT_IMPLEMENTED, e))
}

/// Why a message's transfer coding cannot be passed on: anything but one
/// `chunked` (hyper removes only that, and the rest would pass for the
/// content).
fn unsupported_coding(headers: &HeaderMap) -> Option<String> {
    let mut te = headers.get_all(hyper::header::TRANSFER_ENCODING).iter();
    let v = te.next()?;
    if te.next().is_some() || !v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked") {
        let e =
            crate::h1::HeadError::BadTransferEncoding(String::from_utf8_lossy(v.as_bytes()).into());
        return Some(e.to_string());
    }
    None
}

/// Why an origin's answer cannot be passed on: a switch of protocols (no
/// Upgrade is forwarded, so none was asked for) or a transfer coding other
/// than chunked.
fn unpassable(resp: &Response<Incoming>) -> Option<String> {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        return Some(crate::h1::HeadError::UnexpectedUpgrade.to_string());
    }
    unsupported_coding(resp.headers())
}

/// A short answer of the proxy's own: `sextant-edge: WHAT`.
fn text(status: StatusCode, what: impl std::fmt::Display) -> Response<ProxyBody> {
    let what = what.to_string();
    let body = crate::h1::local_body(&what);
    let mut r = Response::new(Either::Right(Full::new(Bytes::from(body))));
    r.extensions_mut().insert(LocalAnswer(what));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// What a request that got no origin response is told about `origin`:
/// its id, never its endpoint (clients are not shown internal addresses;
/// the edge's debug log and metrics have them).
pub(crate) fn about(origin: &Origin, what: impl std::fmt::Display) -> String {
    format!("origin {} {what}", origin.id)
}

/// The answer when no origin is left to try: the first attempt's failure
/// (502) when there was one, else `none` (503).
pub(crate) fn gave_up(first_failure: Option<String>, none: &str) -> (StatusCode, String) {
    match first_failure {
        Some(e) => (StatusCode::BAD_GATEWAY, e),
        None => (StatusCode::SERVICE_UNAVAILABLE, none.to_owned()),
    }
}

/// Upstream connections owned by one client connection.
///
/// Each client connection keeps its own HTTP/1.1 connections to the origin
/// endpoints it has used and reuses them for its next requests: no shared
/// pool, no lock contention across connections, and a client's requests
/// keep their upstream connection warm. Connections that are busy (an
/// HTTP/2 client sending concurrent requests) make the next request open
/// another one.
pub struct UpstreamConns {
    idle: std::sync::Mutex<Vec<(SocketAddr, SendRequest<ClientBody>)>>,
    /// The client's address, and its IP as an `x-forwarded-for` value.
    peer: SocketAddr,
    peer_ip: HeaderValue,
    /// Cancelled when the worker stops.
    stopping: CancellationToken,
    /// WebSocket tunnels on this client connection (HTTP/2 streams).
    tunnels: Arc<AtomicUsize>,
    /// What is under way on it (requests, answers, tunnels).
    activity: Arc<Activity>,
}

/// WebSockets one HTTP/2 client connection may carry at once (each holds
/// an origin connection of its own), of its [`MAX_STREAMS`].
pub const MAX_TUNNELS_PER_CONNECTION: usize = 32;
/// Streams one HTTP/2 client connection may have open at once.
pub const MAX_STREAMS: u32 = 64;
/// The flow-control window of each HTTP/2 stream a client opens, and of
/// its connection: room for every stream's, so that streams whose origin
/// stops reading (a tunnel, an upload) stall only themselves, never the
/// connection's other streams.
const STREAM_WINDOW: u32 = 256 * 1024;
const CONNECTION_WINDOW: u32 = STREAM_WINDOW * MAX_STREAMS;

/// A tunnel's place on its client connection, given back when dropped;
/// the connection is not idle meanwhile.
struct TunnelSlot {
    count: Arc<AtomicUsize>,
    _busy: Busy,
}

impl Drop for TunnelSlot {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for UpstreamConns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamConns").finish_non_exhaustive()
    }
}

/// Why a request got no origin response.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("connect timed out")]
    ConnectTimeout,
    #[error("handshake: {0}")]
    Handshake(hyper::Error),
    #[error("{0}")]
    Request(hyper::Error),
}

impl UpstreamConns {
    /// The upstream connections of a new client connection from `peer`.
    pub fn new(peer: SocketAddr, stopping: CancellationToken) -> Self {
        Self {
            idle: std::sync::Mutex::new(Vec::new()),
            peer,
            peer_ip: HeaderValue::from_str(&peer.ip().to_string())
                .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
            stopping,
            tunnels: Arc::default(),
            activity: Arc::default(),
        }
    }

    /// A place for one more tunnel, if the connection has one.
    fn tunnel_slot(&self) -> Option<TunnelSlot> {
        let n = self.tunnels.fetch_add(1, Ordering::Relaxed);
        let slot = TunnelSlot {
            count: self.tunnels.clone(),
            _busy: Busy::new(&self.activity),
        };
        (n < MAX_TUNNELS_PER_CONNECTION).then_some(slot)
    }

    fn take(&self, addr: SocketAddr) -> Option<SendRequest<ClientBody>> {
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        idle.retain(|(_, s)| !s.is_closed());
        let i = idle.iter().position(|(a, s)| *a == addr && s.is_ready())?;
        Some(idle.swap_remove(i).1)
    }

    fn put(&self, addr: SocketAddr, sender: SendRequest<ClientBody>) {
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if idle.len() < 64 {
            idle.push((addr, sender));
        }
    }

    /// A new HTTP/1.1 connection to `addr`, driven by a task of its own
    /// (one a 101 hands to an upgrade, for a WebSocket).
    async fn connect<B>(
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<SendRequest<B>, UpstreamError>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let stream = dial(addr, timeout).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(UpstreamError::Handshake)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(%addr, error = %e, "upstream connection ended");
            }
        });
        Ok(sender)
    }

    /// Sends `req` to `addr` on a reused connection, or a new one. A reused
    /// connection that the origin had closed is retried once on a new
    /// connection (the request is handed back when it was not sent).
    async fn send(
        &self,
        addr: SocketAddr,
        req: Request<ClientBody>,
        connect_timeout: Duration,
    ) -> Result<Response<Incoming>, (UpstreamError, Option<Request<ClientBody>>)> {
        let mut req = req;
        if let Some(mut sender) = self.take(addr) {
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    self.put(addr, sender);
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    Some(back) => req = back,
                    None => return Err((UpstreamError::Request(e.into_error()), None)),
                },
            }
        }
        let mut sender = match Self::connect(addr, connect_timeout).await {
            Ok(s) => s,
            Err(e) => return Err((e, Some(req))),
        };
        match sender.try_send_request(req).await {
            Ok(resp) => {
                self.put(addr, sender);
                Ok(resp)
            }
            Err(mut e) => {
                let back = e.take_message();
                Err((UpstreamError::Request(e.into_error()), back))
            }
        }
    }
}

impl Proxy {
    pub fn new(
        node_id: String,
        current: Arc<Current>,
        endpoints: Arc<Endpoints>,
        stats: Arc<Stats>,
    ) -> Self {
        Self {
            node_id,
            current,
            endpoints,
            stats,
            upstream_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(2),
            websocket_idle: Duration::from_secs(300),
            shutdown_grace: Duration::from_secs(10),
            request_timeout: crate::h1proxy::CLIENT_IO,
            client_idle: crate::h1proxy::CLIENT_IDLE,
            client_write_timeout: crate::h1proxy::CLIENT_IO,
            connection_limit: 0,
            access_log: None,
        }
    }

    /// Counts a response by its status class.
    pub fn count_status(&self, status: u16) {
        if let Some(c) = self.stats.responses.get(usize::from(status / 100)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records a request that got no response from `ep` (passive health).
    pub fn upstream_failed(&self, origin: &Origin, ep: &EndpointState, error: &str) {
        origin.stats.failures.fetch_add(1, Ordering::Relaxed);
        endpoint_failed(&self.stats, &origin.id, ep, error);
        debug!(origin = %origin.id, endpoint = %ep.addr, error, "upstream request failed");
    }

    /// Counts an attempt sent to an ejected endpoint (none was healthy).
    pub fn note_pick(&self, pick: &Pick<'_>) {
        if pick.panic {
            self.stats.panic_picks.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records a 5xx answer from `ep` (passive health).
    pub fn endpoint_5xx(&self, origin: &Origin, ep: &EndpointState) {
        endpoint_failed(&self.stats, &origin.id, ep, "a run of 5xx");
    }

    /// Handles one request of a client connection.
    pub async fn handle(&self, conns: &UpstreamConns, req: Request<Incoming>) -> Response<Logged> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        // Logged as a client gone (499) should the connection end before
        // the answer is ready.
        let mut exchange = self.access_log.as_ref().map(|log| {
            let target = req
                .uri()
                .path_and_query()
                .map_or_else(|| req.uri().to_string(), |pq| pq.to_string());
            let method = req.method().as_str().as_bytes();
            let mut x = Exchange::begin(
                log,
                conns.peer,
                method,
                target.as_bytes(),
                version_name(req.version()),
            );
            x.error = Some(CLIENT_GONE.to_owned());
            Box::new(x)
        });
        let resp = self.forward(conns, req).await;
        if let Some(x) = &mut exchange {
            x.status = resp.status().as_u16();
            x.origin = resp
                .headers()
                .get("x-sextant-origin")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            x.error = resp.extensions().get::<LocalAnswer>().map(|a| a.0.clone());
        }
        let status = resp.status();
        self.count_status(status.as_u16());
        if matches!(
            status,
            StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT
        ) && resp.extensions().get::<LocalAnswer>().is_some()
        {
            // The request got no (usable) answer from any origin.
            self.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
        }
        let mut resp = resp;
        // A tunnel's exchange is logged when the tunnel ends.
        if let Some(slot) = resp.extensions_mut().remove::<TunnelLog>() {
            *slot.lock() = exchange.take();
        }
        let outcome = resp.extensions_mut().remove::<Outcome>();
        // An origin's body may pause at most `upstream_timeout` between
        // frames (the fast path's limit on each read of it).
        let idle = outcome.as_ref().map(|_| {
            (
                self.upstream_timeout,
                Box::pin(tokio::time::sleep(self.upstream_timeout)),
            )
        });
        resp.map(|inner| Logged {
            inner,
            exchange,
            stats: self.stats.clone(),
            outcome,
            idle,
            waiting: false,
            ended: false,
            stream: None,
        })
    }

    async fn forward(&self, conns: &UpstreamConns, req: Request<Incoming>) -> Response<ProxyBody> {
        let Some(cfg) = self.current.load_full() else {
            return text(StatusCode::SERVICE_UNAVAILABLE, "no config yet");
        };
        let (mut parts, body) = req.into_parts();
        if let Some((status, what)) = refuse(&parts) {
            self.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
            return text(status, what);
        }
        // Requests without a body can be retried on another origin. (An
        // HTTP/2 GET ending with an empty DATA frame has no body either.)
        let bodyless = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS)
            && !parts.headers.contains_key(hyper::header::TRANSFER_ENCODING)
            && parts
                .headers
                .get(hyper::header::CONTENT_LENGTH)
                .is_none_or(|v| v.as_bytes() == b"0");
        strip_hop_by_hop(&mut parts.headers);
        // A body of unknown length goes out chunked, also under a GET (for
        // which hyper would otherwise send no body at all).
        if !bodyless
            && !parts.headers.contains_key(hyper::header::CONTENT_LENGTH)
            && body.size_hint().exact().is_none()
        {
            parts.headers.insert(
                hyper::header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
        }
        // Every earlier hop, from every x-forwarded-for field, then the client.
        let prev: Vec<&str> = parts
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::trim)
            .collect();
        let xff = if prev.is_empty() {
            Some(conns.peer_ip.clone())
        } else {
            HeaderValue::from_str(&format!("{}, {}", prev.join(", "), conns.peer.ip())).ok()
        };
        if let Some(v) = xff {
            parts.headers.insert("x-forwarded-for", v);
        }
        // Origin-form request target. The target's authority (absolute
        // form, or an HTTP/2 client's :authority) replaces any Host sent
        // with it (RFC 9112 §3.2.2, RFC 9113 §8.3.1).
        if parts.uri.authority().is_some() || parts.uri.scheme().is_some() {
            // (`refuse` checked it is a valid Host.)
            if let Some(v) = parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            {
                parts.headers.insert(hyper::header::HOST, v);
            }
            parts.uri = parts
                .uri
                .path_and_query()
                .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
        }
        // It goes out as HTTP/1.1, which must have a Host: an HTTP/1.0
        // request without one gets an empty one.
        if !parts.headers.contains_key(hyper::header::HOST) {
            parts
                .headers
                .insert(hyper::header::HOST, HeaderValue::from_static(""));
        }
        if parts.method == Method::CONNECT {
            // (`refuse` let through only a WebSocket's extended CONNECT.)
            return self.websocket(conns, parts, &cfg.value).await;
        }
        parts.version = hyper::Version::HTTP_11;
        let body: ClientBody = if bodyless {
            Either::Right(Empty::new())
        } else {
            Either::Left(body)
        };
        let mut req = Some(Request::from_parts(parts, body));
        let mut tried: Option<Failed<'_>> = None;
        // The failure of the first attempt, said when nothing is left to
        // retry.
        let mut first_failure: Option<String> = None;
        for attempt in 0..2 {
            let Some(pick) = cfg.value.choose(tried) else {
                let (status, said) = gave_up(first_failure, "no origin available");
                return text(status, said);
            };
            let (origin, ep) = (pick.origin, pick.endpoint);
            self.note_pick(&pick);
            let Some(r) = req.take() else { break };
            let started = Instant::now();
            let sent = tokio::time::timeout(
                self.upstream_timeout,
                conns.send(ep.addr, r, self.connect_timeout),
            )
            .await;
            match sent {
                Ok(Ok(resp)) => {
                    if let Some(e) = unpassable(&resp) {
                        self.upstream_failed(origin, ep, &e);
                        return text(StatusCode::BAD_GATEWAY, about(origin, e));
                    }
                    origin
                        .stats
                        .answered(resp.status().as_u16(), started.elapsed());
                    return self.pass_on(resp, origin, ep, started);
                }
                Ok(Err((e, back))) => {
                    self.upstream_failed(origin, ep, &e.to_string());
                    match back {
                        Some(r) if attempt == 0 => {
                            req = Some(r);
                            first_failure = Some(about(origin, format_args!("failed: {e}")));
                            tried = Some(Failed {
                                origin: &origin.id,
                                endpoint: ep.addr,
                            });
                        }
                        _ => {
                            return text(
                                StatusCode::BAD_GATEWAY,
                                about(origin, format_args!("failed: {e}")),
                            )
                        }
                    }
                }
                Err(_) => {
                    self.upstream_failed(origin, ep, "timed out");
                    return text(StatusCode::GATEWAY_TIMEOUT, about(origin, "timed out"));
                }
            }
        }
        let (status, said) = gave_up(first_failure, "no healthy origin endpoint");
        text(status, said)
    }
}

impl Proxy {
    /// An origin's answer, on its way to the client. Its success is the
    /// endpoint's once its body has gone without an error (see `Logged`);
    /// a 5xx is the endpoint's failure now.
    fn pass_on(
        &self,
        resp: Response<Incoming>,
        origin: &Origin,
        ep: &Arc<EndpointState>,
        started: Instant,
    ) -> Response<ProxyBody> {
        let server_error = resp.status().is_server_error();
        if server_error {
            self.endpoint_5xx(origin, ep);
        }
        let (mut rparts, rbody) = resp.into_parts();
        rparts.extensions.insert(Outcome {
            endpoint: ep.clone(),
            origin: origin.stats.clone(),
            id: origin.header.clone(),
            success: !server_error,
            sent: started,
        });
        // A length sent with a transfer coding is not the length (RFC 9112
        // §6.3): the body is sent as decoded.
        if rparts
            .headers
            .contains_key(hyper::header::TRANSFER_ENCODING)
        {
            rparts.headers.remove(hyper::header::CONTENT_LENGTH);
        }
        strip_hop_by_hop(&mut rparts.headers);
        rparts
            .headers
            .insert("x-sextant-origin", origin.header.clone());
        Response::from_parts(rparts, Either::Left(rbody))
    }

    /// A WebSocket over an HTTP/2 stream (RFC 8441: an extended CONNECT,
    /// `:protocol` websocket; `parts` ready to forward, hop-by-hop fields
    /// gone). It goes to an origin picked by the weights as an HTTP/1.1
    /// handshake (RFC 6455) with a key of the edge's, on a connection of
    /// its own (retried once elsewhere when that connection cannot be
    /// made). On a 101 with that key's accept, the client gets a 200 and
    /// the stream and the connection are tunnelled, with the HTTP/1.1
    /// path's idle limit. An origin that declines is answered through as
    /// usual; a 2xx that is no switch is a 502, as a 2xx would open the
    /// tunnel.
    async fn websocket(
        &self,
        conns: &UpstreamConns,
        mut parts: hyper::http::request::Parts,
        upstream: &Upstream,
    ) -> Response<ProxyBody> {
        // No new WebSocket on a stopping worker: the grace would only cut
        // it.
        if conns.stopping.is_cancelled() {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "stopping: no new websockets here",
            );
        }
        let Some(slot) = conns.tunnel_slot() else {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                format_args!(
                    "this connection carries {MAX_TUNNELS_PER_CONNECTION} websockets already"
                ),
            );
        };
        let Some(client) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "this stream cannot carry a websocket",
            );
        };
        let key = websocket_key();
        let accept = crate::h1::websocket_accept(key.as_bytes());
        let mut headers = std::mem::take(&mut parts.headers);
        headers.remove(hyper::header::CONTENT_LENGTH);
        headers.remove(hyper::header::TRANSFER_ENCODING);
        headers.insert(
            hyper::header::CONNECTION,
            HeaderValue::from_static("upgrade"),
        );
        headers.insert(
            hyper::header::UPGRADE,
            HeaderValue::from_static("websocket"),
        );
        headers.insert("sec-websocket-key", key);
        let mut tried: Option<Failed<'_>> = None;
        let mut first_failure: Option<String> = None;
        loop {
            let Some(pick) = upstream.choose(tried) else {
                let (status, said) = gave_up(first_failure, "no origin available");
                return text(status, said);
            };
            let (origin, ep) = (pick.origin, pick.endpoint);
            self.note_pick(&pick);
            let mut req = Request::new(Empty::<Bytes>::new());
            *req.uri_mut() = parts.uri.clone();
            *req.headers_mut() = headers.clone();
            let started = Instant::now();
            let sent = tokio::time::timeout(self.upstream_timeout, async {
                let mut sender =
                    UpstreamConns::connect::<Empty<Bytes>>(ep.addr, self.connect_timeout).await?;
                sender
                    .send_request(req)
                    .await
                    .map_err(UpstreamError::Request)
            })
            .await;
            let e = match sent {
                Ok(Ok(resp)) => {
                    let status = resp.status();
                    if status == StatusCode::SWITCHING_PROTOCOLS {
                        let handshake = Handshake {
                            client,
                            slot,
                            accept,
                        };
                        return self.switched(resp, handshake, origin, ep, started);
                    }
                    origin.stats.answered(status.as_u16(), started.elapsed());
                    if status.is_success() {
                        // Not to be passed on: a 2xx would open the tunnel.
                        // Yet it is an answer (say, a page at that path),
                        // not the endpoint's failure: any client could send
                        // such handshakes.
                        return text(
                            StatusCode::BAD_GATEWAY,
                            about(
                                origin,
                                format_args!("answered a websocket handshake with {status}"),
                            ),
                        );
                    }
                    return self.pass_on(resp, origin, ep, started);
                }
                Ok(Err(e)) => e,
                Err(_) => {
                    self.upstream_failed(origin, ep, "timed out");
                    return text(StatusCode::GATEWAY_TIMEOUT, about(origin, "timed out"));
                }
            };
            self.upstream_failed(origin, ep, &e.to_string());
            let said = about(origin, format_args!("failed: {e}"));
            let unsent = matches!(e, UpstreamError::Connect(_) | UpstreamError::ConnectTimeout);
            if !unsent || tried.is_some() {
                return text(StatusCode::BAD_GATEWAY, said);
            }
            first_failure = Some(said);
            tried = Some(Failed {
                origin: &origin.id,
                endpoint: ep.addr,
            });
        }
    }

    /// The origin's 101 to a WebSocket handshake: with the accept key of
    /// `accept`, the client's stream gets a 200 and, once both sides are
    /// upgraded, the tunnel; without it, a 502 (the origin did not read
    /// this handshake) and a failure of the endpoint.
    fn switched(
        &self,
        resp: Response<Incoming>,
        handshake: Handshake,
        origin: &Origin,
        ep: &Arc<EndpointState>,
        started: Instant,
    ) -> Response<ProxyBody> {
        let Handshake {
            client,
            slot,
            accept,
        } = handshake;
        let fine = resp
            .headers()
            .get(hyper::header::UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
            && resp
                .headers()
                .get("sec-websocket-accept")
                .is_some_and(|v| v.as_bytes() == accept.as_slice());
        if !fine {
            let e = "switched protocols without this handshake's websocket accept key";
            self.upstream_failed(origin, ep, e);
            return text(StatusCode::BAD_GATEWAY, about(origin, e));
        }
        origin.stats.answered(101, started.elapsed());
        ep.success(mono_ms_at(started));
        let (mut rparts, _) = resp.into_parts();
        let upstream = rparts.extensions.remove::<hyper::upgrade::OnUpgrade>();
        strip_hop_by_hop(&mut rparts.headers);
        for h in ["sec-websocket-accept", "content-length"] {
            rparts.headers.remove(h);
        }
        rparts
            .headers
            .insert("x-sextant-origin", origin.header.clone());
        rparts.status = StatusCode::OK;
        let log = TunnelLog::default();
        rparts.extensions.insert(log.clone());
        let (stats, idle, addr) = (self.stats.clone(), self.websocket_idle, ep.addr);
        tokio::spawn(async move {
            let _slot = slot;
            let Some(upstream) = upstream else { return };
            // The client's side is ready once the 200 has gone, by when
            // `handle` has left the exchange in `log`.
            let (client, upstream) = tokio::join!(client, upstream);
            let mut exchange = log.lock().take();
            let why = match (client, upstream) {
                (Ok(client), Ok(upstream)) => {
                    let noted = exchange.as_deref_mut().map(|x| &mut x.bytes);
                    h2_tunnel(&stats, idle, client, upstream, noted).await
                }
                (c, u) => {
                    if let (Err(_), Some(x)) = (&c, exchange.as_deref_mut()) {
                        // The client went before its 200 did.
                        x.status = 499;
                    }
                    debug!(%addr, client = ?c.err(), origin = ?u.err(), "websocket not opened");
                    Some("websocket not opened".to_owned())
                }
            };
            if let Some(x) = exchange {
                x.finish(why.as_deref());
            }
        });
        Response::from_parts(rparts, Either::Right(Full::new(Bytes::new())))
    }
}

/// What a WebSocket's tunnel needs once the origin has switched: the
/// client's side, its place on the connection, and the accept key that
/// proves the origin read this handshake.
struct Handshake {
    client: hyper::upgrade::OnUpgrade,
    slot: TunnelSlot,
    accept: crate::h1::WebSocketAccept,
}

/// Where `handle` leaves a tunnel's exchange, for the tunnel to log when
/// it ends.
#[derive(Debug, Clone, Default)]
struct TunnelLog(Arc<Mutex<Option<Box<Exchange>>>>);

impl TunnelLog {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Box<Exchange>>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A fresh `Sec-WebSocket-Key`: 16 random bytes in base64.
fn websocket_key() -> HeaderValue {
    use base64::Engine as _;
    let nonce: [u8; 16] = std::array::from_fn(|_| fastrand::u8(..));
    let key = base64::engine::general_purpose::STANDARD.encode(nonce);
    HeaderValue::from_str(&key).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Carries a WebSocket between a client's HTTP/2 stream and an origin's
/// connection (see [`crate::tunnel::splice`]). A failure, or a write
/// stalled past the idle time, resets the origin connection; the stream
/// then ends (hyper cannot reset an upgraded stream; a WebSocket client
/// sees its end without a close frame, an abnormal closure). An idle
/// tunnel is closed cleanly.
async fn h2_tunnel(
    stats: &Stats,
    idle: Duration,
    client: hyper::upgrade::Upgraded,
    upstream: hyper::upgrade::Upgraded,
    mut noted: Option<&mut u64>,
) -> Option<String> {
    use crate::tunnel::{splice, Ends, Gauge, Tunnel};
    stats.websockets.fetch_add(1, Ordering::Relaxed);
    let _open = Gauge::up(&stats.websockets_open);
    // The origin's socket itself (to reset it), and what hyper read past
    // the 101.
    let (upstream, early) = match upstream.downcast::<TokioIo<tokio::net::TcpStream>>() {
        Ok(p) => (p.io.into_inner(), p.read_buf),
        Err(_) => {
            debug!("websocket origin connection of an unknown kind");
            return Some("websocket not opened".to_owned());
        }
    };
    stats
        .response_bytes
        .fetch_add(early.len() as u64, Ordering::Relaxed);
    if let Some(b) = noted.as_deref_mut() {
        *b += early.len() as u64;
    }
    let (mut client_rx, mut client_tx) = tokio::io::split(TokioIo::new(client));
    let mut upstream = upstream;
    let (mut origin_rx, mut origin_tx) = upstream.split();
    let (mut cbuf, mut obuf) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    let ended = splice(
        idle,
        Ends {
            rx: &mut client_rx,
            tx: &mut client_tx,
            buf: &mut cbuf,
            first: &early,
        },
        Ends {
            rx: &mut origin_rx,
            tx: &mut origin_tx,
            buf: &mut obuf,
            first: &[],
        },
        Some(crate::tunnel::HALF_CLOSED_IDLE),
        &stats.response_bytes,
        noted,
    )
    .await;
    let why = match ended {
        Tunnel::Done => return None,
        Tunnel::ClientEnded => {
            debug!("websocket client ended: closed");
            return Some("websocket client ended: closed".to_owned());
        }
        Tunnel::Idle => {
            debug!("websocket idle: closed");
            return Some("websocket idle: closed".to_owned());
        }
        Tunnel::Stalled => "websocket write stalled".to_owned(),
        Tunnel::Failed(e) => format!("websocket broken: {e}"),
    };
    debug!("{why}: reset");
    let _ = socket2::SockRef::from(&upstream).set_linger(Some(Duration::ZERO));
    Some(why)
}

/// Serves HTTP/1.1 and HTTP/2 (prior knowledge) on `listener` until
/// `shutdown` turns true: HTTP/1.1 on the fast path ([`crate::h1proxy`]),
/// the rest in hyper. Origin connections are pooled per call (per worker).
/// Serves connections accepted on `listener` (at most
/// `proxy.connection_limit` at once) until `shutdown`; then it stops
/// accepting, lets each connection finish the exchange under way (idle
/// ones close at once; answers say `connection: close`; hyper's
/// connections shut down gracefully) and returns when all are done, or
/// once `proxy.shutdown_grace` has passed (what is left is reset).
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, mut shutdown: watch::Receiver<bool>) {
    let pool = Arc::new(Pool::default());
    // This worker's connections, the signal they watch to stop, and a
    // second handle on each socket to reset those the grace cuts.
    let mut open = JoinSet::new();
    let stop = CancellationToken::new();
    let sockets = Arc::new(Mutex::new(HashMap::new()));
    let mut next_id: u64 = 0;
    let slots =
        (proxy.connection_limit > 0).then(|| Arc::new(Semaphore::new(proxy.connection_limit)));
    {
        let (pool, mut shutdown) = (pool.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = tick.tick() => pool.sweep(),
                    _ = shutdown.changed() => return,
                }
            }
        });
    }
    loop {
        // At the limit, new connections wait in the kernel's backlog until
        // one of ours ends.
        let slot = match &slots {
            None => None,
            Some(s) => match s.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    proxy
                        .stats
                        .connection_limit_hits
                        .fetch_add(1, Ordering::Relaxed);
                    debug!(limit = proxy.connection_limit, "connection limit reached");
                    tokio::select! {
                        p = s.clone().acquire_owned() => p.ok(),
                        _ = shutdown.changed() => break,
                    }
                }
            },
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        // Connections that ended are reaped as new ones come.
        while open.try_join_next().is_some() {}
        next_id += 1;
        let conn = OpenConn::new(next_id, &stream, &sockets, &proxy.stats);
        let (proxy, pool, stop) = (proxy.clone(), pool.clone(), stop.clone());
        open.spawn(async move {
            crate::h1proxy::serve_connection(proxy, pool, stream, peer, stop).await;
            drop((conn, slot));
        });
    }
    drop(listener);
    stop.cancel();
    debug!(open = open.len(), "proxy worker stopped accepting");
    let finished = async { while open.join_next().await.is_some() {} };
    if tokio::time::timeout(proxy.shutdown_grace, finished)
        .await
        .is_err()
    {
        warn!(
            open = open.len(),
            "shutdown grace over: open connections reset"
        );
        // A reset, not a close: a body the close would delimit must not
        // look complete.
        for s in lock(&sockets).values() {
            let _ = s.set_linger(Some(Duration::ZERO));
        }
        open.shutdown().await;
    }
}

type Sockets = Mutex<HashMap<u64, socket2::Socket>>;

fn lock(sockets: &Sockets) -> std::sync::MutexGuard<'_, HashMap<u64, socket2::Socket>> {
    sockets
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// An open client connection, counted, with a second handle (a dup) on
/// its socket held by the worker while it lives.
struct OpenConn {
    id: u64,
    sockets: Arc<Sockets>,
    stats: Arc<Stats>,
}

impl OpenConn {
    fn new(
        id: u64,
        stream: &tokio::net::TcpStream,
        sockets: &Arc<Sockets>,
        stats: &Arc<Stats>,
    ) -> Self {
        if let Ok(dup) = socket2::SockRef::from(stream).try_clone() {
            lock(sockets).insert(id, dup);
        }
        stats.active_connections.fetch_add(1, Ordering::Relaxed);
        Self {
            id,
            sockets: sockets.clone(),
            stats: stats.clone(),
        }
    }
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        lock(&self.sockets).remove(&self.id);
        self.stats
            .active_connections
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves a client connection in hyper (HTTP/1.x or HTTP/2, told apart by
/// its first bytes).
pub async fn serve_hyper<I>(proxy: Arc<Proxy>, io: I, peer: SocketAddr, stop: CancellationToken)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let conns = Arc::new(UpstreamConns::new(peer, stop.clone()));
    let activity = conns.activity.clone();
    let idle_limit = proxy.client_idle;
    let io = WriteLimited {
        io,
        limit: proxy.client_write_timeout,
        stalled: None,
    };
    let head_limit = proxy.request_timeout;
    let (svc_conns, svc_activity) = (conns.clone(), activity.clone());
    let svc = service_fn(move |req| {
        let proxy = proxy.clone();
        let conns = svc_conns.clone();
        // Busy from the request's arrival to its answer's end.
        let busy = Busy::new(&svc_activity);
        async move {
            let resp = proxy.handle(&conns, req).await;
            Ok::<_, Infallible>(resp.map(|mut body| {
                body.stream = Some(busy);
                body
            }))
        }
    });
    let mut conn = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // A head (or the wait for the next one) within the request timeout.
    conn.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(head_limit);
    // WebSockets over HTTP/2 (RFC 8441); pings find a client gone silent
    // with streams open.
    conn.http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_PING)
        .keep_alive_timeout(H2_PING)
        .enable_connect_protocol()
        .max_concurrent_streams(MAX_STREAMS)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW);
    let conn = conn.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let mut closing = false;
    let ended = loop {
        let at = activity.idle_until(idle_limit);
        tokio::select! {
            // The connection first: a request whose bytes are already here
            // (handed off by the fast path) is read before the stop is
            // heeded.
            biased;
            r = conn.as_mut() => break r,
            () = stop.cancelled(), if !closing => {
                // Finish what is under way, take nothing new.
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            () = tokio::time::sleep_until(at), if !closing => {
                if activity.idle_until(idle_limit) <= tokio::time::Instant::now() {
                    debug!(%peer, "client connection idle: closed");
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    };
    if let Err(e) = ended {
        debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// A client connection whose writes fail once one has made no progress for
/// `limit` (a client that stops reading its answer), as the fast path's do.
struct WriteLimited<I> {
    io: I,
    limit: Duration,
    /// Since when a write has been waiting.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<I> WriteLimited<I> {
    /// After a write that made no progress: an error once that has lasted
    /// `limit`.
    fn waiting<T>(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<T>> {
        let limit = self.limit;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match std::future::Future::poll(timer.as_mut(), cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "a write to the client made no progress",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn done<T>(&mut self, r: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        self.stalled = None;
        r
    }
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteLimited<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteLimited<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.io).poll_write(cx, buf) {
            Poll::Pending => self.waiting(cx),
            r => self.done(r),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.io).poll_write_vectored(cx, bufs) {
            Poll::Pending => self.waiting(cx),
            r => self.done(r),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.io).poll_flush(cx) {
            Poll::Pending => self.waiting(cx),
            r => self.done(r),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.io).poll_shutdown(cx) {
            Poll::Pending => self.waiting(cx),
            r => self.done(r),
        }
    }
}

/// How often a quiet HTTP/2 client is pinged, and how long it has to answer.
const H2_PING: Duration = Duration::from_secs(20);

/// Requests (and their answers) under way on a client connection served by
/// hyper, and when the last one ended.
#[derive(Debug)]
struct Activity {
    start: tokio::time::Instant,
    busy: AtomicUsize,
    last_ms: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            start: tokio::time::Instant::now(),
            busy: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
        }
    }
}

impl Activity {
    /// When the connection will have been idle for `limit`, if nothing
    /// starts meanwhile (`limit` from now while something is under way).
    fn idle_until(&self, limit: Duration) -> tokio::time::Instant {
        if self.busy.load(Ordering::Relaxed) > 0 {
            return tokio::time::Instant::now() + limit;
        }
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + limit
    }
}

/// One request under way, from its head to its answer's end (or drop).
#[derive(Debug)]
struct Busy(Arc<Activity>);

impl Busy {
    fn new(a: &Arc<Activity>) -> Self {
        a.busy.fetch_add(1, Ordering::Relaxed);
        Self(a.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let ms = u64::try_from(self.0.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.last_ms.store(ms, Ordering::Relaxed);
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why the proxy answered a request itself (for the access log).
#[derive(Debug, Clone)]
struct LocalAnswer(String);

fn version_name(v: hyper::Version) -> &'static str {
    match v {
        hyper::Version::HTTP_09 => "HTTP/0.9",
        hyper::Version::HTTP_10 => "HTTP/1.0",
        hyper::Version::HTTP_11 => "HTTP/1.1",
        hyper::Version::HTTP_2 => "HTTP/2",
        hyper::Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/?",
    }
}

/// An answer's body that counts what it passes on and, when there is an
/// access log, logs the exchange when it is dropped: after its end, or
/// when the client went away (499) or the origin cut it.
#[derive(Debug)]
pub struct Logged {
    inner: ProxyBody,
    exchange: Option<Box<Exchange>>,
    /// Where the body bytes sent are counted.
    stats: Arc<Stats>,
    /// What the answer says of its origin endpoint, told once the body
    /// has ended or failed.
    outcome: Option<Outcome>,
    /// How long the origin's body may pause, and the timer.
    idle: Option<(Duration, Pin<Box<tokio::time::Sleep>>)>,
    /// The body has been found waiting on the origin since its last frame.
    waiting: bool,
    /// The body ended (hyper may drop it without reading on).
    ended: bool,
    /// Keeps its connection from being idle while it lives.
    stream: Option<Busy>,
}

impl Body for Logged {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let mut r: Poll<Option<Result<Frame<Bytes>, Self::Error>>> =
            Pin::new(&mut this.inner).poll_frame(cx).map_err(Into::into);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.stats
                        .response_bytes
                        .fetch_add(d.len() as u64, Ordering::Relaxed);
                }
                this.waiting = false;
            }
            Poll::Pending => {
                if let Some((limit, timer)) = &mut this.idle {
                    // The pause is timed from when the body was first
                    // found waiting on the origin, not from its last
                    // frame: hyper may not poll it while the client is
                    // slow to read.
                    if !this.waiting {
                        this.waiting = true;
                        timer.as_mut().reset(tokio::time::Instant::now() + *limit);
                    }
                    if std::future::Future::poll(timer.as_mut(), cx).is_ready() {
                        let e = format!("the origin's body paused for over {limit:?}");
                        r = Poll::Ready(Some(Err(e.into())));
                    }
                }
            }
            _ => {}
        }
        if let Poll::Ready(Some(Err(e))) = &r {
            // The origin cut its answer: a request without a (whole)
            // answer, and a failure of the endpoint (unless the answer,
            // a 5xx, already was one).
            this.idle = None;
            if let Some(o) = this.outcome.take() {
                this.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
                if o.success {
                    o.origin.failures.fetch_add(1, Ordering::Relaxed);
                    let id = o.id.to_str().unwrap_or("?");
                    endpoint_failed(&this.stats, id, &o.endpoint, &e.to_string());
                }
            }
        }
        if let Some(x) = &mut this.exchange {
            match &r {
                Poll::Ready(Some(Ok(f))) => {
                    x.bytes += f.data_ref().map_or(0, |d| d.len() as u64);
                    // Trailers end a body: hyper may not poll it again.
                    this.ended |= f.is_trailers();
                }
                Poll::Ready(Some(Err(e))) => x.error = Some(format!("the answer was cut: {e}")),
                Poll::Ready(None) => this.ended = true,
                Poll::Pending => {}
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An origin endpoint's part in an answer on hyper's path.
#[derive(Debug, Clone)]
struct Outcome {
    endpoint: Arc<EndpointState>,
    origin: Arc<crate::upstream::OriginStats>,
    id: HeaderValue,
    /// A success once the body has come whole (false for a 5xx, already
    /// counted as a failure).
    success: bool,
    /// When the request went to the endpoint.
    sent: Instant,
}

impl Drop for Logged {
    fn drop(&mut self) {
        // A body that came whole (or had nothing to come, as a HEAD's)
        // was a success of the endpoint; one the client left before its
        // end says nothing of it.
        if let Some(o) = self.outcome.take() {
            if o.success && (self.ended || self.inner.is_end_stream()) {
                o.endpoint.success(mono_ms_at(o.sent));
            }
        }
        if let Some(mut x) = self.exchange.take() {
            if !(self.ended || self.inner.is_end_stream() || x.error.is_some()) {
                x.status = 499;
                x.error = Some(CLIENT_GONE.to_owned());
            }
            x.finish(None);
        }
    }
}

const CLIENT_GONE: &str = "the client went away";

/// A connection to an origin endpoint within `limit`, Nagle off (both
/// paths write whole heads and bodies).
pub(crate) async fn dial(
    addr: SocketAddr,
    limit: Duration,
) -> Result<tokio::net::TcpStream, UpstreamError> {
    let stream = tokio::time::timeout(limit, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| UpstreamError::ConnectTimeout)?
        .map_err(UpstreamError::Connect)?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Binds `addr` once per worker with SO_REUSEPORT, so that the kernel
/// spreads connections across workers. With port 0, the first bind picks
/// the port and the others share it.
pub fn bind_workers(
    addr: SocketAddr,
    workers: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut out = Vec::new();
    let mut addr = addr;
    for _ in 0..workers.max(1) {
        let domain = if addr.is_ipv4() {
            socket2::Domain::IPV4
        } else {
            socket2::Domain::IPV6
        };
        let socket =
            socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        let listener: std::net::TcpListener = socket.into();
        if addr.port() == 0 {
            addr = listener.local_addr()?;
        }
        out.push(listener);
    }
    Ok(out)
}

/// Runs one proxy worker per listener, each on its own thread with a
/// single-threaded runtime (no work stealing on the request path).
pub fn spawn_workers(
    listeners: Vec<std::net::TcpListener>,
    proxy: Arc<Proxy>,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
    let mut threads = Vec::new();
    for (i, l) in listeners.into_iter().enumerate() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (proxy, shutdown) = (proxy.clone(), shutdown.clone());
        let t = std::thread::Builder::new()
            .name(format!("proxy-{i}"))
            .spawn(move || {
                rt.block_on(async move {
                    match TcpListener::from_std(l) {
                        Ok(listener) => serve(listener, proxy, shutdown).await,
                        Err(e) => warn!(error = %e, "proxy worker cannot use its listener"),
                    }
                });
            })?;
        threads.push(t);
    }
    Ok(threads)
}

/// Re-admits ejected endpoints whose ejection has run out (see
/// [`EndpointState`]) once a TCP connect to them succeeds.
pub async fn readmit(endpoints: Arc<Endpoints>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let now = mono_ms();
        for ep in endpoints
            .ejected()
            .into_iter()
            .filter(|e| e.due(now, endpoints.base_ejection))
        {
            let ok = matches!(
                tokio::time::timeout(
                    Duration::from_millis(500),
                    tokio::net::TcpStream::connect(ep.addr)
                )
                .await,
                Ok(Ok(_))
            );
            if ok {
                ep.readmit();
                info!(endpoint = %ep.addr, "endpoint re-admitted after a successful probe");
            } else {
                ep.probe_failed(mono_ms());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }
}
