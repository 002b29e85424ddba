//! `sextant-cp`: the Sextant control plane server.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use sextant_control_plane::server::{run, ServerConfig};
use tracing_subscriber::EnvFilter;

/// The Sextant control plane: computes routing and serves it over gRPC.
#[derive(Debug, Parser)]
#[command(name = "sextant-cp", version, about)]
struct Args {
    /// gRPC listen address (port 0: pick a free port; the log says which).
    #[arg(long, env = "SEXTANT_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Directory for the embedded store.
    #[arg(long, env = "SEXTANT_DATA_DIR")]
    data_dir: PathBuf,
    /// Fleet file that seeds an empty store (ignored once a fleet is stored).
    #[arg(long, env = "SEXTANT_FLEET")]
    fleet: Option<PathBuf>,
    /// Address for Prometheus `/metrics` and `/healthz`.
    #[arg(long, env = "SEXTANT_METRICS")]
    metrics: Option<SocketAddr>,
    /// This replica's name in `sextantctl status`.
    #[arg(long, env = "SEXTANT_REPLICA_ID", default_value = "cp-1")]
    replica_id: String,
    /// Flag a subscriber (edge, DNS) whose config is older than the current
    /// one for longer than this many seconds.
    #[arg(long, env = "SEXTANT_STALE_AFTER", default_value_t = 30)]
    stale_after_seconds: u64,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "SEXTANT_LOG_JSON")]
    log_json: bool,
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
        let config = ServerConfig {
            listen: args.listen,
            data_dir: args.data_dir,
            fleet: args.fleet,
            metrics: args.metrics,
            replica_id: args.replica_id,
            stale_after: std::time::Duration::from_secs(args.stale_after_seconds),
        };
        run(config, shutdown_signal()).await
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
