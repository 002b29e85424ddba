//! Small origin HTTP servers for end-to-end tests: each answers every
//! request with its own name (`/slow` after [`SLOW`]), or with 500 when
//! told to fail, and accepts WebSockets (RFC 6455), answering each text
//! message `NAME: MESSAGE`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use futures::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Message, Role};
use tokio_tungstenite::WebSocketStream;

/// How long an origin takes to answer `/slow`.
pub const SLOW: std::time::Duration = std::time::Duration::from_secs(1);

/// A running origin.
#[derive(Debug)]
pub struct Origin {
    pub name: String,
    pub addr: SocketAddr,
    pub requests: Arc<AtomicU64>,
    pub failing: Arc<AtomicBool>,
    _runtime: tokio::runtime::Runtime,
}

impl Origin {
    /// Starts an origin on a free loopback port, on its own runtime.
    pub fn start(name: &str) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("origin runtime")?;
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let requests = Arc::new(AtomicU64::new(0));
        let failing = Arc::new(AtomicBool::new(false));
        let (n, r, f) = (name.to_owned(), requests.clone(), failing.clone());
        runtime.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (n, r, f) = (n.clone(), r.clone(), f.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let (n, r, f) = (n.clone(), r.clone(), f.clone());
                        async move {
                            r.fetch_add(1, Ordering::Relaxed);
                            if let Some(key) = websocket_key(&req) {
                                let accept = derive_accept_key(key.as_bytes());
                                tokio::spawn(echo(n, req));
                                return Response::builder()
                                    .status(StatusCode::SWITCHING_PROTOCOLS)
                                    .header("connection", "upgrade")
                                    .header("upgrade", "websocket")
                                    .header("sec-websocket-accept", accept)
                                    .body(Full::new(Bytes::new()))
                                    .map_err(|e| std::io::Error::other(e.to_string()));
                            }
                            if req.uri().path() == "/slow" {
                                tokio::time::sleep(SLOW).await;
                            }
                            let mut resp = Response::new(Full::new(Bytes::from(format!("{n}\n"))));
                            if f.load(Ordering::Relaxed) {
                                *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                            }
                            Ok(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Ok(Self {
            name: name.to_owned(),
            addr,
            requests,
            failing,
            _runtime: runtime,
        })
    }
}

/// The key of a WebSocket handshake, if `req` is one.
fn websocket_key(req: &Request<Incoming>) -> Option<String> {
    let h = req.headers();
    let upgrade = h.get("upgrade")?.to_str().ok()?;
    if !upgrade.eq_ignore_ascii_case("websocket") {
        return None;
    }
    Some(h.get("sec-websocket-key")?.to_str().ok()?.to_owned())
}

/// Once the 101 has gone out: answers each text message with
/// `NAME: MESSAGE` until the client closes.
async fn echo(name: String, req: Request<Incoming>) {
    let Ok(upgraded) = hyper::upgrade::on(req).await else {
        return;
    };
    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
    while let Some(Ok(m)) = ws.next().await {
        if let Message::Text(t) = m {
            if ws
                .send(Message::text(format!("{name}: {}", t.as_str())))
                .await
                .is_err()
            {
                return;
            }
        }
    }
}
