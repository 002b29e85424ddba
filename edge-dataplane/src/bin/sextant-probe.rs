//! `sextant-probe`: the active health prober.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use ipnet::IpNet;
use sextant_edge::probe::{parse_duration, run, ProbeConfig, DEFAULT_CONCURRENCY};

/// Active health prober: probes the health check of every edge of the fleet
/// from this vantage point each interval (HTTP GET or TCP connect) and
/// streams the results to the control plane. Third-party edges run no
/// agent: these probes are their only health signal.
#[derive(Debug, Parser)]
// No `about`: it would show the package description instead of this.
#[command(name = "sextant-probe", version)]
struct Args {
    /// Control-plane gRPC URL; several replicas comma-separated (tried in
    /// turn when one fails).
    #[arg(long, env = "SEXTANT_CONTROL_PLANE")]
    control_plane: String,
    #[command(flatten)]
    tls: sextant_tls::ClientTlsArgs,
    /// This vantage point's name, sent with every batch (e.g. probe-ams-1).
    #[arg(long, env = "SEXTANT_VANTAGE_ID")]
    vantage_id: String,
    /// Time between probe rounds (500ms, 1s, 2m).
    #[arg(long, env = "SEXTANT_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    interval: Duration,
    /// Time one probe may take, connection included (at most --interval).
    #[arg(long, env = "SEXTANT_TIMEOUT", default_value = "800ms", value_parser = parse_duration)]
    timeout: Duration,
    /// Time between two listings of the fleet's edges.
    #[arg(long, env = "SEXTANT_REFRESH", default_value = "10s", value_parser = parse_duration)]
    refresh: Duration,
    /// Only probe addresses inside these ranges (comma-separated CIDRs); an
    /// edge whose health check is elsewhere is reported as failed. Default:
    /// any.
    #[arg(long, env = "SEXTANT_ALLOW_TARGETS", value_delimiter = ',')]
    allow_targets: Vec<IpNet>,
    /// Admin address for /healthz and /metrics (port 0: pick one; the log
    /// says which).
    #[arg(long, env = "SEXTANT_ADMIN")]
    admin: Option<SocketAddr>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    sextant_edge::process::init_logging("info");
    let config = ProbeConfig {
        tls: args.tls.client()?,
        control_plane: args.control_plane,
        vantage_id: args.vantage_id,
        interval: args.interval,
        timeout: args.timeout,
        refresh: args.refresh,
        allow_targets: args.allow_targets,
        admin: args.admin,
        concurrency: DEFAULT_CONCURRENCY,
    }
    .validate()?;
    // Probing is waiting on sockets: one thread carries it.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run(config, sextant_edge::process::shutdown_signal()))?;
    Ok(())
}
