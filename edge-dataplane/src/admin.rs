//! The edge's admin port: `/healthz` and `/metrics` (Prometheus text), and
//! [`serve_with`], the admin server the other binaries share.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::access::AccessLog;
use crate::proxy::{Current, Stats};
use crate::upstream::{Endpoints, OriginStats};

/// One value of a labelled metric, read at scrape time.
#[derive(Debug)]
enum Value {
    Counter(u64),
    /// (sum, count, each bucket's own count with `+Inf` last).
    Histogram((f64, u64, Vec<(f64, u64)>)),
}

/// A metric family of one type read at scrape time: one value per label
/// set.
#[derive(Debug)]
struct Labelled(MetricType, Vec<(Vec<(String, String)>, Value)>);

impl EncodeMetric for Labelled {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for (labels, value) in &self.1 {
            let mut e = encoder.encode_family(labels)?;
            match value {
                Value::Counter(v) => e.encode_counter::<NoLabelSet, _, u64>(v, None)?,
                Value::Histogram((sum, count, buckets)) => {
                    e.encode_histogram::<NoLabelSet>(*sum, *count, buckets, None)?;
                }
            }
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        self.0
    }
}

/// What the admin port reports.
#[derive(Debug, Clone)]
pub struct Admin {
    pub stats: Arc<Stats>,
    pub current: Arc<Current>,
    pub endpoints: Arc<Endpoints>,
    pub access_log: Option<Arc<AccessLog>>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(0))
}

impl Admin {
    /// The metrics, read at scrape time.
    pub fn metrics(&self) -> String {
        let mut r = Registry::with_prefix("sextant_edge");
        let s = &self.stats;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        r.register(
            "requests",
            "Requests received",
            ConstCounter::new(load(&s.requests)),
        );
        r.register(
            "responses",
            "Responses by status class",
            Labelled(
                MetricType::Counter,
                (1..=5)
                    .map(|class| {
                        (
                            vec![("class".to_owned(), format!("{class}xx"))],
                            Value::Counter(load(&s.responses[class])),
                        )
                    })
                    .collect(),
            ),
        );
        r.register(
            "upstream_errors",
            "Requests that got no (usable) origin response, after any retry",
            ConstCounter::new(load(&s.upstream_errors)),
        );
        r.register(
            "response_bytes",
            "Response body bytes sent to clients",
            ConstCounter::new(load(&s.response_bytes)),
        );
        r.register(
            "handoffs",
            "Client connections handed from the HTTP/1.1 fast path to hyper (HTTP/2, HTTP/1.0, chunked request bodies, Expect, CONNECT)",
            ConstCounter::new(load(&s.handoffs)),
        );
        r.register(
            "connection_limit_hits",
            "Times a proxy worker stopped accepting, at its share of --max-connections",
            ConstCounter::new(load(&s.connection_limit_hits)),
        );
        r.register(
            "websockets",
            "WebSocket tunnels opened (an origin switched protocols)",
            ConstCounter::new(load(&s.websockets)),
        );
        r.register(
            "websockets_open",
            "WebSocket tunnels open now",
            ConstGauge::new(s.websockets_open.load(Ordering::Relaxed)),
        );
        r.register(
            "bad_requests",
            "Request heads refused as malformed or too large",
            ConstCounter::new(load(&s.bad_requests)),
        );
        r.register(
            "endpoint_ejections",
            "Origin endpoints ejected by passive health",
            ConstCounter::new(load(&s.ejections)),
        );
        r.register(
            "panic_picks",
            "Attempts sent to an ejected endpoint because no endpoint of any origin was healthy",
            ConstCounter::new(load(&s.panic_picks)),
        );
        r.register(
            "active_connections",
            "Client connections open",
            ConstGauge::new(s.active_connections.load(Ordering::Relaxed)),
        );
        r.register(
            "ejected_endpoints",
            "Origin endpoints ejected now",
            ConstGauge::new(self.endpoints.ejected().len() as i64),
        );
        let held = self.current.load_full();
        r.register(
            "config_version",
            "Config version held (0: none)",
            ConstGauge::new(
                held.as_ref()
                    .map_or(0, |c| i64::try_from(c.version).unwrap_or(i64::MAX)),
            ),
        );
        r.register(
            "config_age_seconds",
            "Seconds since the config held was accepted (-1: none)",
            ConstGauge::new(
                held.as_ref()
                    .map_or(-1.0, |c| (now_ms() - c.accepted_at_ms) as f64 / 1000.0),
            ),
        );
        r.register(
            "config_from_disk",
            "1 when serving the config persisted before the last restart",
            ConstGauge::new(i64::from(held.as_ref().is_some_and(|c| c.from_disk))),
        );
        let origins = self.endpoints.all_origin_stats();
        r.register(
            "origin_responses",
            "Answers from each origin, by status class",
            Labelled(
                MetricType::Counter,
                origins
                    .iter()
                    .flat_map(|(id, o)| {
                        (1..=5).map(move |class| {
                            (
                                vec![
                                    ("origin".to_owned(), id.clone()),
                                    ("class".to_owned(), format!("{class}xx")),
                                ],
                                Value::Counter(load(&o.responses[class])),
                            )
                        })
                    })
                    .collect(),
            ),
        );
        let per_origin = |kind, value: &dyn Fn(&OriginStats) -> Value| {
            Labelled(
                kind,
                origins
                    .iter()
                    .map(|(id, o)| (vec![("origin".to_owned(), id.clone())], value(o)))
                    .collect(),
            )
        };
        r.register(
            "origin_failures",
            "Requests each origin did not answer (connect errors, timeouts, answers cut or malformed)",
            per_origin(MetricType::Counter, &|o| Value::Counter(load(&o.failures))),
        );
        r.register(
            "origin_response_seconds",
            "Time from trying an origin endpoint (connecting included) to its response head",
            per_origin(MetricType::Histogram, &|o| {
                Value::Histogram(o.response_time.snapshot())
            }),
        );
        if let Some(log) = &self.access_log {
            r.register(
                "access_log_lines",
                "Exchanges logged to the access log (--access-log), written or lost",
                ConstCounter::new(log.lines()),
            );
            r.register(
                "access_log_lost_lines",
                "Access log lines lost: a write failed (disk full, no permission), or the sink took nothing while 8 MiB waited",
                ConstCounter::new(log.lost()),
            );
        }
        let mut out = String::new();
        match encode(&mut out, &r) {
            Ok(()) => out,
            Err(e) => format!("# cannot encode metrics: {e}\n"),
        }
    }

    fn respond(&self, uri: &Uri) -> (StatusCode, String) {
        match uri.path() {
            "/metrics" => (StatusCode::OK, self.metrics()),
            "/healthz" => match self.current.load_full() {
                Some(c) => (
                    StatusCode::OK,
                    format!("ok: config version {}\n", c.version),
                ),
                None => (StatusCode::SERVICE_UNAVAILABLE, "no config yet\n".into()),
            },
            _ => (StatusCode::NOT_FOUND, "not found\n".into()),
        }
    }
}

/// An admin answer with its content type: OpenMetrics text on
/// `/metrics` (what `prometheus_client` writes; Prometheus 3 refuses a
/// scrape without a content type), JSON for a JSON body, else plain text.
fn reply(path: &str, status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let kind = if path == "/metrics" && status == StatusCode::OK {
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    } else if body.starts_with('{') {
        "application/json"
    } else {
        "text/plain; charset=utf-8"
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(kind),
    );
    r
}

/// Serves the admin port forever.
pub async fn serve(listener: TcpListener, admin: Admin) {
    serve_with(listener, move |uri| admin.respond(uri)).await;
}

/// Serves an admin port forever, answering every request with the status
/// and text body `respond` gives for its URI (shared by the binaries).
pub async fn serve_with<F>(listener: TcpListener, respond: F)
where
    F: Fn(&Uri) -> (StatusCode, String) + Send + Sync + 'static,
{
    let respond = Arc::new(respond);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                continue;
            }
        };
        let respond = respond.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let (status, body) = respond(req.uri());
                let r = reply(req.uri().path(), status, body);
                async move { Ok::<_, std::convert::Infallible>(r) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!(%peer, error = %e, "admin connection ended");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Prometheus 3 refuses a scrape without a content type ("non-compliant
    /// scrape target sending blank Content-Type"). The body is OpenMetrics
    /// text (it ends with `# EOF`), and says so.
    #[tokio::test]
    async fn metrics_say_their_content_type() {
        let admin = Admin {
            stats: Arc::default(),
            current: Arc::new(Current::empty()),
            endpoints: Arc::default(),
            access_log: None,
        };
        let body = admin.metrics();
        assert!(body.ends_with("# EOF\n"), "OpenMetrics text: {body}");
        // Monotonic families are counters.
        for line in [
            "# TYPE sextant_edge_responses counter",
            "sextant_edge_responses_total{class=\"2xx\"} 0",
            "# TYPE sextant_edge_panic_picks counter",
        ] {
            assert!(body.contains(line), "no {line:?} in {body}");
        }
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(serve(l, admin));
        let text = get(addr, "/metrics").await;
        let head = &text[..text.find("\r\n\r\n").expect("head")];
        assert!(
            head.contains("content-type: application/openmetrics-text; version=1.0.0"),
            "no usable content-type:\n{head}"
        );
        let text = get(addr, "/healthz").await;
        assert!(text.starts_with("http/1.1 503"), "{text}");
        assert!(
            text.contains("content-type: text/plain; charset=utf-8"),
            "{text}"
        );
    }

    /// The whole answer to a GET of `path`, lowercased.
    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.expect("read");
        String::from_utf8_lossy(&out).to_ascii_lowercase()
    }
}
