//! The HTTP reverse proxy: forwards each request to an origin picked by the
//! pushed weights, with connection reuse and passive health.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http_body_util::{Either, Empty, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::subscriber::Applied;
use crate::upstream::{Endpoints, Upstream};

/// The config in service, swapped atomically; requests in flight keep the
/// version they started with.
pub type Current = ArcSwapOption<Applied<Upstream>>;

type ClientBody = Either<Incoming, Empty<Bytes>>;
/// What the proxy answers with: the origin's body, or its own short text.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// Counters shared by the proxy, the reporter and the metrics.
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: AtomicU64,
    /// Responses by class: 1xx..5xx at index 1..5; index 0 unused.
    pub responses: [AtomicU64; 6],
    /// Requests that got no origin response (connect errors, timeouts).
    pub upstream_errors: AtomicU64,
    pub response_bytes: AtomicU64,
    pub active_connections: AtomicI64,
    pub ejections: AtomicU64,
}

/// Everything a request needs.
#[derive(Debug)]
pub struct Proxy {
    pub node_id: String,
    pub current: Arc<Current>,
    pub endpoints: Arc<Endpoints>,
    pub stats: Arc<Stats>,
    client: Client<HttpConnector, ClientBody>,
    pub upstream_timeout: Duration,
}

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for h in HOP_BY_HOP {
        headers.remove(h);
    }
}

fn text(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Proxy {
    pub fn new(
        node_id: String,
        current: Arc<Current>,
        endpoints: Arc<Endpoints>,
        stats: Arc<Stats>,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(1024)
            .build(connector);
        Self {
            node_id,
            current,
            endpoints,
            stats,
            client,
            upstream_timeout: Duration::from_secs(30),
        }
    }

    fn count(&self, status: StatusCode) {
        let class = (status.as_u16() / 100) as usize;
        if let Some(c) = self.stats.responses.get(class) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Handles one request.
    pub async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<ProxyBody> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let resp = self.forward(req, peer).await;
        self.count(resp.status());
        if let Some(len) = resp
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        {
            self.stats.response_bytes.fetch_add(len, Ordering::Relaxed);
        }
        resp
    }

    async fn forward(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<ProxyBody> {
        let Some(cfg) = self.current.load_full() else {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "sextant-edge: no config yet\n".into(),
            );
        };
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let xff = match parts
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
        {
            Some(prev) => format!("{prev}, {}", peer.ip()),
            None => peer.ip().to_string(),
        };
        if let Ok(v) = HeaderValue::from_str(&xff) {
            parts.headers.insert("x-forwarded-for", v);
        }
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        // Requests without a body can be retried on another origin.
        let bodyless = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS)
            && parts
                .headers
                .get(hyper::header::CONTENT_LENGTH)
                .is_none_or(|v| v.as_bytes() == b"0")
            && !parts.headers.contains_key(hyper::header::TRANSFER_ENCODING);
        let mut body = Some(body);
        let mut tried: Option<String> = None;
        for attempt in 0..2 {
            let Some(origin) = cfg.value.pick(tried.as_deref()) else {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "sextant-edge: no origin available\n".into(),
                );
            };
            let Some(ep) = origin.pick() else {
                continue;
            };
            let uri: Uri = match format!("http://{}{path}", ep.addr).parse() {
                Ok(u) => u,
                Err(e) => return text(StatusCode::BAD_REQUEST, format!("bad request path: {e}\n")),
            };
            let mut up = Request::builder()
                .method(parts.method.clone())
                .uri(uri)
                .version(hyper::Version::HTTP_11);
            if let Some(h) = up.headers_mut() {
                *h = parts.headers.clone();
            }
            let b: ClientBody = match (bodyless, body.take()) {
                (false, Some(b)) => Either::Left(b),
                _ => Either::Right(Empty::new()),
            };
            let Ok(up) = up.body(b) else {
                return text(StatusCode::BAD_REQUEST, "bad request\n".into());
            };
            match tokio::time::timeout(self.upstream_timeout, self.client.request(up)).await {
                Ok(Ok(resp)) => {
                    if resp.status().is_server_error() {
                        if ep.failure(now_ms()) {
                            self.stats.ejections.fetch_add(1, Ordering::Relaxed);
                            warn!(origin = %origin.id, endpoint = %ep.addr, "endpoint ejected after a run of 5xx");
                        }
                    } else {
                        ep.success();
                    }
                    let (mut rparts, rbody) = resp.into_parts();
                    strip_hop_by_hop(&mut rparts.headers);
                    if let Ok(v) = HeaderValue::from_str(&origin.id) {
                        rparts.headers.insert("x-sextant-origin", v);
                    }
                    return Response::from_parts(rparts, Either::Left(rbody));
                }
                Ok(Err(e)) => {
                    self.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
                    if ep.failure(now_ms()) {
                        self.stats.ejections.fetch_add(1, Ordering::Relaxed);
                        warn!(origin = %origin.id, endpoint = %ep.addr, error = %e, "endpoint ejected");
                    }
                    debug!(origin = %origin.id, endpoint = %ep.addr, error = %e, attempt, "upstream request failed");
                    if !bodyless || attempt == 1 {
                        return text(
                            StatusCode::BAD_GATEWAY,
                            format!(
                                "sextant-edge: origin {} ({}) failed: {e}\n",
                                origin.id, ep.addr
                            ),
                        );
                    }
                    tried = Some(origin.id.clone());
                }
                Err(_) => {
                    self.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
                    ep.failure(now_ms());
                    return text(
                        StatusCode::GATEWAY_TIMEOUT,
                        format!(
                            "sextant-edge: origin {} ({}) timed out\n",
                            origin.id, ep.addr
                        ),
                    );
                }
            }
        }
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            "sextant-edge: no healthy origin endpoint\n".into(),
        )
    }
}

/// Serves HTTP/1.1 and HTTP/2 (prior knowledge) on `listener` until
/// `shutdown` turns true.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => {
                info!("proxy stopped accepting");
                return;
            }
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        tokio::spawn(async move {
            proxy
                .stats
                .active_connections
                .fetch_add(1, Ordering::Relaxed);
            let svc = {
                let proxy = proxy.clone();
                service_fn(move |req| {
                    let proxy = proxy.clone();
                    async move { Ok::<_, Infallible>(proxy.handle(req, peer).await) }
                })
            };
            let conn = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = conn.serve_connection(TokioIo::new(stream), svc).await {
                debug!(%peer, error = %e, "connection ended with an error");
            }
            proxy
                .stats
                .active_connections
                .fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Re-admits ejected endpoints once a TCP connect to them succeeds.
pub async fn readmit(endpoints: Arc<Endpoints>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        for ep in endpoints.ejected() {
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
