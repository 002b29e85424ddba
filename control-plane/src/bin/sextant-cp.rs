//! `sextant-cp`: the Sextant control plane server.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use sextant_control_plane::grpc::authn::Limits;
use sextant_control_plane::server::{run, EtcdTlsFiles, Security, ServerConfig, StoreConfig};
use tracing_subscriber::EnvFilter;

/// The Sextant control plane: computes routing and serves it over gRPC.
#[derive(Debug, Parser)]
#[command(name = "sextant-cp", version, about)]
struct Args {
    /// gRPC listen address (port 0: pick a free port; the log says which).
    #[arg(long, env = "SEXTANT_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Directory for the embedded store (required with --store embedded).
    #[arg(long, env = "SEXTANT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Where the state lives: `embedded` (one replica) or `etcd` (several
    /// replicas, one elected leader).
    #[arg(long, env = "SEXTANT_STORE", value_enum, default_value_t = StoreKind::Embedded)]
    store: StoreKind,
    /// etcd client URLs, comma-separated (with --store etcd).
    #[arg(long, env = "SEXTANT_ETCD_ENDPOINTS", value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// Key prefix in etcd, so that several Sextants can share one cluster.
    #[arg(long, env = "SEXTANT_ETCD_NAMESPACE", default_value = "")]
    etcd_namespace: String,
    /// CA certificate (PEM) of etcd's server certificate: TLS to etcd
    /// (endpoints https://).
    #[arg(long, env = "SEXTANT_ETCD_TLS_CA")]
    etcd_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's --client-cert-auth.
    #[arg(long, env = "SEXTANT_ETCD_TLS_CERT", requires_all = ["etcd_tls_key", "etcd_tls_ca"])]
    etcd_tls_cert: Option<PathBuf>,
    /// Client key (PEM) for etcd.
    #[arg(long, env = "SEXTANT_ETCD_TLS_KEY", requires = "etcd_tls_cert")]
    etcd_tls_key: Option<PathBuf>,
    /// URL other replicas forward writes to (default: http://LISTEN_ADDR).
    #[arg(long, env = "SEXTANT_ADVERTISE")]
    advertise: Option<String>,
    /// Leader lease TTL in seconds: a dead leader is replaced after this.
    #[arg(long, env = "SEXTANT_LEASE_TTL", default_value_t = 3)]
    lease_ttl_seconds: u64,
    /// Fleet file that seeds an empty store (ignored once a fleet is stored).
    #[arg(long, env = "SEXTANT_FLEET")]
    fleet: Option<PathBuf>,
    /// Address for Prometheus `/metrics` and `/healthz`.
    #[arg(long, env = "SEXTANT_METRICS")]
    metrics: Option<SocketAddr>,
    /// This replica's name in `sextantctl status` (unique per cluster).
    #[arg(long, env = "SEXTANT_REPLICA_ID", default_value = "cp-1")]
    replica_id: String,
    /// Flag a subscriber (edge, DNS) whose config is older than the current
    /// one for longer than this many seconds.
    #[arg(long, env = "SEXTANT_STALE_AFTER", default_value_t = 30)]
    stale_after_seconds: u64,
    /// A subscriber that holds a version newer than this replica's (one
    /// more up to date, or a store restored to older versions) is sent
    /// nothing older for this many seconds, then this replica's current
    /// config.
    #[arg(long, env = "SEXTANT_AHEAD_GRACE", default_value_t = 30)]
    ahead_grace_seconds: u64,
    /// Seconds between the steps of a move that a service's max_shift holds
    /// back.
    #[arg(long, env = "SEXTANT_SHIFT_INTERVAL", default_value_t = 30)]
    shift_interval_seconds: u64,
    /// Expiry of a drain that names none, e.g. 24h.
    #[arg(long, env = "SEXTANT_DRAIN_DEFAULT_EXPIRY", default_value = "24h")]
    drain_default_expiry: String,
    /// Longest expiry a drain may ask for, e.g. 7d.
    #[arg(long, env = "SEXTANT_DRAIN_MAX_EXPIRY", default_value = "7d")]
    drain_max_expiry: String,
    /// Drains (drills included) allowed at once without --force.
    #[arg(long, env = "SEXTANT_MAX_CONCURRENT_DRAINS", default_value_t = 3)]
    max_concurrent_drains: usize,
    /// Largest share of all traffic one change (or one drain step) may move
    /// at once without --force (the blast-radius brake).
    #[arg(long, env = "SEXTANT_MAX_MOVE_SHARE", default_value_t = 0.2)]
    max_move_share: f64,
    /// When no drill may start, repeatable: weekly `mon-fri 08:00-18:00`
    /// (UTC) or absolute `2026-12-24T00:00Z/2026-12-27T00:00Z`.
    #[arg(long, env = "SEXTANT_DRILL_BLOCKING_WINDOW", value_delimiter = ';')]
    drill_blocking_window: Vec<String>,
    /// Longest drill, e.g. 24h.
    #[arg(long, env = "SEXTANT_MAX_DRILL", default_value = "24h")]
    max_drill: String,
    /// Health: vantage points (an edge's own agent counts as one) that
    /// must see an edge fail before it is down.
    #[arg(long, env = "SEXTANT_HEALTH_QUORUM", default_value_t = 2)]
    health_quorum: usize,
    /// Health: consecutive failures before a vantage point votes down.
    #[arg(long, env = "SEXTANT_HEALTH_DOWN_AFTER", default_value_t = 2)]
    health_down_after: u32,
    /// Health: consecutive passes before a vantage point votes up.
    #[arg(long, env = "SEXTANT_HEALTH_UP_AFTER", default_value_t = 3)]
    health_up_after: u32,
    /// Health: a vantage point's results older than this do not vote.
    #[arg(long, env = "SEXTANT_HEALTH_STALE_AFTER", default_value = "5s")]
    health_stale_after: String,
    /// Health: an edge agent silent this long votes down (missed heartbeat).
    #[arg(long, env = "SEXTANT_HEARTBEAT_TIMEOUT", default_value = "3s")]
    heartbeat_timeout: String,
    /// Flap damping: penalty added at each fall.
    #[arg(long, env = "SEXTANT_DAMPING_PENALTY", default_value_t = 1000.0)]
    damping_penalty: f64,
    /// Flap damping: an edge is held down while its penalty is at or above this...
    #[arg(long, env = "SEXTANT_DAMPING_SUPPRESS", default_value_t = 1000.0)]
    damping_suppress: f64,
    /// ...until it decays below this.
    #[arg(long, env = "SEXTANT_DAMPING_REUSE", default_value_t = 500.0)]
    damping_reuse: f64,
    /// Flap damping: the penalty halves every this long.
    #[arg(long, env = "SEXTANT_DAMPING_HALF_LIFE", default_value = "10s")]
    damping_half_life: String,
    /// Flap damping: the highest penalty (bounds the hold once flapping stops).
    #[arg(long, env = "SEXTANT_DAMPING_MAX", default_value_t = 4000.0)]
    damping_max: f64,
    /// Automated failover removes at most this share of total capacity.
    #[arg(long, env = "SEXTANT_FAILOVER_MAX_TOTAL", default_value_t = 0.25)]
    failover_max_total: f64,
    /// Automated failover removes at most this share of a region's capacity.
    #[arg(long, env = "SEXTANT_FAILOVER_MAX_REGION", default_value_t = 0.5)]
    failover_max_region: f64,
    /// Serve plaintext gRPC without authentication: anyone who reaches the
    /// port may do anything. For development only; logged and shown in
    /// `sextantctl status`.
    #[arg(long, env = "SEXTANT_INSECURE")]
    insecure: bool,
    /// Server certificate chain (PEM) with the SAN URI
    /// spiffe://sextant/replica/ID; turns on mutual TLS and authentication.
    /// Re-read when the file changes.
    #[arg(long, env = "SEXTANT_TLS_CERT", requires_all = ["tls_key", "tls_client_ca"])]
    tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, env = "SEXTANT_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA certificate (PEM) that clients' certificates must chain to; also
    /// the CA of the other replicas.
    #[arg(long, env = "SEXTANT_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Policy file: operators known by client certificate, with their role
    /// (viewer, operator, admin) and the domains they may drain.
    #[arg(long, env = "SEXTANT_POLICY")]
    policy: Option<PathBuf>,
    /// Requests per second one peer may make (streams count once).
    #[arg(long, env = "SEXTANT_RATE_LIMIT", default_value_t = 200.0)]
    rate_limit: f64,
    /// Requests one peer may make at once after a quiet spell.
    #[arg(long, env = "SEXTANT_RATE_BURST", default_value_t = 400.0)]
    rate_burst: f64,
    /// Requests and streams one peer may have open at once.
    #[arg(long, env = "SEXTANT_MAX_OPEN_PER_PEER", default_value_t = 256)]
    max_open_per_peer: usize,
    /// BMP station address (RFC 7854): edge routers send BMP here, and the
    /// fleet's `[[anycast]]` sites are judged from their routes. Port 0
    /// picks a free port (the log says which).
    #[arg(long, env = "SEXTANT_BMP_LISTEN")]
    bmp_listen: Option<SocketAddr>,
    /// How often each router's anycast vote is cast (and at once on a
    /// route change); the health K/M thresholds count these.
    #[arg(long, env = "SEXTANT_BMP_INTERVAL", default_value = "1s")]
    bmp_interval: String,
    /// A new BMP session votes once it sent its table (End-of-RIB or a
    /// watched prefix), or after this.
    #[arg(long, env = "SEXTANT_BMP_SYNC_GRACE", default_value = "3s")]
    bmp_sync_grace: String,
    /// Networks routers may send BMP from, comma-separated CIDRs (BMP has
    /// no authentication of its own: bind --bmp-listen to the management
    /// network and list the routers here). Default: any.
    #[arg(long, env = "SEXTANT_BMP_ALLOW", value_delimiter = ',')]
    bmp_allow: Vec<ipnet::IpNet>,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "SEXTANT_LOG_JSON")]
    log_json: bool,
}

/// Where the state lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StoreKind {
    Embedded,
    Etcd,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = EnvFilter::try_from_env("SEXTANT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    if args.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .init();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let store = match (args.store, args.data_dir) {
            (StoreKind::Embedded, Some(data_dir)) => StoreConfig::Embedded { data_dir },
            (StoreKind::Embedded, None) => {
                anyhow::bail!("--data-dir is required with the embedded store")
            }
            (StoreKind::Etcd, _) if args.etcd_endpoints.is_empty() => {
                anyhow::bail!("--etcd-endpoints is required with --store etcd")
            }
            (StoreKind::Etcd, _) => StoreConfig::Etcd {
                endpoints: args.etcd_endpoints,
                namespace: args.etcd_namespace,
                tls: args.etcd_tls_ca.map(|ca| EtcdTlsFiles {
                    ca,
                    cert_and_key: args.etcd_tls_cert.zip(args.etcd_tls_key),
                }),
            },
        };
        if args.lease_ttl_seconds == 0 {
            anyhow::bail!("--lease-ttl must be at least 1 second");
        }
        let dur = |flag: &str, v: &str| {
            sextant_control_plane::timefmt::parse_duration_ms(v)
                .map_err(|e| anyhow::anyhow!("{flag}: {e}"))
        };
        let windows = args
            .drill_blocking_window
            .iter()
            .map(|w| sextant_core::drill::Window::parse(w))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("--drill-blocking-window {e}"))?;
        if !(args.max_move_share > 0.0 && args.max_move_share <= 1.0) {
            anyhow::bail!(
                "--max-move-share must be in (0, 1], got {}",
                args.max_move_share
            );
        }
        let workflow = sextant_control_plane::workflow::WorkflowConfig {
            default_expiry_ms: dur("--drain-default-expiry", &args.drain_default_expiry)?,
            max_expiry_ms: dur("--drain-max-expiry", &args.drain_max_expiry)?,
            limits: sextant_core::impact::Limits {
                max_concurrent_drains: args.max_concurrent_drains,
                max_move_share: args.max_move_share,
            },
            drill_windows: windows,
            max_drill_ms: dur("--max-drill", &args.max_drill)?,
            ..Default::default()
        };
        let health = sextant_core::health::HealthConfig {
            quorum: args.health_quorum,
            down_after: args.health_down_after,
            up_after: args.health_up_after,
            stale_after_ms: dur("--health-stale-after", &args.health_stale_after)?,
            heartbeat_timeout_ms: dur("--heartbeat-timeout", &args.heartbeat_timeout)?,
            damping: sextant_core::health::Damping {
                penalty: args.damping_penalty,
                suppress: args.damping_suppress,
                reuse: args.damping_reuse,
                half_life_ms: dur("--damping-half-life", &args.damping_half_life)?,
                max_penalty: args.damping_max,
            },
        };
        health
            .check()
            .map_err(|e| anyhow::anyhow!("health settings: {e}"))?;
        for (flag, v) in [
            ("--failover-max-total", args.failover_max_total),
            ("--failover-max-region", args.failover_max_region),
        ] {
            if !(0.0..=1.0).contains(&v) {
                anyhow::bail!("{flag} must be in [0, 1], got {v}");
            }
        }
        let bounds = sextant_core::failover::Bounds {
            max_total_share: args.failover_max_total,
            max_region_share: args.failover_max_region,
        };
        if !(args.rate_limit > 0.0 && args.rate_burst >= 1.0) || args.max_open_per_peer == 0 {
            anyhow::bail!("--rate-limit must be > 0, --rate-burst at least 1 and --max-open-per-peer at least 1");
        }
        let tls = match (args.tls_cert, args.tls_key, args.tls_client_ca) {
            (Some(cert), Some(key), Some(client_ca)) => Some(sextant_tls::ServerTlsFiles {
                cert,
                key,
                client_ca,
            }),
            _ => None,
        };
        let security = Security {
            tls,
            insecure: args.insecure,
            policy: args.policy,
            limits: Limits {
                rate_per_sec: args.rate_limit,
                burst: args.rate_burst,
                max_open_per_peer: args.max_open_per_peer,
            },
        };
        let ms = |flag: &str, v: &str| -> anyhow::Result<std::time::Duration> {
            let ms = dur(flag, v)?;
            anyhow::ensure!(ms > 0, "{flag} must be more than 0");
            Ok(std::time::Duration::from_millis(u64::try_from(ms)?))
        };
        let bmp = sextant_control_plane::bmp::StationConfig {
            interval: ms("--bmp-interval", &args.bmp_interval)?,
            sync_grace: ms("--bmp-sync-grace", &args.bmp_sync_grace)?,
            allow: args.bmp_allow,
            ..Default::default()
        };
        let config = ServerConfig {
            security,
            health,
            bounds,
            workflow,
            listen: args.listen,
            store,
            advertise: args.advertise,
            lease_ttl: std::time::Duration::from_secs(args.lease_ttl_seconds),
            shift_interval: std::time::Duration::from_secs(args.shift_interval_seconds.max(1)),
            fleet: args.fleet,
            metrics: args.metrics,
            replica_id: args.replica_id,
            stale_after: std::time::Duration::from_secs(args.stale_after_seconds),
            ahead_grace: std::time::Duration::from_secs(args.ahead_grace_seconds),
            bmp_listen: args.bmp_listen,
            bmp,
        };
        run(config, shutdown_signal())
            .await
            .map_err(anyhow::Error::from)
    })?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutting down");
}
