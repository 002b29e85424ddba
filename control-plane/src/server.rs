//! `sextant-cp`: opens the store, joins the cluster (campaigns for
//! leadership; with the embedded store it always wins), seeds the fleet on
//! first start, and serves gRPC and metrics.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use sextant_core::FleetSpec;
use sextant_proto::v1::bgp_service_server::BgpServiceServer;
use sextant_proto::v1::cluster_service_server::ClusterServiceServer;
use sextant_proto::v1::distribution_service_server::DistributionServiceServer;
use sextant_proto::v1::fleet_service_server::FleetServiceServer;
use sextant_proto::v1::operations_service_server::OperationsServiceServer;
use sextant_proto::v1::signals_service_server::SignalsServiceServer;
use sextant_proto::v1::steering_service_server::SteeringServiceServer;
use sextant_proto::v1::token_service_server::TokenServiceServer;
use sextant_store::embedded::EmbeddedStore;
use sextant_store::etcd::{EtcdOptions, EtcdStore};
use sextant_store::{Store, StoreError};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::{info, warn};

use crate::cluster::{self, ElectionConfig, Node, ReplicaInfo, Role};
use crate::control_loop::{Clock, Intent, OpError, SystemClock};
use crate::grpc::authn::{AuthLayer, Authenticator, Limits, Mode};
use crate::grpc::bgp::{BgpApi, MAX_RIB_BYTES};
use crate::grpc::cluster::ClusterApi;
use crate::grpc::distribution::{Distribution, DistributionApi};
use crate::grpc::fleet::FleetApi;
use crate::grpc::operations::OperationsApi;
use crate::grpc::signals::{Reports, SignalsApi};
use crate::grpc::steering::SteeringApi;
use crate::grpc::tokens::TokenApi;
use crate::metrics::{self, Metrics};
use crate::state::StateError;

/// Where the state lives.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    /// The embedded store, in `<data_dir>/store` (one replica).
    Embedded { data_dir: PathBuf },
    /// etcd, shared by every replica.
    Etcd {
        endpoints: Vec<String>,
        /// Key prefix inside etcd (several Sextants may share a cluster).
        namespace: String,
        /// Mutual TLS to etcd: the CA of etcd's certificate, and this
        /// replica's client certificate and key.
        tls: Option<EtcdTlsFiles>,
    },
}

/// TLS files for the etcd client.
#[derive(Debug, Clone)]
pub struct EtcdTlsFiles {
    pub ca: PathBuf,
    pub cert_and_key: Option<(PathBuf, PathBuf)>,
}

impl EtcdTlsFiles {
    fn read(&self) -> Result<sextant_store::etcd::EtcdTls, ServerError> {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|source| ServerError::ReadFile {
                what: "etcd TLS file",
                path: path.clone(),
                source,
            })
        };
        Ok(sextant_store::etcd::EtcdTls {
            ca_pem: read(&self.ca)?,
            identity: match &self.cert_and_key {
                Some((c, k)) => Some((read(c)?, read(k)?)),
                None => None,
            },
        })
    }
}

/// How to run the server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// gRPC address; port 0 picks a free port (logged).
    pub listen: SocketAddr,
    pub store: StoreConfig,
    /// Fleet file that seeds an empty store.
    pub fleet: Option<PathBuf>,
    /// Address for `/metrics` and `/healthz`.
    pub metrics: Option<SocketAddr>,
    /// This replica's name in `status`.
    pub replica_id: String,
    /// URL other replicas forward writes to (default: the bound address).
    pub advertise: Option<String>,
    /// A subscriber behind the current config for longer than this is
    /// flagged stale (status, metrics).
    pub stale_after: Duration,
    /// How long a subscriber holding a version newer than this replica's
    /// is sent nothing older (see `Distribution::ahead_grace`).
    pub ahead_grace: Duration,
    /// Leader lease TTL.
    pub lease_ttl: Duration,
    /// Time between the steps of a move held back by a policy's max_shift.
    pub shift_interval: Duration,
    /// Drain and drill settings: expiry, guardrails, blocking windows.
    pub workflow: crate::workflow::WorkflowConfig,
    /// Health verdicts: quorum, thresholds, damping.
    pub health: sextant_core::health::HealthConfig,
    /// How much capacity automated failover may remove.
    pub bounds: sextant_core::failover::Bounds,
    /// Who may call what.
    pub security: Security,
    /// BMP station address (anycast health from BGP); port 0 picks a free
    /// port (logged as `listening for bmp on ADDR`).
    pub bmp_listen: Option<SocketAddr>,
    pub bmp: crate::bmp::StationConfig,
}

/// How callers are authenticated and limited.
#[derive(Debug, Clone, Default)]
pub struct Security {
    /// Plaintext without authentication (`--insecure`).
    pub insecure: bool,
    /// Server certificate, key and the CA clients' certificates must chain
    /// to (re-read when the files change).
    pub tls: Option<sextant_tls::ServerTlsFiles>,
    /// Operators known by certificate: their roles and scopes.
    pub policy: Option<PathBuf>,
    pub limits: Limits,
}

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot open the store in {dir}: {source}")]
    Store {
        dir: PathBuf,
        #[source]
        source: StoreError,
    },
    #[error("cannot use etcd at {endpoints}: {source}")]
    Etcd {
        endpoints: String,
        #[source]
        source: StoreError,
    },
    #[error("cannot read the stored state: {0}")]
    State(#[from] StateError),
    #[error("cannot read fleet file {path}: {source}")]
    ReadFleet {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("fleet file {path}: {source}")]
    Fleet {
        path: PathBuf,
        #[source]
        source: OpError,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {what} {path}: {source}")]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(#[from] sextant_tls::TlsError),
    #[error("--insecure and --tls-* contradict each other: pick one")]
    InsecureAndTls,
    #[error("no transport security configured: give --tls-cert, --tls-key and --tls-client-ca, or --insecure for plaintext without authentication")]
    NoSecurity,
    #[error("cannot read policy file {path}: {source}")]
    ReadPolicy {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("policy file {path}: {source}")]
    Policy {
        path: PathBuf,
        #[source]
        source: crate::auth::PolicyError,
    },
    #[error("cannot build the reflection service: {0}")]
    Reflection(String),
    #[error("grpc server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

async fn open_store(config: &StoreConfig) -> Result<Arc<dyn Store>, ServerError> {
    Ok(match config {
        StoreConfig::Embedded { data_dir } => {
            let dir = data_dir.join("store");
            Arc::new(
                EmbeddedStore::open(&dir).map_err(|source| ServerError::Store { dir, source })?,
            )
        }
        StoreConfig::Etcd {
            endpoints,
            namespace,
            tls,
        } => {
            let options = EtcdOptions {
                namespace: namespace.clone(),
                tls: tls.as_ref().map(EtcdTlsFiles::read).transpose()?,
                ..EtcdOptions::default()
            };
            // Lazy: a replica starts (and serves what it can) while etcd is
            // away, and joins when it answers.
            Arc::new(
                EtcdStore::connect_lazy(endpoints, options)
                    .await
                    .map_err(|source| ServerError::Etcd {
                        endpoints: endpoints.join(","),
                        source,
                    })?,
            )
        }
    })
}

/// Reads and checks the `--fleet` file (a bad file stops the start).
fn read_fleet(path: &PathBuf) -> Result<FleetSpec, ServerError> {
    let text = std::fs::read_to_string(path).map_err(|source| ServerError::ReadFleet {
        path: path.clone(),
        source,
    })?;
    let fleet_err = |source: OpError| ServerError::Fleet {
        path: path.clone(),
        source,
    };
    let spec = FleetSpec::from_toml(&text).map_err(|e| fleet_err(e.into()))?;
    sextant_core::Fleet::from_spec(spec.clone()).map_err(|e| fleet_err(e.into()))?;
    Ok(spec)
}

/// Runs the control plane until `shutdown` completes.
pub async fn run(
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let seed_spec = config.fleet.as_ref().map(read_fleet).transpose()?;
    let mode = security_mode(&config.security)?;
    let tls = match &config.security.tls {
        Some(files) => Some(sextant_tls::ServerTls::load(files.clone())?),
        None => None,
    };
    let peer_tls = config
        .security
        .tls
        .as_ref()
        .map(|f| sextant_tls::ClientTls {
            ca: f.client_ca.clone(),
            cert: Some(f.cert.clone()),
            key: Some(f.key.clone()),
        });
    let store = open_store(&config.store).await?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let authenticator = Arc::new(Authenticator::new(
        mode,
        store.clone(),
        clock.clone(),
        config.security.limits,
    ));
    if authenticator.insecure() {
        warn!("--insecure: plaintext gRPC without authentication; anyone who can reach the port may drain, apply fleets and pose as an edge");
    }
    let started_at_ms = clock.now_ms();

    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?;
    let local = listener.local_addr().map_err(|source| ServerError::Bind {
        addr: config.listen,
        source,
    })?;
    let me = ReplicaInfo {
        id: config.replica_id.clone(),
        url: config.advertise.clone().unwrap_or_else(|| {
            let scheme = if tls.is_some() { "https" } else { "http" };
            format!("{scheme}://{local}")
        }),
        started_at_ms,
        software: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let reports = Arc::new(Reports::default());
    let node = cluster::start(
        store.clone(),
        clock.clone(),
        reports.clone(),
        me,
        ElectionConfig {
            lease_ttl: config.lease_ttl,
            loop_config: crate::control_loop::LoopConfig {
                shift_interval_ms: i64::try_from(config.shift_interval.as_millis())
                    .unwrap_or(i64::MAX),
                workflow: config.workflow.clone(),
                health: config.health.clone(),
                bounds: config.bounds,
                health_tick_ms: 500,
            },
        },
    )
    .with_peer_tls(peer_tls);
    // Seed on whichever replica leads, whenever it leads, if the store has
    // no fleet yet. Wait a little for the first election so that a single
    // replica serves its seeded fleet from its first answer.
    if let Some(spec) = seed_spec {
        let path = config.fleet.clone().unwrap_or_default();
        let seeding = tokio::spawn(seed_when_leading(node.clone(), spec, path));
        let first = tokio::time::timeout(Duration::from_secs(10), first_seed_attempt(&node)).await;
        if first.is_err() {
            warn!("no leader within 10 s; serving reads, the fleet is seeded when a leader is elected");
        }
        drop(seeding);
    } else {
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            settled(&node).await;
            node.loaded().await;
        })
        .await;
    }

    let distribution = Distribution::new(
        node.subscribe(),
        clock.clone(),
        config.ahead_grace,
        Some(node.store.clone()),
    );
    tokio::spawn(distribution.clone().follow());
    let stale_after_ms = u64::try_from(config.stale_after.as_millis()).unwrap_or(u64::MAX);

    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    authenticator.register_metrics(&mut registry);
    // Certificates are re-read when their files change: rotation without a
    // restart, established connections untouched.
    let _tls_watch = tls.as_ref().map(|t| {
        t.set_metrics(sextant_tls::TlsMetrics::register(&mut registry));
        t.spawn_watch(TLS_POLL)
    });
    // Observe once before anything can scrape, then follow.
    metrics.observe(&node.snapshot());
    tokio::spawn(metrics::follow(
        metrics.clone(),
        node.subscribe(),
        distribution.clone(),
        stale_after_ms,
    ));

    let station = match config.bmp_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Bind { addr, source })?;
            let bound = listener
                .local_addr()
                .map_err(|source| ServerError::Bind { addr, source })?;
            info!("listening for bmp on {bound}");
            if config.bmp.allow.is_empty() {
                warn!("BMP sessions are accepted from any address (BMP is not authenticated): set --bmp-allow to the routers' networks");
            }
            let station = crate::bmp::Station::new(config.bmp.clone(), &mut registry);
            tokio::spawn(station.clone().run(
                listener,
                node.clone(),
                reports.clone(),
                clock.clone(),
            ));
            Some(station)
        }
        None => None,
    };

    if let Some(addr) = config.metrics {
        let listener = metrics::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        tokio::spawn(metrics::serve(listener, Arc::new(registry)));
    }

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<FleetServiceServer<FleetApi>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sextant_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;

    let fleet = FleetApi {
        node: node.clone(),
        clock: clock.clone(),
        reports: reports.clone(),
        max_move_share: config.workflow.limits.max_move_share,
    };
    let steering = SteeringApi {
        node: node.clone(),
        store: store.clone(),
        clock: clock.clone(),
    };
    let operations = OperationsApi {
        node: node.clone(),
        store: store.clone(),
        clock: clock.clone(),
        distribution: distribution.clone(),
        workflow: config.workflow.clone(),
    };
    let cluster = ClusterApi {
        node: node.clone(),
        store: store.clone(),
        replica: config.replica_id.clone(),
        address: local.to_string(),
        started_at_ms,
        distribution: distribution.clone(),
        stale_after_ms,
        auth_mode: authenticator.mode_name(),
    };
    let tokens = TokenApi {
        node: node.clone(),
        store: store.clone(),
        clock: clock.clone(),
    };
    let signals = SignalsApi {
        node: node.clone(),
        state: node.subscribe(),
        reports,
        clock: clock.clone(),
    };

    info!(
        tls = tls.is_some(),
        auth = authenticator.mode_name(),
        "listening for grpc on {local}"
    );
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .layer(AuthLayer {
            auth: authenticator,
        })
        .add_service(health_service)
        .add_service(reflection)
        .add_service(FleetServiceServer::new(fleet).max_decoding_message_size(8 << 20))
        .add_service(SteeringServiceServer::new(steering))
        .add_service(
            BgpServiceServer::new(BgpApi {
                node: node.clone(),
                station,
            })
            .max_decoding_message_size(MAX_RIB_BYTES.min(8 << 20)),
        )
        .add_service(OperationsServiceServer::new(operations))
        .add_service(ClusterServiceServer::new(cluster))
        .add_service(TokenServiceServer::new(tokens))
        .add_service(SignalsServiceServer::new(signals))
        .add_service(DistributionServiceServer::new(DistributionApi {
            inner: distribution,
        }));
    let result = match &tls {
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(tls.incoming(listener), shutdown)
                .await
        }
        None => {
            router
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
                .await
        }
    };
    info!("stopped");
    result.map_err(ServerError::from)
}

/// How often the certificate files are checked for changes.
const TLS_POLL: Duration = Duration::from_secs(2);

/// Streams one HTTP/2 connection may have open at once.
const MAX_STREAMS_PER_CONNECTION: u32 = 256;

/// The authentication mode the flags ask for; a bad policy file stops the
/// start.
fn security_mode(s: &Security) -> Result<Mode, ServerError> {
    match (s.insecure, &s.tls) {
        (true, Some(_)) => return Err(ServerError::InsecureAndTls),
        (true, None) => return Ok(Mode::Insecure),
        (false, None) => return Err(ServerError::NoSecurity),
        (false, Some(_)) => {}
    }
    let policy = match &s.policy {
        None => crate::auth::Policy::default(),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ServerError::ReadPolicy {
                path: path.clone(),
                source,
            })?;
            crate::auth::Policy::from_toml(&text).map_err(|source| ServerError::Policy {
                path: path.clone(),
                source,
            })?
        }
    };
    Ok(Mode::Secure {
        policy: Arc::new(policy),
    })
}

/// Waits until the node knows who leads (or leads itself).
async fn settled(node: &Node) {
    let mut roles = node.roles();
    loop {
        if !matches!(*roles.borrow_and_update(), Role::NoLeader { .. }) {
            return;
        }
        if roles.changed().await.is_err() {
            return;
        }
    }
}

/// Waits until the role is settled and, on the leader, the fleet is there.
async fn first_seed_attempt(node: &Node) {
    settled(node).await;
    node.loaded().await;
    if let Role::Leader(_) = node.role() {
        let mut snaps = node.subscribe();
        while snaps.borrow_and_update().fleet.is_none() {
            if snaps.changed().await.is_err() {
                return;
            }
        }
    }
}

/// Applies the `--fleet` file whenever this replica leads and the store
/// holds no fleet. A restart never overwrites a fleet applied since.
async fn seed_when_leading(node: Node, spec: FleetSpec, path: PathBuf) {
    let mut roles = node.roles();
    loop {
        let role = roles.borrow_and_update().clone();
        if let Role::Leader(handle) = role {
            let snap = handle.snapshot();
            if snap.fleet.is_some() {
                info!(
                    generation = snap.fleet_generation,
                    file = %path.display(),
                    "the store already holds a fleet; --fleet only seeds an empty store and is ignored"
                );
            } else {
                let intent = Intent {
                    actor: "sextant-cp".into(),
                    reason: format!("seed from --fleet {}", path.display()),
                };
                match handle.apply_fleet(spec.clone(), Some(0), intent).await {
                    Ok(out) => info!(version = out.version_after, "fleet seeded"),
                    Err(OpError::GenerationMismatch { .. }) => {
                        info!("another writer seeded the fleet first")
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot seed the fleet; will retry when leading again")
                    }
                }
            }
        }
        if roles.changed().await.is_err() {
            return;
        }
    }
}
