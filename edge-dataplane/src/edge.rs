//! `sextant-edge`: wires the subscriber, the proxy, the reporter and the
//! admin port together.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use ipnet::IpNet;
use sextant_proto::v1 as pb;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::access::{AccessLog, AccessLogError, Sink};
use crate::admin::{self, Admin};
use crate::proxy::{self, Proxy, Stats};
use crate::reporter::{self, ReporterConfig};
use crate::subscriber::{self, Options};
use crate::upstream::{Endpoints, UpstreamBuilder};

/// How to run an edge proxy.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    pub control_plane: String,
    /// TLS to the control plane (`None`: plaintext).
    pub tls: Option<sextant_tls::ClientTls>,
    pub node_id: String,
    pub site: String,
    pub listen: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub data_dir: PathBuf,
    /// Origin endpoints must be inside these ranges (empty: any).
    pub allow_upstream: Vec<IpNet>,
    pub capacity_rps: f64,
    pub report_interval: Duration,
    /// Proxy worker threads, each with its own listener (SO_REUSEPORT).
    pub workers: usize,
    /// How long a WebSocket tunnel may be silent both ways.
    pub websocket_idle: Duration,
    /// How long, once told to stop, the proxy lets open exchanges finish.
    pub shutdown_grace: Duration,
    /// Client connections open at once, all workers (0: no limit).
    pub max_connections: usize,
    /// Where to log each exchange (`None`: nowhere).
    pub access_log: Option<Sink>,
}

/// Why the edge could not start.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the data directory {dir}: {source}")]
    DataDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    AccessLog(#[from] AccessLogError),
}

/// Binds a TCP listener and logs `listening for WHAT on ADDR` with the
/// address actually bound (port 0 picks one).
pub(crate) async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, EdgeError> {
    let l = TcpListener::bind(addr)
        .await
        .map_err(|source| EdgeError::Bind { addr, source })?;
    let local = l
        .local_addr()
        .map_err(|source| EdgeError::Bind { addr, source })?;
    info!("listening for {what} on {local}");
    Ok(l)
}

/// Runs the edge until `shutdown` completes.
pub async fn run(config: EdgeConfig, shutdown: impl Future<Output = ()>) -> Result<(), EdgeError> {
    // First of all: SIGUSR1 (`systemctl reload`) must never stop an edge,
    // whether it has an access log to reopen or not.
    let usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
        .inspect_err(|e| warn!(error = %e, "cannot watch SIGUSR1"))
        .ok();
    std::fs::create_dir_all(&config.data_dir).map_err(|source| EdgeError::DataDir {
        dir: config.data_dir.clone(),
        source,
    })?;
    let access_log = match &config.access_log {
        Some(sink) => Some(Arc::new(AccessLog::open(sink.clone())?)),
        None => None,
    };
    let (stop_tx, stop) = watch::channel(false);
    let endpoints = Arc::new(Endpoints::default());
    let stats = Arc::new(Stats::default());
    let current: Arc<proxy::Current> = Arc::new(ArcSwapOption::empty());

    // Config: subscriber → watch → atomic swap for the hot path.
    let (cfg_tx, mut cfg_rx) = watch::channel(None);
    let builder = Arc::new(UpstreamBuilder {
        endpoints: endpoints.clone(),
        allowed: config.allow_upstream.clone(),
    });
    let opts = Options {
        control_plane: config.control_plane.clone(),
        node_id: config.node_id.clone(),
        kind: pb::NodeKind::Proxy,
        site: config.site.clone(),
        data_dir: config.data_dir.clone(),
        tls: config.tls.clone(),
    };
    tokio::spawn(subscriber::run(opts, builder, cfg_tx, stop.clone()));
    {
        let current = current.clone();
        tokio::spawn(async move {
            loop {
                let applied = cfg_rx.borrow_and_update().clone();
                current.store(applied);
                if cfg_rx.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    if let Some(addr) = config.admin {
        let l = bind(addr, "admin").await?;
        tokio::spawn(admin::serve(
            l,
            Admin {
                stats: stats.clone(),
                current: current.clone(),
                endpoints: endpoints.clone(),
                access_log: access_log.clone(),
            },
        ));
    }
    if let Some(s) = usr1 {
        tokio::spawn(reopen_on_sigusr1(s, access_log.clone()));
    }
    tokio::spawn(reporter::run(
        ReporterConfig {
            control_plane: config.control_plane.clone(),
            node_id: config.node_id.clone(),
            capacity_rps: config.capacity_rps,
            interval: config.report_interval,
            tls: config.tls.clone(),
        },
        stats.clone(),
        current.clone(),
        stop.clone(),
    ));
    tokio::spawn(proxy::readmit(endpoints.clone(), stop.clone()));

    // The proxy runs on its own worker threads, each with a listener of
    // its own on the same port (SO_REUSEPORT) and a single-threaded
    // runtime; the control work above stays on this runtime.
    let addr = config.listen;
    let listeners = proxy::bind_workers(addr, config.workers)
        .map_err(|source| EdgeError::Bind { addr, source })?;
    if let Some(l) = listeners.first() {
        let local = l
            .local_addr()
            .map_err(|source| EdgeError::Bind { addr, source })?;
        info!(workers = listeners.len(), "listening for http on {local}");
    }
    let mut p = Proxy::new(config.node_id.clone(), current, endpoints, stats);
    p.websocket_idle = config.websocket_idle;
    p.shutdown_grace = config.shutdown_grace;
    // Each worker takes its share (SO_REUSEPORT spreads connections evenly).
    p.connection_limit = config.max_connections.div_ceil(listeners.len().max(1));
    p.access_log = access_log.clone();
    let p = Arc::new(p);
    let workers = proxy::spawn_workers(listeners, p, stop.clone())
        .map_err(|source| EdgeError::Bind { addr, source })?;
    shutdown.await;
    info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = tokio::task::spawn_blocking(move || {
        for w in workers {
            let _ = w.join();
        }
    })
    .await;
    if let Some(log) = access_log {
        // Up to 5 s with a stuck sink: off the event loop.
        let _ = tokio::task::spawn_blocking(move || log.close()).await;
    }
    Ok(())
}

/// Opens the access log's file again on SIGUSR1 (after a rotation moved
/// it away, as with nginx). Without an access log the signal is ignored:
/// `systemctl reload` must never stop an edge.
async fn reopen_on_sigusr1(mut signals: tokio::signal::unix::Signal, log: Option<Arc<AccessLog>>) {
    while signals.recv().await.is_some() {
        match &log {
            Some(log) => log.reopen(),
            None => info!("SIGUSR1: no access log to reopen"),
        }
    }
}
