//! What an edge proxy forwards to: origins with their weights and
//! endpoints, checked before use, and the passive health of each endpoint.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ipnet::IpNet;
use sextant_proto::v1 as pb;

use crate::subscriber::Build;

/// Consecutive failures (connect errors or 5xx) that eject an endpoint.
pub const EJECT_AFTER: u32 = 5;

/// Passive health of one endpoint, shared across config versions.
#[derive(Debug)]
pub struct EndpointState {
    pub addr: SocketAddr,
    failures: AtomicU32,
    ejected: AtomicBool,
    /// Unix ms of the ejection (0 when not ejected).
    ejected_at_ms: AtomicU64,
}

impl EndpointState {
    fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            failures: AtomicU32::new(0),
            ejected: AtomicBool::new(false),
            ejected_at_ms: AtomicU64::new(0),
        }
    }

    pub fn is_ejected(&self) -> bool {
        self.ejected.load(Ordering::Relaxed)
    }

    /// Records a success: resets the failure run.
    pub fn success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// Records a failure; returns true when it ejected the endpoint.
    pub fn failure(&self, now_ms: u64) -> bool {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= EJECT_AFTER && !self.ejected.swap(true, Ordering::Relaxed) {
            self.ejected_at_ms.store(now_ms, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Re-admits the endpoint (after a successful probe).
    pub fn readmit(&self) {
        self.failures.store(0, Ordering::Relaxed);
        self.ejected.store(false, Ordering::Relaxed);
        self.ejected_at_ms.store(0, Ordering::Relaxed);
    }
}

/// Upper bounds (µs) of the buckets of [`OriginStats::response_time`]:
/// 250 µs to 30 s.
pub const RESPONSE_TIME_BOUNDS_US: [u64; 16] = [
    250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000, 30_000_000,
];

/// What one origin has served, by id, across config versions.
#[derive(Debug, Default)]
pub struct OriginStats {
    /// Answers from the origin by status class: 1xx..5xx at index 1..5.
    pub responses: [AtomicU64; 6],
    /// Requests it did not answer: connect errors, timeouts, answers cut
    /// or refused as malformed.
    pub failures: AtomicU64,
    /// Time from sending a request to the origin to its response head.
    pub response_time: Histogram,
}

impl OriginStats {
    /// Records an answer with `status`, whose head came `elapsed` after the
    /// request went out.
    pub fn answered(&self, status: u16, elapsed: std::time::Duration) {
        if let Some(c) = self.responses.get(usize::from(status / 100)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.response_time.observe(elapsed);
    }
}

/// A latency histogram of atomics (buckets of [`RESPONSE_TIME_BOUNDS_US`],
/// then the rest), cheap enough for every request.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; RESPONSE_TIME_BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: std::time::Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = RESPONSE_TIME_BOUNDS_US.partition_point(|&b| b < us);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// (sum in seconds, count, (upper bound in seconds, count) of each
    /// bucket, `+Inf` last). The counts are each bucket's own: the text
    /// encoder makes them cumulative.
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut total = 0;
        let mut out = Vec::with_capacity(self.buckets.len());
        for (i, b) in self.buckets.iter().enumerate() {
            let n = b.load(Ordering::Relaxed);
            total += n;
            let bound = RESPONSE_TIME_BOUNDS_US
                .get(i)
                .map_or(f64::INFINITY, |&us| us as f64 / 1e6);
            out.push((bound, n));
        }
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        (sum, total, out)
    }
}

/// Endpoint states by address, so that health survives config swaps, and
/// origins' stats by id, so that their counters do.
#[derive(Debug, Default)]
pub struct Endpoints {
    by_addr: Mutex<HashMap<SocketAddr, Arc<EndpointState>>>,
    origins: Mutex<std::collections::BTreeMap<String, Arc<OriginStats>>>,
}

impl Endpoints {
    pub fn get(&self, addr: SocketAddr) -> Arc<EndpointState> {
        let mut m = self
            .by_addr
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        m.entry(addr)
            .or_insert_with(|| Arc::new(EndpointState::new(addr)))
            .clone()
    }

    /// The stats of origin `id`.
    pub fn origin_stats(&self, id: &str) -> Arc<OriginStats> {
        let mut m = self
            .origins
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(s) = m.get(id) {
            return s.clone();
        }
        m.entry(id.to_owned()).or_default().clone()
    }

    /// Every origin's stats, by id.
    pub fn all_origin_stats(&self) -> Vec<(String, Arc<OriginStats>)> {
        self.origins
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(id, s)| (id.clone(), s.clone()))
            .collect()
    }

    /// Every ejected endpoint.
    pub fn ejected(&self) -> Vec<Arc<EndpointState>> {
        self.by_addr
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .filter(|e| e.is_ejected())
            .cloned()
            .collect()
    }
}

/// One origin as the proxy uses it.
#[derive(Debug)]
pub struct Origin {
    pub id: String,
    /// `id` as a header value (`x-sextant-origin`), made once.
    pub header: hyper::header::HeaderValue,
    pub weight: f64,
    pub endpoints: Vec<Arc<EndpointState>>,
    /// What it has served (shared with earlier and later versions).
    pub stats: Arc<OriginStats>,
    next: AtomicU32,
}

impl Origin {
    /// The next healthy endpoint, round robin; none when all are ejected.
    pub fn pick(&self) -> Option<&Arc<EndpointState>> {
        let n = self.endpoints.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) as usize;
        (0..n)
            .map(|i| &self.endpoints[(start + i) % n])
            .find(|e| !e.is_ejected())
    }

    fn usable(&self) -> bool {
        self.endpoints.iter().any(|e| !e.is_ejected())
    }
}

/// The upstream of an edge proxy for one config version.
#[derive(Debug)]
pub struct Upstream {
    pub origins: Vec<Origin>,
}

impl Upstream {
    /// Picks an origin by weight among those with a healthy endpoint
    /// (renormalised), skipping `except`.
    pub fn pick(&self, except: Option<&str>) -> Option<&Origin> {
        let usable = |o: &&Origin| o.weight > 0.0 && o.usable() && Some(o.id.as_str()) != except;
        let total: f64 = self.origins.iter().filter(usable).map(|o| o.weight).sum();
        if total <= 0.0 {
            return None;
        }
        let mut x = fastrand::f64() * total;
        let mut last = None;
        for o in self.origins.iter().filter(usable) {
            last = Some(o);
            if x < o.weight {
                return Some(o);
            }
            x -= o.weight;
        }
        last
    }
}

/// Builds and checks [`Upstream`]s from pushed configs.
#[derive(Debug)]
pub struct UpstreamBuilder {
    pub endpoints: Arc<Endpoints>,
    /// Endpoints must be inside one of these (empty: any).
    pub allowed: Vec<IpNet>,
}

impl Build for UpstreamBuilder {
    type Output = Upstream;

    fn build(&self, _version: u64, config: &pb::NodeConfig) -> Result<Upstream, String> {
        let by_id: HashMap<&str, &pb::OriginTarget> =
            config.origins.iter().map(|o| (o.id.as_str(), o)).collect();
        let mut sum = 0.0;
        let mut origins = Vec::new();
        for w in &config.upstream {
            if !(w.weight.is_finite() && w.weight >= 0.0) {
                return Err(format!(
                    "upstream weight of origin {} is {}",
                    w.origin, w.weight
                ));
            }
            sum += w.weight;
            let o = by_id.get(w.origin.as_str()).ok_or_else(|| {
                format!(
                    "upstream names origin {} which the config does not define",
                    w.origin
                )
            })?;
            if o.endpoints.is_empty() {
                return Err(format!("origin {} has no endpoints", o.id));
            }
            let mut endpoints = Vec::new();
            for ep in &o.endpoints {
                let addr: SocketAddr = ep.parse().map_err(|_| {
                    format!("origin {}: endpoint {ep:?} is not an IP:port (the edge proxy does not resolve names)", o.id)
                })?;
                if !self.allowed.is_empty() && !self.allowed.iter().any(|n| n.contains(&addr.ip()))
                {
                    return Err(format!(
                        "origin {}: endpoint {addr} is outside the allowed upstream ranges ({})",
                        o.id,
                        self.allowed
                            .iter()
                            .map(|n| n.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
                endpoints.push(self.endpoints.get(addr));
            }
            origins.push(Origin {
                header: hyper::header::HeaderValue::from_str(&o.id)
                    .map_err(|_| format!("origin id {:?} is not a valid header value", o.id))?,
                id: o.id.clone(),
                weight: w.weight,
                endpoints,
                stats: self.endpoints.origin_stats(&o.id),
                next: AtomicU32::new(0),
            });
        }
        if !config.upstream.is_empty() && (sum - 1.0).abs() > 1e-6 {
            return Err(format!("upstream weights sum to {sum}, not 1"));
        }
        Ok(Upstream { origins })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(endpoint: &str, weights: &[(&str, f64)]) -> pb::NodeConfig {
        pb::NodeConfig {
            origins: ["a", "b"]
                .iter()
                .map(|id| pb::OriginTarget {
                    id: (*id).into(),
                    endpoints: vec![endpoint.into()],
                })
                .collect(),
            upstream: weights
                .iter()
                .map(|(o, w)| pb::OriginWeight {
                    origin: (*o).into(),
                    weight: *w,
                })
                .collect(),
            ..pb::NodeConfig::default()
        }
    }

    fn builder(allowed: &[&str]) -> UpstreamBuilder {
        UpstreamBuilder {
            endpoints: Arc::new(Endpoints::default()),
            allowed: allowed.iter().map(|n| n.parse().expect("net")).collect(),
        }
    }

    #[test]
    fn configs_are_checked_before_use() {
        let b = builder(&["127.0.0.0/8"]);
        assert!(b
            .build(1, &config("127.0.0.1:80", &[("a", 0.25), ("b", 0.75)]))
            .is_ok());
        let e = b
            .build(1, &config("127.0.0.1:80", &[("a", 0.5)]))
            .expect_err("sum");
        assert!(e.contains("sum to 0.5"), "{e}");
        let e = b
            .build(1, &config("127.0.0.1:80", &[("z", 1.0)]))
            .expect_err("unknown");
        assert!(e.contains("origin z"), "{e}");
        let e = b
            .build(1, &config("origin.example.net:80", &[("a", 1.0)]))
            .expect_err("name");
        assert!(e.contains("not an IP:port"), "{e}");
        let e = b
            .build(1, &config("10.0.0.1:80", &[("a", 1.0)]))
            .expect_err("range");
        assert!(
            e.contains("outside the allowed upstream ranges (127.0.0.0/8)"),
            "{e}"
        );
        assert!(builder(&[])
            .build(1, &config("10.0.0.1:80", &[("a", 1.0)]))
            .is_ok());
    }

    #[test]
    fn picks_follow_weights_and_skip_ejected_origins() {
        let b = builder(&[]);
        let mut c = config("127.0.0.1:80", &[("a", 0.2), ("b", 0.8)]);
        c.origins[1].endpoints = vec!["127.0.0.2:80".into()];
        let up = b.build(1, &c).expect("valid");
        let n = 20_000;
        let a = (0..n)
            .filter(|_| up.pick(None).map(|o| o.id.as_str()) == Some("a"))
            .count();
        let share = a as f64 / n as f64;
        assert!((share - 0.2).abs() < 0.02, "share of a: {share}");
        for _ in 0..EJECT_AFTER {
            up.origins[1].endpoints[0].failure(1);
        }
        assert!(up.origins[1].endpoints[0].is_ejected());
        assert!((0..100).all(|_| up.pick(None).map(|o| o.id.as_str()) == Some("a")));
        assert!(up.pick(Some("a")).is_none());
        // Health survives a rebuild (same address, same state).
        let again = b.build(2, &c).expect("valid");
        assert!(again.origins[1].endpoints[0].is_ejected());
        assert_eq!(b.endpoints.ejected().len(), 1);
        again.origins[1].endpoints[0].readmit();
        assert!(!up.origins[1].endpoints[0].is_ejected());
    }
}
