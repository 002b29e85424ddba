//! Small origin HTTP servers for end-to-end tests: each answers every
//! request with its own name, or with 500 when told to fail.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;

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
                    let svc = service_fn(move |_req| {
                        r.fetch_add(1, Ordering::Relaxed);
                        let mut resp = Response::new(Full::new(Bytes::from(format!("{n}\n"))));
                        if f.load(Ordering::Relaxed) {
                            *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                        }
                        async move { Ok::<_, std::convert::Infallible>(resp) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
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
