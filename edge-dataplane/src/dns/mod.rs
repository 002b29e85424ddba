//! `sextant-dns`: an authoritative GeoDNS server for the zones of the
//! steered services, fed by the control plane's config stream.
//!
//! - [`table`]: what a config becomes (names, zones, LPM tables, prepared
//!   answers, weighted pickers), built once per version and swapped
//!   atomically; the one resolution function both paths use.
//! - [`lpm`]: client prefix lookup with ECS scopes; [`pick`]: weighted
//!   choice; [`geo`]: optional country/ASN map.
//! - [`udp`] + [`wire`]: one socket per thread (SO_REUSEPORT) and the fast
//!   path for the hot query shape; [`general`]: everything else on
//!   hickory-server (TCP through hickory's `Server`).
//! - [`admin`], [`metrics`]: `/healthz`, `/metrics`, `/debug/answer`.
//!
//! Static stability comes from the shared [`crate::subscriber`]: the last
//! good config is persisted and served at start-up, before the control
//! plane is reached; until some config is held, queries get SERVFAIL (so
//! resolvers try another name server).

pub mod admin;
pub mod general;
pub mod geo;
pub use sextant_core::lpm;
pub mod metrics;
pub mod pick;
pub mod sample;
pub mod table;
pub mod udp;
pub mod wire;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use prometheus_client::registry::Registry;
use sextant_proto::v1 as pb;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::subscriber::{self, Applied, Build, Options};
use geo::{GeoError, GeoMap};
use metrics::Metrics;
use table::Tables;

/// The config in service, swapped atomically.
pub type Current = ArcSwapOption<Applied<Tables>>;

/// What the serving threads and handlers share.
#[derive(Debug)]
pub struct Shared {
    pub current: Arc<Current>,
    pub metrics: Metrics,
}

/// Turns node configs into [`Tables`] (the subscriber's `Build`).
#[derive(Debug, Default)]
pub struct DnsBuilder {
    pub geo: Option<GeoMap>,
}

impl Build for DnsBuilder {
    type Output = Tables;

    fn build(&self, version: u64, config: &pb::NodeConfig) -> Result<Tables, String> {
        let started = Instant::now();
        let mut t = Tables::build(version, config, self.geo.as_ref())?;
        t.build_time = started.elapsed();
        let (v4, v6) = t.prefix_counts();
        info!(
            version,
            services = t.services.len(),
            groups = t.groups.len(),
            edges = t.edges.len(),
            prefixes_v4 = v4,
            prefixes_v6 = v6,
            lpm_mb = t.lpm_bytes() / (1 << 20),
            build_ms = t.build_time.as_millis() as u64,
            "dns tables built"
        );
        for w in t.warnings.iter().take(20) {
            warn!(version, "{w}");
        }
        if t.warnings.len() > 20 {
            warn!(version, more = t.warnings.len() - 20, "more warnings");
        }
        Ok(t)
    }
}

/// How to run a GeoDNS server.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    pub control_plane: String,
    /// TLS to the control plane (`None`: plaintext).
    pub tls: Option<sextant_tls::ClientTls>,
    pub node_id: String,
    pub site: String,
    /// UDP and TCP, same port (port 0: one free for both).
    pub listen: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub data_dir: PathBuf,
    /// UDP serving threads (one socket each).
    pub threads: usize,
    pub geo_map: Option<PathBuf>,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
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
    Geo(#[from] GeoError),
}

/// Runs the server until `shutdown` completes.
pub async fn run(config: DnsConfig, shutdown: impl Future<Output = ()>) -> Result<(), DnsError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| DnsError::DataDir {
        dir: config.data_dir.clone(),
        source,
    })?;
    let geo = match &config.geo_map {
        Some(p) => {
            let m = GeoMap::load(p)?;
            info!(path = %p.display(), prefixes = m.entries().len(), "geo map loaded");
            Some(m)
        }
        None => None,
    };
    let mut registry = Registry::with_prefix("sextant_dns");
    let shared = Arc::new(Shared {
        current: Arc::new(ArcSwapOption::empty()),
        metrics: Metrics::new(&mut registry),
    });
    let (stop_tx, stop_rx) = watch::channel(false);

    // Config: subscriber → watch → atomic swap.
    let (cfg_tx, mut cfg_rx) = watch::channel(None);
    let opts = Options {
        control_plane: config.control_plane.clone(),
        node_id: config.node_id.clone(),
        kind: pb::NodeKind::Dns,
        site: config.site.clone(),
        data_dir: config.data_dir.clone(),
        tls: config.tls.clone(),
    };
    tokio::spawn(subscriber::run(
        opts,
        Arc::new(DnsBuilder { geo }),
        cfg_tx,
        stop_rx.clone(),
    ));
    {
        let shared = shared.clone();
        tokio::spawn(async move {
            loop {
                let applied: Option<Arc<Applied<Tables>>> = cfg_rx.borrow_and_update().clone();
                if let Some(a) = &applied {
                    let m = &shared.metrics;
                    m.config_version
                        .set(i64::try_from(a.version).unwrap_or(i64::MAX));
                    m.config_from_disk.set(i64::from(a.from_disk));
                    m.config_build_seconds.set(a.value.build_time.as_secs_f64());
                    let (v4, v6) = a.value.prefix_counts();
                    for (fam, n) in [("ipv4", v4), ("ipv6", v6)] {
                        m.client_prefixes
                            .get_or_create(&vec![("family".into(), fam.into())])
                            .set(n as i64);
                    }
                    m.client_groups.set(a.value.groups.len() as i64);
                }
                shared.current.store(applied);
                if cfg_rx.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    if let Some(addr) = config.admin {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| DnsError::Bind { addr, source })?;
        let local = l
            .local_addr()
            .map_err(|source| DnsError::Bind { addr, source })?;
        info!("listening for admin on {local}");
        tokio::spawn(admin::serve(
            l,
            admin::Admin {
                shared: shared.clone(),
                registry,
            },
        ));
    }

    let threads = config.threads.max(1);
    let addr = config.listen;
    let (sockets, tcp) =
        udp::bind(addr, threads).map_err(|source| DnsError::Bind { addr, source })?;
    let local = tcp
        .local_addr()
        .map_err(|source| DnsError::Bind { addr, source })?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for (i, s) in sockets.into_iter().enumerate() {
        let (shared, stop) = (shared.clone(), stop.clone());
        let w = std::thread::Builder::new()
            .name(format!("dns-udp-{i}"))
            .spawn(move || udp::serve(s, shared, stop))
            .map_err(|source| DnsError::Bind { addr, source })?;
        workers.push(w);
    }
    let tcp =
        tokio::net::TcpListener::from_std(tcp).map_err(|source| DnsError::Bind { addr, source })?;
    let mut server = hickory_server::Server::new(general::Handler {
        shared: shared.clone(),
    });
    server.register_listener(tcp, Duration::from_secs(10), 64);
    info!(threads, "listening for dns on {local}");

    shutdown.await;
    info!("shutting down");
    let _ = stop_tx.send(true);
    stop.store(true, Ordering::Relaxed);
    let _ = server.shutdown_gracefully().await;
    let _ = tokio::task::spawn_blocking(move || {
        for w in workers {
            let _ = w.join();
        }
    })
    .await;
    Ok(())
}
