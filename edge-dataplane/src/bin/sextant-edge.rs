//! `sextant-edge`: the edge proxy agent.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use ipnet::IpNet;
use sextant_edge::edge::{run, EdgeConfig};

/// Edge proxy: forwards HTTP to origins by the weights the control plane
/// pushes, keeps serving its last config when the control plane is away.
#[derive(Debug, Parser)]
#[command(name = "sextant-edge", version, about)]
struct Args {
    /// Control-plane gRPC URL; several replicas comma-separated (tried in
    /// turn when one fails).
    #[arg(long, env = "SEXTANT_CONTROL_PLANE")]
    control_plane: String,
    #[command(flatten)]
    tls: sextant_tls::ClientTlsArgs,
    /// This edge's fleet id.
    #[arg(long, env = "SEXTANT_NODE_ID")]
    node_id: String,
    /// This edge's site path (checked against the fleet).
    #[arg(long, env = "SEXTANT_SITE", default_value = "")]
    site: String,
    /// HTTP listen address (port 0: pick one; the log says which).
    #[arg(long, env = "SEXTANT_LISTEN")]
    listen: SocketAddr,
    /// Admin address for /healthz and /metrics.
    #[arg(long, env = "SEXTANT_ADMIN")]
    admin: Option<SocketAddr>,
    /// Where the last good config is kept.
    #[arg(long, env = "SEXTANT_DATA_DIR")]
    data_dir: PathBuf,
    /// Only forward to origin endpoints inside these ranges (comma-separated
    /// CIDRs); a config naming another endpoint is refused (NACK). Default:
    /// any.
    #[arg(long, env = "SEXTANT_ALLOW_UPSTREAM", value_delimiter = ',')]
    allow_upstream: Vec<IpNet>,
    /// Capacity this edge reports, rps (0: none).
    #[arg(long, env = "SEXTANT_CAPACITY_RPS", default_value_t = 0.0)]
    capacity_rps: f64,
    /// Seconds between load reports.
    #[arg(long, env = "SEXTANT_REPORT_INTERVAL", default_value_t = 1.0)]
    report_interval: f64,
    /// Proxy worker threads, each with its own listener and single-threaded
    /// runtime (default: one per core).
    #[arg(long, env = "SEXTANT_THREADS")]
    threads: Option<usize>,
    /// Seconds a WebSocket tunnel may carry no byte either way before the
    /// edge closes it (at most 5 once one side has ended).
    #[arg(long, env = "SEXTANT_WEBSOCKET_IDLE", default_value_t = 300.0)]
    websocket_idle: f64,
    /// Seconds the proxy, once told to stop (SIGTERM, SIGINT), lets open
    /// exchanges and WebSockets finish; idle connections close at once.
    #[arg(long, env = "SEXTANT_SHUTDOWN_GRACE", default_value_t = 10.0)]
    shutdown_grace: f64,
    /// Client connections open at once (0: no limit); each worker takes an
    /// equal share, and past it new connections wait in the listen
    /// backlog. Keep it well under the open-file limit: each connection
    /// may also hold an origin connection.
    #[arg(long, env = "SEXTANT_MAX_CONNECTIONS", default_value_t = 0)]
    max_connections: usize,
    /// Log each exchange as a JSON line to this file (appended to; `-`:
    /// standard output). Lines are written every second; SIGUSR1 reopens
    /// the file after a rotation. Default: no access log
    #[arg(long, env = "SEXTANT_ACCESS_LOG")]
    access_log: Option<sextant_edge::access::Sink>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    sextant_edge::process::init_logging("info");
    if !(0.001..1e9).contains(&args.report_interval) {
        anyhow::bail!("--report-interval must be at least 0.001 seconds (and under 1e9)");
    }
    if !(args.capacity_rps >= 0.0 && args.capacity_rps.is_finite()) {
        // The control plane refuses reports with such a capacity: the
        // edge would report nothing, and count as down.
        anyhow::bail!("--capacity-rps must be a number of requests/s, 0 or more");
    }
    if !(0.001..1e9).contains(&args.websocket_idle) {
        anyhow::bail!("--websocket-idle must be at least 0.001 seconds (and under 1e9)");
    }
    if !(0.0..1e9).contains(&args.shutdown_grace) {
        anyhow::bail!("--shutdown-grace must be a number of seconds, 0 or more (and under 1e9)");
    }
    let workers = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    // The control side (config stream, reports, admin) is light: one thread.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let config = EdgeConfig {
        tls: args.tls.client()?,
        control_plane: args.control_plane,
        node_id: args.node_id,
        site: args.site,
        listen: args.listen,
        admin: args.admin,
        data_dir: args.data_dir,
        allow_upstream: args.allow_upstream,
        capacity_rps: args.capacity_rps,
        report_interval: std::time::Duration::from_secs_f64(args.report_interval),
        workers,
        websocket_idle: std::time::Duration::from_secs_f64(args.websocket_idle),
        shutdown_grace: std::time::Duration::from_secs_f64(args.shutdown_grace),
        max_connections: args.max_connections,
        access_log: args.access_log,
    };
    let stop = async {
        sextant_edge::process::shutdown_signal().await;
        // A second signal does not wait for the shutdown grace.
        tokio::spawn(async {
            sextant_edge::process::shutdown_signal().await;
            tracing::warn!("second stop signal: exiting without waiting for the shutdown grace");
            std::process::exit(1);
        });
    };
    runtime.block_on(run(config, stop))?;
    Ok(())
}
