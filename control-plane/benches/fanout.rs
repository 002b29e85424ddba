//! Config fan-out bench: N subscribers (default 10,000) in this process,
//! each on its own gRPC connection to a `sextant-cp` child process; a drain
//! publishes a new version; we measure how long each subscriber takes to
//! hold it (from the moment the drain call returns, when the version is
//! committed and published) and the control plane's memory per connection.
//!
//! Run: `scripts/bench-fanout [N]` (builds release, raises the open-file
//! limit). Not part of the test suite.

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sextant_proto::v1 as pb;
use tokio::sync::mpsc;

type Error = Box<dyn std::error::Error + Send + Sync>;

fn rss_kib(pid: u32) -> Result<u64, Error> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).ok_or("bad VmRSS")?.parse()?)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// One subscriber: hello, then ACK every update; reports (version, when)
/// for each completed update.
async fn subscriber(
    channel: tonic::transport::Channel,
    id: usize,
    done: mpsc::UnboundedSender<(u64, Instant)>,
) -> Result<(), Error> {
    let (tx, rx) = mpsc::channel(4);
    tx.send(pb::SubscribeRequest {
        message: Some(pb::subscribe_request::Message::Hello(pb::Hello {
            node_id: format!("bench-dns-{id}"),
            kind: pb::NodeKind::Dns.into(),
            ..pb::Hello::default()
        })),
    })
    .await?;
    let mut stream = pb::distribution_service_client::DistributionServiceClient::new(channel)
        .max_decoding_message_size(8 << 20)
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    while let Some(u) = stream.message().await? {
        // Decode like a real subscriber would.
        if !u.config_bytes.is_empty() {
            use prost::Message;
            let _config = pb::NodeConfig::decode(u.config_bytes.as_ref())?;
        }
        if u.last {
            let at = Instant::now();
            tx.send(pb::SubscribeRequest {
                message: Some(pb::subscribe_request::Message::Ack(pb::Ack {
                    version: u.version,
                    nonce: u.nonce,
                })),
            })
            .await?;
            let _ = done.send((u.version, at));
        }
    }
    Ok(())
}

fn main() -> Result<(), Error> {
    let n: usize = std::env::args()
        .nth(1)
        .filter(|a| !a.starts_with('-'))
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(10_000);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::current_exe()?
        .parent()
        .and_then(|p| p.parent())
        .ok_or("no target dir")?
        .to_path_buf();
    let cp_bin = target.join("sextant-cp");
    let ctl_bin = target.join("sextantctl");
    if !cp_bin.exists() {
        return Err(format!(
            "{} missing: cargo build --release --bins first",
            cp_bin.display()
        )
        .into());
    }
    let data = tempfile::tempdir()?;
    let mut cp = Command::new(&cp_bin)
        // Plaintext, and every subscriber comes from 127.0.0.1: lift the
        // per-peer limits, which would otherwise count them as one peer.
        .args(["--insecure", "--max-open-per-peer", "1000000"])
        .args(["--rate-limit", "1000000", "--rate-burst", "1000000"])
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .arg("--fleet")
        .arg(root.join("deploy/examples/fleet.toml"))
        .env("SEXTANT_LOG", "warn,sextant_control_plane::server=info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    let stderr = cp.stderr.take().ok_or("no stderr")?;
    let mut lines = std::io::BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines.next().ok_or("sextant-cp exited")??;
        if let Some(i) = line.find("listening for grpc on ") {
            break line[i + 22..]
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let url = format!("http://{addr}");
    let pid = cp.id();
    std::thread::sleep(Duration::from_millis(500));
    let rss_before = rss_kib(pid)?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let (done_tx, mut done_rx) = mpsc::unbounded_channel();
        let start = Instant::now();
        let mut connected = 0usize;
        for i in 0..n {
            let channel = tonic::transport::Endpoint::from_shared(url.clone())?
                .connect()
                .await?;
            let d = done_tx.clone();
            tokio::spawn(async move {
                if let Err(e) = subscriber(channel, i, d).await {
                    eprintln!("subscriber {i}: {e}");
                }
            });
            connected += 1;
        }
        // Wait until every subscriber holds the first version.
        let mut first = 0;
        while first < connected {
            tokio::time::timeout(Duration::from_secs(60), done_rx.recv())
                .await?
                .ok_or("channel closed")?;
            first += 1;
        }
        println!(
            "{connected} subscribers connected and holding the first version in {:.1?}",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss_after = rss_kib(pid)?;

        let mut results = Vec::new();
        for round in 0..3 {
            let args = if round % 2 == 0 {
                vec!["drain", "provider/cdn-b", "--reason", "bench"]
            } else {
                vec!["undrain", "provider/cdn-b", "--reason", "bench"]
            };
            // Measured from the start of the drain call (commit, publication
            // and the CLI's own start-up included): an upper bound.
            let published = Instant::now();
            let out = Command::new(&ctl_bin)
                .arg("--server")
                .arg(&url)
                .args(&args)
                .output()?;
            if !out.status.success() {
                return Err(format!(
                    "sextantctl failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
                .into());
            }
            let want = round as u64 + 2;
            let mut lat = Vec::with_capacity(connected);
            while lat.len() < connected {
                let (v, at) = tokio::time::timeout(Duration::from_secs(60), done_rx.recv())
                    .await?
                    .ok_or("channel closed")?;
                if v == want {
                    lat.push(at.saturating_duration_since(published));
                }
            }
            lat.sort();
            println!(
                "version {want}: all {connected} hold it; p50 {:.1?} p99 {:.1?} max {:.1?}",
                percentile(&lat, 0.5),
                percentile(&lat, 0.99),
                lat[lat.len() - 1]
            );
            results.push(percentile(&lat, 0.99));
        }
        Ok::<_, Error>((rss_after, results))
    });
    let _ = cp.kill();
    let (rss_after, p99s) = result?;
    let per = (rss_after.saturating_sub(rss_before)) as f64 * 1024.0 / n as f64;
    println!(
        "sextant-cp RSS {rss_before} KiB -> {rss_after} KiB with {n} subscribers: {:.1} KiB per subscriber connection",
        per / 1024.0
    );
    println!(
        "worst p99 of publication -> held: {:.1?} (target < 1 s); memory target < 64 KiB per connection",
        p99s.iter().max().copied().unwrap_or_default()
    );
    Ok(())
}
