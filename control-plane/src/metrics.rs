//! Prometheus metrics of the control plane, served as text on `--metrics`.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::control_loop::Snapshot;
use crate::grpc::distribution::Distribution;

type Labels = Vec<(String, String)>;

/// The control plane's metrics, registered up front.
#[derive(Debug)]
pub struct Metrics {
    routing_version: Gauge,
    fleet_generation: Gauge,
    drains_active: Gauge,
    unserved_rows: Gauge,
    failed_open_rows: Gauge,
    routing_churn: Gauge<f64, AtomicU64>,
    edge_utilization: Family<Labels, Gauge<f64, AtomicU64>>,
    subscribers: Family<Labels, Gauge>,
    subscribers_stale: Gauge,
    config_rejected: Gauge,
    updates_sent: Family<Labels, Counter>,
    other_content: Counter,
    verdict_changes: Family<Labels, Counter>,
    failover_actions: Family<Labels, Counter>,
    failover_held: Gauge,
    failover_removed: Gauge<f64, AtomicU64>,
    edge_health: Family<Labels, Gauge>,
    rib_generation: Gauge,
    rib_prefixes: Family<Labels, Gauge>,
    rib_loaded_at: Gauge,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            routing_version: Gauge::default(),
            fleet_generation: Gauge::default(),
            drains_active: Gauge::default(),
            unserved_rows: Gauge::default(),
            failed_open_rows: Gauge::default(),
            routing_churn: Gauge::default(),
            edge_utilization: Family::default(),
            subscribers: Family::default(),
            subscribers_stale: Gauge::default(),
            config_rejected: Gauge::default(),
            updates_sent: Family::default(),
            other_content: Counter::default(),
            verdict_changes: Family::default(),
            failover_actions: Family::default(),
            failover_held: Gauge::default(),
            failover_removed: Gauge::default(),
            edge_health: Family::default(),
            rib_generation: Gauge::default(),
            rib_prefixes: Family::default(),
            rib_loaded_at: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("sextant");
        r.register(
            "routing_version",
            "Version of the current routing table",
            m.routing_version.clone(),
        );
        r.register(
            "fleet_generation",
            "Generation of the stored fleet",
            m.fleet_generation.clone(),
        );
        r.register("drains_active", "Active drains", m.drains_active.clone());
        r.register(
            "bgp_rib_generation",
            "Generation of the loaded BGP RIB map (0: none)",
            m.rib_generation.clone(),
        );
        r.register(
            "bgp_rib_prefixes",
            "Prefixes of the loaded BGP RIB map, by family",
            m.rib_prefixes.clone(),
        );
        r.register(
            "bgp_rib_loaded_at_seconds",
            "When the loaded BGP RIB map was loaded (unix seconds; watch its age)",
            m.rib_loaded_at.clone(),
        );
        r.register(
            "routing_unserved_rows",
            "(service, group) rows with unserved demand",
            m.unserved_rows.clone(),
        );
        r.register(
            "routing_failed_open_rows",
            "(service, group) rows failed open (every candidate unhealthy)",
            m.failed_open_rows.clone(),
        );
        r.register(
            "routing_churn_ratio",
            "Share of demand that changed edge in the latest routing version",
            m.routing_churn.clone(),
        );
        r.register(
            "edge_predicted_utilization_ratio",
            "Predicted load over declared capacity, per edge",
            m.edge_utilization.clone(),
        );
        r.register(
            "subscribers",
            "Config subscribers by kind and connection state",
            m.subscribers.clone(),
        );
        r.register(
            "subscribers_stale",
            "Subscribers holding an old config for longer than the stale threshold",
            m.subscribers_stale.clone(),
        );
        r.register(
            "config_updates_sent",
            "Config versions sent to subscribers (each in one or more messages), whole or as a delta",
            m.updates_sent.clone(),
        );
        r.register(
            "config_other_content_claims",
            "Subscribers that named a version held here with another digest (another history, such as a store restored from a backup) and got the current config whole",
            m.other_content.clone(),
        );
        r.register(
            "config_rejected",
            "1 when the latest routing version failed its consistency check and is not served",
            m.config_rejected.clone(),
        );
        r.register(
            "health_verdict_changes",
            "Edge health verdict changes, by the verdict reached",
            m.verdict_changes.clone(),
        );
        r.register(
            "failover_actions",
            "Automated failover actions: failover (edge taken out), restore, held (beyond the bound)",
            m.failover_actions.clone(),
        );
        r.register(
            "failover_held_edges",
            "Edges that look down but stay in the routing because automation reached its bound (alarm)",
            m.failover_held.clone(),
        );
        r.register(
            "failover_removed_capacity_ratio",
            "Share of total capacity automated failover has taken out",
            m.failover_removed.clone(),
        );
        r.register(
            "edge_health",
            "Edge health verdict: 1 up, 0 down, -1 unknown",
            m.edge_health.clone(),
        );
        m
    }

    /// Updates the subscriber gauges.
    pub fn observe_subscribers(&self, d: &Distribution, stale_after_ms: u64) {
        let now = u64::try_from(d.clock.now_ms()).unwrap_or(0);
        let subs = crate::grpc::cluster::subscribers(d, stale_after_ms, now);
        self.subscribers.clear();
        for kind in ["proxy", "dns"] {
            for (state, connected) in [("connected", true), ("disconnected", false)] {
                let n = subs
                    .iter()
                    .filter(|s| s.kind == kind && s.connected == connected)
                    .count();
                self.subscribers
                    .get_or_create(&vec![
                        ("kind".to_owned(), kind.to_owned()),
                        ("state".to_owned(), state.to_owned()),
                    ])
                    .set(n as i64);
            }
        }
        self.subscribers_stale
            .set(subs.iter().filter(|s| s.stale).count() as i64);
        self.config_rejected.set(i64::from(d.alarm().is_some()));
        let c = &d.counts;
        let load = |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
        for (update, n) in [("full", &c.full), ("delta", &c.delta)] {
            catch_up(
                &self
                    .updates_sent
                    .get_or_create(&vec![("update".to_owned(), update.to_owned())]),
                load(n),
            );
        }
        catch_up(&self.other_content, load(&c.other_content));
    }

    /// Updates the gauges from a snapshot.
    pub fn observe(&self, snap: &Snapshot) {
        self.routing_version
            .set(i64::try_from(snap.version()).unwrap_or(i64::MAX));
        self.fleet_generation
            .set(i64::try_from(snap.fleet_generation).unwrap_or(i64::MAX));
        self.drains_active
            .set(i64::try_from(snap.drains.len()).unwrap_or(i64::MAX));
        if let Some(rib) = &snap.rib {
            self.rib_generation
                .set(i64::try_from(rib.meta.generation).unwrap_or(i64::MAX));
            self.rib_loaded_at.set(rib.meta.loaded_at_ms / 1000);
            for (family, n) in [("ipv4", rib.map.v4_len()), ("ipv6", rib.map.v6_len())] {
                self.rib_prefixes
                    .get_or_create(&vec![("family".to_owned(), family.to_owned())])
                    .set(n as i64);
            }
        }
        let f = &snap.failover;
        for (fam, counts) in [
            (
                &self.verdict_changes,
                f.verdict_changes
                    .iter()
                    .map(|(k, v)| (("to", *k), *v))
                    .collect::<Vec<_>>(),
            ),
            (
                &self.failover_actions,
                f.actions
                    .iter()
                    .map(|(k, v)| (("action", *k), *v))
                    .collect(),
            ),
        ] {
            for ((label, value), n) in counts {
                catch_up(
                    &fam.get_or_create(&vec![(label.to_owned(), value.to_owned())]),
                    n,
                );
            }
        }
        self.failover_held.set(f.held.len() as i64);
        self.failover_removed.set(f.removed_share);
        self.edge_health.clear();
        for (edge, s) in &snap.signals.edges {
            let v = match s.health {
                _ if s.held => 0,
                sextant_core::signals::Health::Up => 1,
                sextant_core::signals::Health::Down => 0,
                sextant_core::signals::Health::Unknown => -1,
            };
            self.edge_health
                .get_or_create(&vec![("edge".to_owned(), edge.to_string())])
                .set(v);
        }
        if let Some(t) = &snap.table {
            let rows = || t.routing.rows().map(|(_, _, r)| r);
            self.unserved_rows
                .set(rows().filter(|r| r.unserved > 0.0).count() as i64);
            self.failed_open_rows
                .set(rows().filter(|r| r.failed_open).count() as i64);
            self.routing_churn.set(t.meta.churn);
            self.edge_utilization.clear();
            for (edge, load) in &t.routing.edges {
                self.edge_utilization
                    .get_or_create(&vec![("edge".to_owned(), edge.to_string())])
                    .set(load.utilization);
            }
        }
    }
}

/// Brings `counter` up to `n`, a count kept elsewhere.
fn catch_up(counter: &Counter, n: u64) {
    let seen = counter.get();
    if n > seen {
        counter.inc_by(n - seen);
    }
}

/// Keeps `metrics` in step with the published snapshots (at once) and the
/// subscribers (every second) until the loop stops.
pub async fn follow(
    metrics: Arc<Metrics>,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    distribution: Arc<Distribution>,
    stale_after_ms: u64,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        let snap = snapshots.borrow_and_update().clone();
        metrics.observe(&snap);
        loop {
            tokio::select! {
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    break;
                }
                _ = tick.tick() => metrics.observe_subscribers(&distribution, stale_after_ms),
            }
        }
    }
}

/// Serves `/metrics` (Prometheus text) and `/healthz` on `listener`.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                warn!(error = %e, "metrics accept failed");
                continue;
            }
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let registry = registry.clone();
                async move { Ok::<_, std::convert::Infallible>(respond(&req, &registry)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!(%peer, error = %e, "metrics connection ended");
            }
        });
    }
}

fn respond<B>(req: &Request<B>, registry: &Registry) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, content_type: &'static str, body: String| {
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        if let Ok(v) = content_type.parse() {
            resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        resp
    };
    match req.uri().path() {
        "/metrics" => {
            let mut body = String::new();
            match encode(&mut body, registry) {
                Ok(()) => text(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    body,
                ),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("cannot encode metrics: {e}\n"),
                ),
            }
        }
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// Binds the metrics listener and logs its address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr).await?;
    info!("listening for metrics on {}", listener.local_addr()?);
    Ok(listener)
}
