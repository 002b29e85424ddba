//! Reports the edge's health and load to the control plane every second
//! (`SignalsService.ReportEdge`), reconnecting when the stream breaks.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sextant_proto::v1 as pb;
use sextant_proto::v1::signals_service_client::SignalsServiceClient;
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use crate::proxy::{Current, Stats};

/// What the reporter needs.
#[derive(Debug, Clone)]
pub struct ReporterConfig {
    pub control_plane: String,
    pub node_id: String,
    /// Capacity this edge says it can take, rps (0: not reported).
    pub capacity_rps: f64,
    pub interval: Duration,
    /// TLS to the control plane (`None`: plaintext).
    pub tls: Option<sextant_tls::ClientTls>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    requests: u64,
    errors: u64,
    bytes: u64,
}

fn totals(stats: &Stats) -> Totals {
    Totals {
        requests: stats.requests.load(Ordering::Relaxed),
        errors: stats.responses[5].load(Ordering::Relaxed),
        bytes: stats.response_bytes.load(Ordering::Relaxed),
    }
}

/// Builds one report from the change in counters over `elapsed`.
fn report(
    cfg: &ReporterConfig,
    stats: &Stats,
    current: &Current,
    before: Totals,
    now: Totals,
    elapsed: Duration,
) -> pb::EdgeReport {
    let secs = elapsed.as_secs_f64().max(1e-3);
    let requests = now.requests.saturating_sub(before.requests);
    let errors = now.errors.saturating_sub(before.errors);
    let held = current.load_full();
    pb::EdgeReport {
        node_id: cfg.node_id.clone(),
        at_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(0)),
        healthy: held.as_ref().is_some_and(|c| c.value.healthy()),
        rps: requests as f64 / secs,
        active_connections: u32::try_from(stats.active_connections.load(Ordering::Relaxed).max(0))
            .unwrap_or(u32::MAX),
        error_rate: if requests > 0 {
            (errors as f64 / requests as f64).min(1.0)
        } else {
            0.0
        },
        bytes_per_second: now.bytes.saturating_sub(before.bytes) as f64 / secs,
        capacity_rps: cfg.capacity_rps,
        config_version: held.as_ref().map_or(0, |c| c.version),
    }
}

/// Runs until `shutdown`.
pub async fn run(
    cfg: ReporterConfig,
    stats: Arc<Stats>,
    current: Arc<Current>,
    mut shutdown: watch::Receiver<bool>,
) {
    let urls = crate::subscriber::control_plane_urls(&cfg.control_plane);
    let mut attempt = 0usize;
    let mut backoff = Duration::from_millis(200);
    loop {
        let (tx, rx) = mpsc::channel::<pb::EdgeReport>(16);
        let call = {
            let url = urls[attempt % urls.len()].clone();
            let tls = cfg.tls.clone();
            async move {
                let channel = sextant_tls::control_plane_endpoint(&url, tls.as_ref())?
                    .connect_timeout(Duration::from_secs(3))
                    .connect()
                    .await?;
                let r = SignalsServiceClient::new(channel)
                    .report_edge(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(r.into_inner().accepted)
            }
        };
        let mut call = Box::pin(call);
        // The first report covers a whole interval (an interval's first
        // tick is at once), and a late tick is not followed by a burst of
        // reports covering almost nothing.
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + cfg.interval, cfg.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut before = totals(&stats);
        let mut at = Instant::now();
        let ended = loop {
            tokio::select! {
                r = &mut call => break r,
                _ = tick.tick() => {
                    let now = totals(&stats);
                    let rep = report(&cfg, &stats, &current, before, now, at.elapsed());
                    before = now;
                    at = Instant::now();
                    if tx.try_send(rep).is_err() {
                        debug!("report dropped: the stream is not keeping up");
                    }
                }
                _ = shutdown.changed() => return,
            }
        };
        match ended {
            Ok(n) => {
                debug!(accepted = n, "report stream ended");
                backoff = Duration::from_millis(200);
            }
            Err(e) => {
                warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "report stream failed");
                attempt += 1;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_are_rates_over_the_interval() {
        let stats = Stats::default();
        let cfg = ReporterConfig {
            control_plane: String::new(),
            node_id: "ams1".into(),
            capacity_rps: 500.0,
            interval: Duration::from_secs(1),
            tls: None,
        };
        let before = Totals {
            requests: 100,
            errors: 1,
            bytes: 1000,
        };
        let now = Totals {
            requests: 300,
            errors: 21,
            bytes: 5000,
        };
        let r = report(
            &cfg,
            &stats,
            &Current::empty(),
            before,
            now,
            Duration::from_secs(2),
        );
        assert_eq!(r.rps, 100.0);
        assert_eq!(r.error_rate, 0.1);
        assert_eq!(r.bytes_per_second, 2000.0);
        assert!(!r.healthy, "no config: not healthy");
        assert_eq!((r.config_version, r.capacity_rps), (0, 500.0));
    }
}
