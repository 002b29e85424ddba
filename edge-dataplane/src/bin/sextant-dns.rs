//! `sextant-dns`: the GeoDNS server.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use sextant_edge::dns::{run, DnsConfig};

/// Authoritative GeoDNS: answers the steered names of the fleet by client
/// location (EDNS Client Subnet or the resolver's address) and the weights
/// the control plane pushes; keeps serving its last config when the control
/// plane is away.
#[derive(Debug, Parser)]
#[command(name = "sextant-dns", version, about)]
struct Args {
    /// Control-plane gRPC URL; several replicas comma-separated (tried in
    /// turn when one fails).
    #[arg(long, env = "SEXTANT_CONTROL_PLANE")]
    control_plane: String,
    #[command(flatten)]
    tls: sextant_tls::ClientTlsArgs,
    /// A unique name for this DNS server (shown in `sextantctl status`).
    #[arg(long, env = "SEXTANT_NODE_ID")]
    node_id: String,
    /// The site path this server runs in (informational).
    #[arg(long, env = "SEXTANT_SITE", default_value = "")]
    site: String,
    /// DNS address, UDP and TCP (port 0: pick one free for both; the log
    /// says which).
    #[arg(long, env = "SEXTANT_LISTEN")]
    listen: SocketAddr,
    /// Admin address for /healthz, /metrics and /debug/answer.
    #[arg(long, env = "SEXTANT_ADMIN")]
    admin: Option<SocketAddr>,
    /// Where the last good config is kept.
    #[arg(long, env = "SEXTANT_DATA_DIR")]
    data_dir: PathBuf,
    /// UDP serving threads, one socket each (default: one per core).
    #[arg(long, env = "SEXTANT_THREADS")]
    threads: Option<usize>,
    /// Optional `prefix,country,asn` file resolving the countries and ASNs
    /// that client groups name.
    #[arg(long, env = "SEXTANT_GEO_MAP")]
    geo_map: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // hickory-server logs every TCP request at info: keep it at warn.
    sextant_edge::process::init_logging("info,hickory_server=warn");
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    // UDP is served by dedicated threads; the runtime only carries TCP, the
    // config stream and the admin port.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let config = DnsConfig {
        tls: args.tls.client()?,
        control_plane: args.control_plane,
        node_id: args.node_id,
        site: args.site,
        listen: args.listen,
        admin: args.admin,
        data_dir: args.data_dir,
        threads,
        geo_map: args.geo_map,
    };
    runtime.block_on(run(config, sextant_edge::process::shutdown_signal()))?;
    Ok(())
}
