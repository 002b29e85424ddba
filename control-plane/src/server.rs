//! `sextant-cp`: opens the store, starts the control loop, seeds the fleet
//! on first start, and serves gRPC and metrics.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use prometheus_client::registry::Registry;
use sextant_core::FleetSpec;
use sextant_proto::v1::cluster_service_server::ClusterServiceServer;
use sextant_proto::v1::distribution_service_server::DistributionServiceServer;
use sextant_proto::v1::fleet_service_server::FleetServiceServer;
use sextant_proto::v1::operations_service_server::OperationsServiceServer;
use sextant_proto::v1::signals_service_server::SignalsServiceServer;
use sextant_proto::v1::steering_service_server::SteeringServiceServer;
use sextant_store::embedded::EmbeddedStore;
use sextant_store::{Store, StoreError};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::{info, warn};

use crate::control_loop::{self, Clock, Intent, OpError, SystemClock};
use crate::grpc::cluster::ClusterApi;
use crate::grpc::distribution::{Distribution, DistributionApi};
use crate::grpc::fleet::FleetApi;
use crate::grpc::operations::OperationsApi;
use crate::grpc::signals::{Reports, SignalsApi};
use crate::grpc::steering::SteeringApi;
use crate::metrics::{self, Metrics};
use crate::state::StateError;

/// How to run the server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// gRPC address; port 0 picks a free port (logged).
    pub listen: SocketAddr,
    /// Where the embedded store keeps its data.
    pub data_dir: PathBuf,
    /// Fleet file that seeds an empty store.
    pub fleet: Option<PathBuf>,
    /// Address for `/metrics` and `/healthz`.
    pub metrics: Option<SocketAddr>,
    /// This replica's name in `status`.
    pub replica_id: String,
    /// A subscriber behind the current config for longer than this is
    /// flagged stale (status, metrics).
    pub stale_after: std::time::Duration,
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
    #[error("cannot build the reflection service: {0}")]
    Reflection(String),
    #[error("grpc server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Runs the control plane until `shutdown` completes.
pub async fn run(
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let store_dir = config.data_dir.join("store");
    let store: Arc<dyn Store> =
        Arc::new(
            EmbeddedStore::open(&store_dir).map_err(|source| ServerError::Store {
                dir: store_dir.clone(),
                source,
            })?,
        );
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let started_at_ms = clock.now_ms();
    let (handle, loop_task) = control_loop::start(store.clone(), clock.clone()).await?;

    if let Some(path) = &config.fleet {
        seed(&handle, path).await?;
    }

    let distribution = Distribution::new(handle.subscribe(), clock.clone());
    tokio::spawn(distribution.clone().follow());
    let reports = Arc::new(Reports::default());
    let stale_after_ms = u64::try_from(config.stale_after.as_millis()).unwrap_or(u64::MAX);

    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    tokio::spawn(metrics::follow(
        metrics.clone(),
        handle.subscribe(),
        distribution.clone(),
        stale_after_ms,
    ));
    if let Some(addr) = config.metrics {
        let listener = metrics::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        tokio::spawn(metrics::serve(listener, Arc::new(registry)));
    }

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
        handle: handle.clone(),
        clock: clock.clone(),
        reports: reports.clone(),
    };
    let steering = SteeringApi {
        handle: handle.clone(),
        store: store.clone(),
    };
    let operations = OperationsApi {
        handle: handle.clone(),
        store: store.clone(),
        clock: clock.clone(),
    };
    let cluster = ClusterApi {
        handle: handle.clone(),
        store: store.clone(),
        replica: config.replica_id.clone(),
        address: local.to_string(),
        started_at_ms,
        distribution: distribution.clone(),
        stale_after_ms,
    };
    let signals = SignalsApi {
        state: handle.subscribe(),
        reports,
        clock: clock.clone(),
    };

    info!("listening for grpc on {local}");
    let result = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(FleetServiceServer::new(fleet))
        .add_service(SteeringServiceServer::new(steering))
        .add_service(OperationsServiceServer::new(operations))
        .add_service(ClusterServiceServer::new(cluster))
        .add_service(SignalsServiceServer::new(signals))
        .add_service(DistributionServiceServer::new(DistributionApi {
            inner: distribution,
        }))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await;
    drop(handle);
    let _ = loop_task.await;
    info!("stopped");
    result.map_err(ServerError::from)
}

/// Applies the `--fleet` file if the store holds no fleet yet. A restart
/// never overwrites a fleet applied since.
async fn seed(handle: &control_loop::LoopHandle, path: &PathBuf) -> Result<(), ServerError> {
    let snap = handle.snapshot();
    if snap.fleet.is_some() {
        info!(
            generation = snap.fleet_generation,
            file = %path.display(),
            "the store already holds a fleet; --fleet only seeds an empty store and is ignored"
        );
        return Ok(());
    }
    let text = std::fs::read_to_string(path).map_err(|source| ServerError::ReadFleet {
        path: path.clone(),
        source,
    })?;
    let fleet_err = |source: OpError| ServerError::Fleet {
        path: path.clone(),
        source,
    };
    let spec = FleetSpec::from_toml(&text).map_err(|e| fleet_err(e.into()))?;
    let intent = Intent {
        actor: "sextant-cp".into(),
        reason: format!("seed from --fleet {}", path.display()),
    };
    let out = handle
        .apply_fleet(spec, Some(0), intent)
        .await
        .map_err(fleet_err)?;
    if out.changed {
        info!(version = out.version_after, "fleet seeded");
    } else {
        warn!("fleet seed changed nothing");
    }
    Ok(())
}
