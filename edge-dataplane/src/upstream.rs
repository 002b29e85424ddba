//! What an edge proxy forwards to: origins with their weights and
//! endpoints, checked before use, and the passive health of each endpoint.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use sextant_proto::v1 as pb;

use crate::subscriber::Build;

/// Consecutive failures (connect errors or 5xx) that eject an endpoint.
pub const EJECT_AFTER: u32 = 5;
/// How long a first ejection lasts; the n-th in a row (with no success in
/// between) lasts n times as long, up to [`MAX_EJECTION`].
pub const BASE_EJECTION: Duration = Duration::from_secs(10);
pub const MAX_EJECTION: Duration = Duration::from_secs(300);

/// Passive health of one endpoint, shared across config versions.
///
/// An endpoint is ejected after [`EJECT_AFTER`] failures in a row, for
/// the base ejection time times the number of ejections in a row, and
/// then re-admitted once a TCP probe succeeds (a failed probe starts the
/// wait again). Re-admitted after an ejection, it is on probation: its
/// first failure ejects it again (for longer), its first success ends
/// the run. An ejected endpoint that answers a request (one sent by
/// panic routing, or one under way at its ejection) is re-admitted on
/// probation at once.
///
/// Times are milliseconds of [`mono_ms`], a monotonic clock: stepping the
/// wall clock neither lengthens nor ends an ejection.
#[derive(Debug)]
pub struct EndpointState {
    pub addr: SocketAddr,
    failures: AtomicU32,
    /// Ejections in a row (bits 48 and up) and the time of the ejection
    /// under way (the low 48 bits; 0: not ejected), in one word so that
    /// they change together.
    ejection: AtomicU64,
    /// Endpoints ejected now, shared by every state of one [`Endpoints`]:
    /// while it is 0, a pick need not look at each endpoint's health.
    ejected_now: Arc<AtomicUsize>,
}

const AT: u64 = (1 << 48) - 1;

/// Milliseconds of a monotonic clock, from 1 (0 means "not ejected").
pub fn mono_ms() -> u64 {
    mono_ms_at(std::time::Instant::now())
}

/// [`mono_ms`] at `t`.
pub fn mono_ms_at(t: std::time::Instant) -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(std::time::Instant::now);
    u64::try_from(t.saturating_duration_since(start).as_millis())
        .unwrap_or(AT - 1)
        .min(AT - 1)
        + 1
}

impl EndpointState {
    fn new(addr: SocketAddr, ejected_now: Arc<AtomicUsize>) -> Self {
        Self {
            addr,
            failures: AtomicU32::new(0),
            ejection: AtomicU64::new(0),
            ejected_now,
        }
    }

    pub fn is_ejected(&self) -> bool {
        self.ejection.load(Ordering::Relaxed) & AT != 0
    }

    /// Records the success of a request sent at `sent_ms` ([`mono_ms`]):
    /// resets the
    /// failure run and the ejections in a row. An ejected endpoint is
    /// re-admitted, on probation, by the answer to a request sent after
    /// its ejection (by panic routing); answers to requests sent before
    /// (under way when it was ejected) change nothing.
    pub fn success(&self, sent_ms: u64) {
        let ejection = self.ejection.load(Ordering::Relaxed);
        let at = ejection & AT;
        if at != 0 {
            if sent_ms >= at {
                self.readmit();
            }
            return;
        }
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if ejection != 0 {
            // Not ejected (else the time bits would be set): only the
            // count of ejections in a row is left to clear, unless an
            // ejection lands meanwhile.
            let _ = self
                .ejection
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |e| {
                    (e & AT == 0).then_some(0)
                });
        }
    }

    /// Records a failure at `now_ms` ([`mono_ms`]); returns true when it
    /// ejected the endpoint.
    pub fn failure(&self, now_ms: u64) -> bool {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n < EJECT_AFTER {
            return false;
        }
        let at = now_ms.clamp(1, AT);
        let ejected = self
            .ejection
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |e| {
                (e & AT == 0).then(|| (((e >> 48) + 1).min(0xffff) << 48) | at)
            })
            .is_ok();
        if ejected {
            self.ejected_now.fetch_add(1, Ordering::Relaxed);
        }
        ejected
    }

    /// Whether the endpoint is ejected and its ejection, `base` times the
    /// ejections in a row (at most [`MAX_EJECTION`]), has run out by
    /// `now_ms` ([`mono_ms`]): time to probe it.
    pub fn due(&self, now_ms: u64, base: Duration) -> bool {
        let e = self.ejection.load(Ordering::Relaxed);
        let at = e & AT;
        if at == 0 {
            return false;
        }
        let n = u32::try_from(e >> 48).unwrap_or(u32::MAX).max(1);
        let lasts = base.saturating_mul(n).min(MAX_EJECTION);
        let lasts = u64::try_from(lasts.as_millis()).unwrap_or(u64::MAX);
        now_ms >= at.saturating_add(lasts)
    }

    /// A probe failed at `now_ms`: the ejection's wait starts again.
    pub fn probe_failed(&self, now_ms: u64) {
        let at = now_ms.clamp(1, AT);
        let _ = self
            .ejection
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |e| {
                (e & AT != 0).then_some((e & !AT) | at)
            });
    }

    /// Re-admits the endpoint, if it is still ejected (after a successful
    /// probe, or an answer), on probation: one more failure ejects it
    /// again, for longer. One re-admitted meanwhile is left as it is.
    pub fn readmit(&self) {
        if self
            .ejection
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |e| {
                (e & AT != 0).then_some(e & !AT)
            })
            .is_ok()
        {
            self.failures.store(EJECT_AFTER - 1, Ordering::Relaxed);
            self.ejected_now.fetch_sub(1, Ordering::Relaxed);
        }
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
#[derive(Debug)]
pub struct Endpoints {
    by_addr: Mutex<HashMap<SocketAddr, Arc<EndpointState>>>,
    origins: Mutex<std::collections::BTreeMap<String, Arc<OriginStats>>>,
    /// How long a first ejection lasts ([`BASE_EJECTION`]).
    pub base_ejection: Duration,
    /// Endpoints of `by_addr` ejected now.
    ejected_now: Arc<AtomicUsize>,
}

impl Default for Endpoints {
    fn default() -> Self {
        Self {
            ejected_now: Arc::default(),
            by_addr: Mutex::default(),
            origins: Mutex::default(),
            base_ejection: BASE_EJECTION,
        }
    }
}

impl Endpoints {
    /// With first ejections lasting `base` (instead of [`BASE_EJECTION`]).
    pub fn with_base_ejection(base: Duration) -> Self {
        Self {
            base_ejection: base,
            ..Self::default()
        }
    }

    pub fn get(&self, addr: SocketAddr) -> Arc<EndpointState> {
        let mut m = self
            .by_addr
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        m.entry(addr)
            .or_insert_with(|| Arc::new(EndpointState::new(addr, self.ejected_now.clone())))
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

    /// Every ejected endpoint that a config in use still names. The
    /// states of endpoints that none names any more (only this map holds
    /// them) are dropped first: a removed endpoint is neither reported
    /// ejected nor probed, and comes back, if it does, with a clean slate.
    pub fn ejected(&self) -> Vec<Arc<EndpointState>> {
        let mut m = self
            .by_addr
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        m.retain(|_, e| {
            let used = Arc::strong_count(e) > 1;
            if !used && e.is_ejected() {
                self.ejected_now.fetch_sub(1, Ordering::Relaxed);
            }
            used
        });
        m.values().filter(|e| e.is_ejected()).cloned().collect()
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
    /// The next healthy endpoint, round robin over the healthy ones (an
    /// ejected endpoint's share is spread evenly, not handed to its
    /// neighbour); none when all are ejected.
    pub fn pick(&self) -> Option<&Arc<EndpointState>> {
        self.pick_where(|e| !e.is_ejected())
    }

    /// The next endpoint, round robin, among those `ok` takes. Should
    /// another worker eject or re-admit one between the count and the
    /// walk, the first that `ok` takes is returned: never none while one
    /// is left.
    fn pick_where(&self, ok: impl Fn(&EndpointState) -> bool) -> Option<&Arc<EndpointState>> {
        let k = self.endpoints.iter().filter(|e| ok(e)).count();
        if k == 0 {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) as usize % k;
        self.endpoints
            .iter()
            .filter(|e| ok(e))
            .nth(i)
            .or_else(|| self.endpoints.iter().find(|e| ok(e)))
    }

    /// The next endpoint, round robin over all.
    fn next_any(&self) -> Option<&Arc<EndpointState>> {
        let n = self.endpoints.len();
        if n == 0 {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) as usize % n;
        self.endpoints.get(i)
    }

    fn usable(&self) -> bool {
        self.endpoints.iter().any(|e| !e.is_ejected())
    }

    /// Its weight times the share of its endpoints that `ok` takes: what
    /// those endpoints can carry, if the weight is the origin's capacity
    /// spread evenly over its endpoints.
    fn weight_of(&self, ok: impl Fn(&EndpointState) -> bool) -> f64 {
        let n = self.endpoints.len();
        if n == 0 || self.weight <= 0.0 {
            return 0.0;
        }
        match self.endpoints.iter().filter(|e| ok(e)).count() {
            0 => 0.0,
            // However small the weight, an origin with an endpoint left
            // stays positive (a product may underflow to 0).
            k => (self.weight * k as f64 / n as f64).max(f64::MIN_POSITIVE),
        }
    }
}

/// Where one attempt at a request goes.
#[derive(Debug, Clone, Copy)]
pub struct Pick<'a> {
    pub origin: &'a Origin,
    pub endpoint: &'a Arc<EndpointState>,
    /// No endpoint was healthy: this one is ejected, tried anyway.
    pub panic: bool,
}

/// What a retry avoids: the origin and endpoint that failed.
#[derive(Debug, Clone, Copy)]
pub struct Failed<'a> {
    pub origin: &'a str,
    pub endpoint: SocketAddr,
}

/// The upstream of an edge proxy for one config version.
#[derive(Debug)]
pub struct Upstream {
    pub origins: Vec<Origin>,
    /// Endpoints ejected now (of every config: see [`Endpoints`]).
    ejected_now: Arc<AtomicUsize>,
}

impl Upstream {
    /// Whether some origin of positive weight has a healthy endpoint.
    pub fn healthy(&self) -> bool {
        self.origins.iter().any(|o| o.weight > 0.0 && o.usable())
    }

    /// Where an attempt goes. By weight among origins with a healthy
    /// endpoint, each origin's weight scaled by the share of its endpoints
    /// in service: what ejected endpoints would have carried is spread
    /// over every endpoint left, of all origins, in proportion to their
    /// weights, rather than piled on their origin's few survivors. A retry
    /// (`after` a failure) goes to another origin when there is one, else
    /// to another healthy endpoint of the same. When
    /// no endpoint is healthy at all, ejection is ignored (panic routing,
    /// as Envoy's panic threshold): an outage of passive health's making
    /// is worse than sending requests to endpoints that may have
    /// recovered. None only when there is no origin of positive weight
    /// (or, for a retry, nothing but the endpoint that failed).
    pub fn choose(&self, after: Option<Failed<'_>>) -> Option<Pick<'_>> {
        // Nothing ejected anywhere (nearly always): the weights as they
        // are, round robin within the origin, no endpoint looked at.
        if after.is_none() && self.ejected_now.load(Ordering::Relaxed) == 0 {
            if let Some(origin) = self.by_weight(|o| o.weight.max(0.0)) {
                if let Some(endpoint) = origin.next_any() {
                    return Some(Pick {
                        origin,
                        endpoint,
                        panic: false,
                    });
                }
            }
        }
        let other = |o: &Origin| after.is_none_or(|f| f.origin != o.id);
        // A retry never goes back to the address that failed, even under
        // another origin's name.
        let not_failed = |e: &EndpointState| after.is_none_or(|f| f.endpoint != e.addr);
        let good = |e: &EndpointState| !e.is_ejected() && not_failed(e);
        let in_service = |o: &Origin| if other(o) { o.weight_of(good) } else { 0.0 };
        // A few tries: another worker may eject the endpoint picked
        // between the origin's pick and its endpoint's.
        for _ in 0..3 {
            let Some(o) = self.by_weight(in_service) else {
                break;
            };
            if let Some(endpoint) = o.pick_where(good) {
                return Some(Pick {
                    origin: o,
                    endpoint,
                    panic: false,
                });
            }
        }
        // Three races lost in a row: any good endpoint, in order.
        if let Some((origin, endpoint)) = self
            .origins
            .iter()
            .filter(|o| in_service(o) > 0.0)
            .find_map(|o| o.pick_where(good).map(|e| (o, e)))
        {
            return Some(Pick {
                origin,
                endpoint,
                panic: false,
            });
        }
        if let Some(f) = after {
            if let Some(o) = self.origins.iter().find(|o| o.id == f.origin) {
                if let Some(endpoint) = o.pick_where(good) {
                    return Some(Pick {
                        origin: o,
                        endpoint,
                        panic: false,
                    });
                }
            }
        }
        if self.healthy() {
            // Healthy endpoints are left, only not for this retry.
            return None;
        }
        // Only origins with an address other than the one that failed.
        let weight = |o: &Origin| o.weight_of(not_failed);
        let o = self
            .by_weight(|o| if other(o) { weight(o) } else { 0.0 })
            .or_else(|| self.by_weight(weight))?;
        let endpoint = o.pick_where(not_failed)?;
        Some(Pick {
            origin: o,
            endpoint,
            panic: true,
        })
    }

    /// An origin drawn by `weight` (renormalised; none when all are 0).
    /// Each origin's weight is taken once.
    fn by_weight(&self, weight: impl Fn(&Origin) -> f64) -> Option<&Origin> {
        const ON_STACK: usize = 16;
        let n = self.origins.len();
        let mut stack = [0.0; ON_STACK];
        let mut heap = Vec::new();
        let ws: &mut [f64] = if n <= ON_STACK {
            &mut stack[..n]
        } else {
            heap.resize(n, 0.0);
            &mut heap
        };
        let mut total = 0.0;
        for (w, o) in ws.iter_mut().zip(&self.origins) {
            *w = weight(o);
            total += *w;
        }
        if total.is_nan() || total <= 0.0 {
            return None;
        }
        let mut x = fastrand::f64() * total;
        let mut last = None;
        for (&w, o) in ws.iter().zip(&self.origins) {
            if w <= 0.0 {
                continue;
            }
            last = Some(o);
            if x < w {
                return Some(o);
            }
            x -= w;
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
            if origins.iter().any(|o: &Origin| o.id == w.origin) {
                return Err(format!("upstream names origin {} twice", w.origin));
            }
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
        Ok(Upstream {
            origins,
            ejected_now: self.endpoints.ejected_now.clone(),
        })
    }
}

/// A config of origins (id, endpoints, weight), each named in the
/// upstream with its weight (for tests).
#[cfg(test)]
pub(crate) fn test_config<E: ToString>(origins: &[(&str, &[E], f64)]) -> pb::NodeConfig {
    pb::NodeConfig {
        origins: origins
            .iter()
            .map(|(id, endpoints, _)| pb::OriginTarget {
                id: (*id).into(),
                endpoints: endpoints.iter().map(ToString::to_string).collect(),
            })
            .collect(),
        upstream: origins
            .iter()
            .map(|(id, _, weight)| pb::OriginWeight {
                origin: (*id).into(),
                weight: *weight,
            })
            .collect(),
        ..pb::NodeConfig::default()
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
        let mut twice = config("10.0.0.1:80", &[("a", 0.5)]);
        twice.upstream.push(twice.upstream[0].clone());
        let e = builder(&[]).build(1, &twice).expect_err("twice");
        assert!(e.contains("upstream names origin a twice"), "{e}");
    }

    #[test]
    fn picks_follow_weights_and_skip_ejected_origins_until_none_is_left() {
        let b = builder(&[]);
        let mut c = config("127.0.0.1:80", &[("a", 0.2), ("b", 0.8)]);
        c.origins[1].endpoints = vec!["127.0.0.2:80".into()];
        let up = b.build(1, &c).expect("valid");
        let n = 20_000;
        let of = |p: Option<Pick<'_>>| p.map(|p| (p.origin.id.clone(), p.panic));
        let a = (0..n)
            .filter(|_| of(up.choose(None)) == Some(("a".into(), false)))
            .count();
        let share = a as f64 / n as f64;
        assert!((share - 0.2).abs() < 0.02, "share of a: {share}");
        for _ in 0..EJECT_AFTER {
            up.origins[1].endpoints[0].failure(1);
        }
        assert!(up.origins[1].endpoints[0].is_ejected());
        assert!(up.healthy());
        assert!((0..100).all(|_| of(up.choose(None)) == Some(("a".into(), false))));
        // A retry after a's only endpoint failed: b is ejected, a has no
        // other endpoint, and a healthy endpoint is left (the one that
        // failed, not yet ejected): no panic, nothing to retry on.
        let failed = Failed {
            origin: "a",
            endpoint: "127.0.0.1:80".parse().expect("addr"),
        };
        assert!(up.choose(Some(failed)).is_none());
        // Health survives a rebuild (same address, same state).
        let again = b.build(2, &c).expect("valid");
        assert!(again.origins[1].endpoints[0].is_ejected());
        assert_eq!(b.endpoints.ejected().len(), 1);
        // Nothing healthy left: ejection is ignored, and the weights hold.
        for _ in 0..EJECT_AFTER {
            up.origins[0].endpoints[0].failure(1);
        }
        assert!(!up.healthy());
        let picks: Vec<_> = (0..n).filter_map(|_| of(up.choose(None))).collect();
        assert_eq!(picks.len(), n);
        assert!(picks.iter().all(|(_, panic)| *panic));
        let a = picks.iter().filter(|(o, _)| o == "a").count() as f64 / n as f64;
        assert!((a - 0.2).abs() < 0.02, "share of a in panic: {a}");
        // A panic retry goes elsewhere than what failed.
        assert!((0..100).all(|_| of(up.choose(Some(failed))) == Some(("b".into(), true))));
        again.origins[1].endpoints[0].readmit();
        assert!(!up.origins[1].endpoints[0].is_ejected());
    }

    #[test]
    fn ejections_last_longer_in_a_row_and_a_readmitted_endpoint_is_on_probation() {
        let e = EndpointState::new("127.0.0.1:80".parse().expect("addr"), Arc::default());
        let base = Duration::from_secs(10);
        for _ in 0..EJECT_AFTER - 1 {
            assert!(!e.failure(1_000));
        }
        assert!(!e.due(1_000, base), "not ejected yet");
        assert!(e.failure(1_000));
        assert!(!e.due(10_999, base));
        assert!(e.due(11_000, base));
        // Re-admitted: one failure ejects it again, for twice as long.
        e.readmit();
        assert!(!e.is_ejected());
        assert!(e.failure(20_000));
        assert!(!e.due(39_999, base));
        assert!(e.due(40_000, base));
        // An answer to a request sent while ejected (by panic routing)
        // re-admits it, on probation: the next failure ejects it again,
        // for three times as long.
        e.success(40_500);
        assert!(!e.is_ejected());
        assert!(e.failure(41_000));
        assert!(!e.due(70_999, base));
        assert!(e.due(71_000, base));
        // A success while in service ends the run: the next ejection is a
        // first one again and takes a whole run of failures.
        e.success(42_000);
        e.success(42_000);
        for _ in 0..EJECT_AFTER - 1 {
            assert!(!e.failure(50_000));
        }
        assert!(e.failure(50_000));
        assert!(e.due(60_000, base));
        // A failed probe starts the wait again.
        e.probe_failed(60_000);
        assert!(!e.due(69_999, base));
        assert!(e.due(70_000, base));
        // However many in a row, at most MAX_EJECTION.
        for _ in 0..100 {
            e.readmit();
            e.failure(1);
        }
        let max = u64::try_from(MAX_EJECTION.as_millis()).expect("ms");
        assert!(!e.due(max, base));
        assert!(e.due(max + 1, base));
    }
}

#[cfg(test)]
mod endpoint_health {
    use super::*;
    use std::sync::atomic::AtomicBool;

    /// Ejects `e` with a run of failures at `now_ms`.
    fn eject(e: &EndpointState, now_ms: u64) {
        for _ in 0..EJECT_AFTER {
            e.failure(now_ms);
        }
    }

    /// The upstream `config` makes as version `version`.
    fn build(b: &UpstreamBuilder, version: u64, config: &pb::NodeConfig) -> Upstream {
        b.build(version, config).expect("valid")
    }

    fn builder() -> UpstreamBuilder {
        UpstreamBuilder {
            endpoints: Arc::new(Endpoints::default()),
            allowed: Vec::new(),
        }
    }

    /// With one endpoint of three ejected, its share is spread over the
    /// other two evenly, not all handed to its neighbour.
    #[test]
    fn round_robin_spreads_an_ejected_endpoints_share_evenly() {
        let b = builder();
        let up = build(
            &b,
            1,
            &test_config(&[("a", &["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"], 1.0)]),
        );
        let o = &up.origins[0];
        eject(&o.endpoints[0], 1);
        assert!(o.endpoints[0].is_ejected());
        let mut counts: HashMap<SocketAddr, usize> = HashMap::new();
        for _ in 0..3000 {
            *counts.entry(o.pick().expect("healthy").addr).or_default() += 1;
        }
        let at = |a: &str| counts[&a.parse::<SocketAddr>().expect("addr")];
        let (b2, b3) = (at("10.0.0.2:80"), at("10.0.0.3:80"));
        assert!(
            (b2 as i64 - b3 as i64).abs() < 300,
            "the two healthy endpoints should share evenly: .2 got {b2}, .3 got {b3}"
        );
    }

    /// An origin that lost some endpoints keeps the share those left can
    /// carry; the rest goes to every endpoint left, of all origins, by
    /// weight: each takes the same extra load, rather than a's one
    /// survivor taking double.
    #[test]
    fn ejected_endpoints_share_goes_to_every_endpoint_left_by_weight() {
        let b = builder();
        let up = build(
            &b,
            1,
            &test_config(&[
                ("a", &["10.0.0.1:80", "10.0.0.2:80"], 0.5),
                ("b", &["10.0.0.3:80"], 0.5),
            ]),
        );
        let n = 30_000;
        let share_of_a = || {
            (0..n)
                .filter(|_| up.choose(None).expect("healthy").origin.id == "a")
                .count() as f64
                / n as f64
        };
        let a = share_of_a();
        assert!((a - 0.5).abs() < 0.02, "all in service: a took {a}");
        eject(&up.origins[0].endpoints[0], 1);
        // a carries 0.5 × 1/2 of b's 0.5: a third of the traffic.
        let a = share_of_a();
        assert!(
            (a - 1.0 / 3.0).abs() < 0.02,
            "a with one endpoint of two took {a}"
        );
        // A retry after b failed still goes to a's survivor.
        let failed = Failed {
            origin: "b",
            endpoint: "10.0.0.3:80".parse().expect("addr"),
        };
        let p = up.choose(Some(failed)).expect("a's survivor");
        assert_eq!(p.endpoint.addr, "10.0.0.2:80".parse().expect("addr"));
        // With one origin, its survivors take everything.
        let one = build(
            &b,
            2,
            &test_config(&[("a", &["10.0.0.1:80", "10.0.0.2:80"], 1.0)]),
        );
        let survivor: SocketAddr = "10.0.0.2:80".parse().expect("addr");
        assert!((0..100).all(|_| one
            .choose(None)
            .is_some_and(|p| !p.panic && p.endpoint.addr == survivor)));
    }

    /// The count of endpoints ejected now, which lets picks skip looking
    /// at health while it is 0, follows ejections, re-admissions
    /// (probe or answer) and endpoints dropped from every config.
    #[test]
    fn the_ejected_count_follows_ejections_readmissions_and_removals() {
        let b = builder();
        let up = build(
            &b,
            1,
            &test_config(&[("a", &["10.0.0.1:80", "10.0.0.2:80"], 1.0)]),
        );
        let now = || b.endpoints.ejected_now.load(Ordering::Relaxed);
        let (x, y) = (&up.origins[0].endpoints[0], &up.origins[0].endpoints[1]);
        assert_eq!(now(), 0);
        // Nothing ejected: both endpoints, by turns.
        let picks: Vec<SocketAddr> = (0..4)
            .map(|_| up.choose(None).expect("pick").endpoint.addr)
            .collect();
        assert_eq!(picks.iter().filter(|a| **a == x.addr).count(), 2);
        eject(x, 1);
        assert_eq!(now(), 1);
        assert!((0..50).all(|_| up.choose(None).expect("pick").endpoint.addr == y.addr));
        x.failure(2);
        x.probe_failed(3);
        assert_eq!(now(), 1, "still the one ejection");
        x.readmit();
        x.readmit();
        assert_eq!(now(), 0);
        // Ejected, then re-admitted by an answer to a request sent after.
        x.failure(10);
        assert_eq!(now(), 1);
        x.success(11);
        assert_eq!(now(), 0);
        // Ejected, then dropped from every config: no longer counted.
        eject(y, 20);
        assert_eq!(now(), 1);
        drop(up);
        assert!(b.endpoints.ejected().is_empty());
        assert_eq!(now(), 0);
    }

    /// However small its weight, an origin with an endpoint in service is
    /// chosen when nothing else is (its scaled weight must not underflow
    /// to nothing while `healthy()` says an endpoint is left).
    #[test]
    fn a_tiny_weight_origin_with_a_healthy_endpoint_is_still_chosen() {
        let b = builder();
        let up = build(
            &b,
            1,
            &test_config(&[
                ("a", &["10.0.0.1:80"], 1.0),
                ("b", &["10.0.0.2:80", "10.0.0.3:80"], 5e-324),
            ]),
        );
        for _ in 0..EJECT_AFTER {
            up.origins[0].endpoints[0].failure(1);
            up.origins[1].endpoints[0].failure(1);
        }
        assert!(up.healthy(), "b's 10.0.0.3 is in service");
        let p = up.choose(None).expect("b's endpoint left");
        assert_eq!((p.origin.id.as_str(), p.panic), ("b", false));
    }

    /// A retry under panic routing goes to an address other than the one
    /// that failed while one is left, even when the other origin's only
    /// address is the failed one.
    #[test]
    fn a_panic_retry_finds_the_other_address_left() {
        let b = builder();
        let up = build(
            &b,
            1,
            &test_config(&[
                ("a", &["10.0.0.1:80", "10.0.0.2:80"], 0.5),
                ("b", &["10.0.0.1:80"], 0.5),
            ]),
        );
        for e in &up.origins[0].endpoints {
            eject(e, 1);
        }
        assert!(!up.healthy());
        let failed = Failed {
            origin: "a",
            endpoint: "10.0.0.1:80".parse().expect("addr"),
        };
        for _ in 0..100 {
            let p = up.choose(Some(failed)).expect("10.0.0.2 is left");
            assert!(p.panic);
            assert_eq!(p.endpoint.addr, "10.0.0.2:80".parse().expect("addr"));
        }
    }

    /// An endpoint no config in use names any more is not reported
    /// ejected (`sextant_edge_ejected_endpoints`) nor probed, and comes
    /// back, if it does, with a clean slate.
    #[test]
    fn an_endpoint_no_longer_configured_is_not_reported_ejected() {
        let b = builder();
        let v1 = build(
            &b,
            1,
            &test_config(&[("a", &["10.0.0.1:80", "10.0.0.2:80"], 1.0)]),
        );
        eject(&v1.origins[0].endpoints[0], 1);
        drop(v1);
        // v2 no longer has 10.0.0.1.
        let _v2 = b
            .build(2, &test_config(&[("a", &["10.0.0.2:80"], 1.0)]))
            .expect("valid");
        let ejected: Vec<_> = b.endpoints.ejected().iter().map(|e| e.addr).collect();
        assert!(
            ejected.is_empty(),
            "no endpoint of the config in service is ejected, yet ejected() = {ejected:?}"
        );
        let v3 = build(
            &b,
            3,
            &test_config(&[("a", &["10.0.0.1:80", "10.0.0.2:80"], 1.0)]),
        );
        assert!(!v3.origins[0].endpoints[0].is_ejected());
    }

    /// Two origin ids naming the same address (one LB VIP under two ids,
    /// a blue/green pair during a move): a retry does not go back to the
    /// address that just failed under the other id.
    #[test]
    fn a_retry_never_goes_back_to_the_endpoint_that_failed() {
        let b = builder();
        let up = build(
            &b,
            1,
            &test_config(&[
                ("a", &["10.0.0.1:80", "10.0.0.2:80"], 0.5),
                ("b", &["10.0.0.1:80"], 0.5),
            ]),
        );
        let failed = Failed {
            origin: "a",
            endpoint: "10.0.0.1:80".parse().expect("addr"),
        };
        for _ in 0..100 {
            let p = up.choose(Some(failed)).expect("a healthy endpoint is left");
            assert_ne!(
                p.endpoint.addr, failed.endpoint,
                "the retry went back to the endpoint that failed (origin {})",
                p.origin.id
            );
        }
    }

    /// One endpoint of an origin flaps (ejected, re-admitted) on another
    /// thread while the other stays healthy: `choose` always finds the
    /// healthy one (a miss would be a 503 "no origin available").
    #[test]
    fn choose_always_finds_the_healthy_endpoint_while_another_flaps() {
        let config = test_config(&[("a", &["10.0.0.1:80", "10.0.0.2:80"], 1.0)]);
        let none = misses_while_flapping(&config, |x| {
            eject(x, 1);
            x.readmit();
            x.success(2);
        });
        assert_eq!(
            none, 0,
            "{none} picks found nothing though 10.0.0.2 was healthy throughout"
        );
    }

    /// How often of 2 million, `choose` finds nothing while another thread
    /// calls `flap` on the first endpoint of the first origin in a loop.
    fn misses_while_flapping(
        config: &pb::NodeConfig,
        flap: impl Fn(&EndpointState) + Send + 'static,
    ) -> usize {
        let up = Arc::new(builder().build(1, config).expect("valid"));
        let stop = Arc::new(AtomicBool::new(false));
        let flapper = {
            let (up, stop) = (up.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    flap(&up.origins[0].endpoints[0]);
                }
            })
        };
        let none = (0..2_000_000).filter(|_| up.choose(None).is_none()).count();
        stop.store(true, Ordering::Relaxed);
        flapper.join().expect("join");
        none
    }

    /// An ejection and its time change together: an observer on another
    /// thread (the probe task) never sees a fresh ejection as due.
    #[test]
    fn a_fresh_ejection_is_never_due_at_once() {
        let e = Arc::new(EndpointState::new(
            "10.0.0.1:80".parse().expect("addr"),
            Arc::default(),
        ));
        let now = 1_700_000_000_000u64;
        let stop = Arc::new(AtomicBool::new(false));
        let t = {
            let (e, stop) = (e.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    e.readmit();
                    e.failure(now); // on probation: ejects at once
                }
            })
        };
        let mut due = 0;
        for _ in 0..5_000_000 {
            if e.due(now, BASE_EJECTION) {
                due += 1;
            }
        }
        stop.store(true, Ordering::Relaxed);
        t.join().expect("join");
        assert_eq!(due, 0, "{due} times an ejection just made was due at once");
    }

    /// Answers to requests sent before the ejection (downloads under way
    /// when it came) change nothing; one sent after it (by panic
    /// routing) re-admits it on probation.
    #[test]
    fn answers_under_way_at_an_ejection_do_not_readmit_it() {
        let e = EndpointState::new("10.0.0.1:80".parse().expect("addr"), Arc::default());
        for _ in 0..EJECT_AFTER - 1 {
            assert!(!e.failure(1_000));
        }
        assert!(e.failure(1_000));
        e.success(500);
        e.success(999);
        assert!(e.is_ejected());
        e.success(1_500);
        assert!(!e.is_ejected());
        assert!(
            e.failure(2_000),
            "on probation, the next failure ejects it again"
        );
    }

    /// The probe task checks `due`, then awaits a connect (up to 500 ms).
    /// Meanwhile an answer re-admits the endpoint and another ends its
    /// probation: the probe's late re-admission leaves it as it is.
    #[test]
    fn a_late_probe_does_not_put_a_clean_endpoint_on_probation() {
        let e = EndpointState::new("10.0.0.1:80".parse().expect("addr"), Arc::default());
        eject(&e, 1_000);
        assert!(e.due(1_000 + 10_000, BASE_EJECTION));
        // (probe connect under way)
        e.success(1_500); // answer: re-admitted on probation
        e.success(1_600); // answer: probation over, clean record
        e.readmit(); // the probe's result arrives
        assert!(
            !e.failure(20_000),
            "one failure ejected an endpoint that was in service with a clean record"
        );
    }

    /// Origin a's only endpoint flaps; origin b's is healthy throughout:
    /// `choose` never finds nothing (a 503).
    #[test]
    fn choose_never_misses_while_another_origin_is_healthy() {
        let config = test_config(&[("a", &["10.0.0.1:80"], 0.99), ("b", &["10.0.0.2:80"], 0.01)]);
        let none = misses_while_flapping(&config, |x| {
            x.readmit();
            x.failure(1); // on probation: ejects at once
        });
        assert_eq!(
            none, 0,
            "{none} picks found nothing though b was healthy throughout"
        );
    }
}
