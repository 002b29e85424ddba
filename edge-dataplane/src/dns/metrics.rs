//! GeoDNS metrics. The hot path counts into a per-thread [`Tally`] of plain
//! integers, flushed into the shared Prometheus families every few thousand
//! queries and when idle, so that answering a query touches no shared cache
//! line. Label values are bounded by the config (groups, edges) or fixed
//! sets (transport, type, rcode).

use std::sync::atomic::AtomicI64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::table::{Answer, Rcode, Resolution, Tables};

type Labels = Vec<(String, String)>;

/// Shared counters, registered up front.
#[derive(Debug, Default)]
pub struct Metrics {
    queries: Family<Labels, Counter>,
    steered: Family<Labels, Counter>,
    fallbacks: Family<Labels, Counter>,
    edges: Family<Labels, Counter>,
    ecs: Family<Labels, Counter>,
    paths: Family<Labels, Counter>,
    dropped: Counter,
    truncated: Counter,
    batches: Counter,
    pub config_version: Gauge,
    pub config_from_disk: Gauge,
    pub config_age_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub config_build_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub client_prefixes: Family<Labels, Gauge<i64, AtomicI64>>,
    pub client_groups: Gauge,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "queries",
            "DNS queries answered, by transport, query type and rcode",
            m.queries.clone(),
        );
        registry.register(
            "steered",
            "Steered answers by client group (the group the client matched; _unmatched when none)",
            m.steered.clone(),
        );
        registry.register(
            "group_fallbacks",
            "Steered answers whose client group had no usable edge (answered by the default group or failing open)",
            m.fallbacks.clone(),
        );
        registry.register(
            "edge_answers",
            "Times each edge was in a steered answer",
            m.edges.clone(),
        );
        registry.register(
            "ecs_queries",
            "Queries with and without an EDNS Client Subnet option",
            m.ecs.clone(),
        );
        registry.register(
            "path_queries",
            "Queries answered by the UDP fast path or the general (hickory) path",
            m.paths.clone(),
        );
        registry.register(
            "dropped",
            "Packets not answered (shorter than a header, responses, bad source)",
            m.dropped.clone(),
        );
        registry.register(
            "truncated",
            "UDP responses sent with TC set (the client retries over TCP)",
            m.truncated.clone(),
        );
        registry.register(
            "udp_batches",
            "Receive batches of the UDP threads (UDP queries per batch: load)",
            m.batches.clone(),
        );
        registry.register(
            "config_version",
            "Config version held (0: none)",
            m.config_version.clone(),
        );
        registry.register(
            "config_from_disk",
            "1 when serving the config persisted before the last restart",
            m.config_from_disk.clone(),
        );
        registry.register(
            "config_age_seconds",
            "Seconds since the config held was accepted (-1: none)",
            m.config_age_seconds.clone(),
        );
        registry.register(
            "config_build_seconds",
            "Time it took to build the serving tables of the config held",
            m.config_build_seconds.clone(),
        );
        registry.register(
            "client_prefixes",
            "Client prefixes in the lookup tables, by family",
            m.client_prefixes.clone(),
        );
        registry.register(
            "client_groups",
            "Client groups in the config held",
            m.client_groups.clone(),
        );
        m
    }
}

impl Metrics {
    /// Counts one query straight into the shared families (for the TCP
    /// path, where per-thread tallies are not worth it).
    pub fn observe(
        &self,
        transport: &'static str,
        tables: Option<&Tables>,
        qtype: u16,
        rcode: Rcode,
        res: Option<&Resolution>,
        ecs: bool,
    ) {
        let l = |pairs: &[(&str, &str)]| -> Labels {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        self.queries
            .get_or_create(&l(&[
                ("transport", transport),
                ("qtype", QTYPES[qtype_index(qtype)]),
                ("rcode", rcode.name()),
            ]))
            .inc();
        let present = if ecs { "present" } else { "absent" };
        self.ecs.get_or_create(&l(&[("ecs", present)])).inc();
        self.paths.get_or_create(&l(&[("path", "general")])).inc();
        let (Some(t), Some(res)) = (tables, res) else {
            return;
        };
        if let Some(slot) = res.slot {
            let group = if slot == 0 {
                "_unmatched"
            } else {
                t.group_id(slot)
            };
            self.steered.get_or_create(&l(&[("group", group)])).inc();
            if res.fallback {
                self.fallbacks.get_or_create(&l(&[("group", group)])).inc();
            }
        }
        if let Answer::Steered {
            service,
            family,
            route,
            picks,
            count,
        } = res.answer
        {
            for p in t.steered(service, family, route, &picks[..usize::from(count)]) {
                let id = t.edges.get(p.edge as usize).map_or("", |x| x.id.as_str());
                self.edges.get_or_create(&l(&[("edge", id)])).inc();
            }
        }
    }
}

const QTYPES: [&str; 7] = ["A", "AAAA", "CNAME", "SOA", "NS", "ANY", "other"];

/// Index of a query type in [`QTYPES`].
pub fn qtype_index(qtype: u16) -> usize {
    match qtype {
        1 => 0,
        28 => 1,
        5 => 2,
        6 => 3,
        2 => 4,
        255 => 5,
        _ => 6,
    }
}

/// Per-thread counts since the last flush, for one config version.
#[derive(Debug)]
pub struct Tally {
    transport: &'static str,
    version: Option<u64>,
    queries: [[u64; 7]; 7],
    ecs: [u64; 2],
    paths: [u64; 2],
    steered: Vec<u64>,
    fallbacks: Vec<u64>,
    edges: Vec<u64>,
    dropped: u64,
    truncated: u64,
    batches: u64,
    pending: u32,
}

impl Tally {
    pub fn new(transport: &'static str) -> Self {
        Self {
            transport,
            version: None,
            queries: [[0; 7]; 7],
            ecs: [0; 2],
            paths: [0; 2],
            steered: Vec::new(),
            fallbacks: Vec::new(),
            edges: Vec::new(),
            dropped: 0,
            truncated: 0,
            batches: 0,
            pending: 0,
        }
    }

    /// The version the per-group and per-edge counts belong to.
    pub fn version(&self) -> Option<u64> {
        self.version
    }

    /// Sizes the per-group and per-edge counts for `tables` (call after a
    /// flush when the config changes).
    pub fn reset_for(&mut self, tables: Option<&Tables>) {
        self.version = tables.map(|t| t.version);
        let (g, e) = tables.map_or((0, 0), |t| (t.groups.len() + 1, t.edges.len()));
        self.steered.clear();
        self.steered.resize(g, 0);
        self.fallbacks.clear();
        self.fallbacks.resize(g, 0);
        self.edges.clear();
        self.edges.resize(e, 0);
    }

    /// Counts one receive batch.
    pub fn batch(&mut self) {
        self.batches += 1;
    }

    pub fn dropped(&mut self) {
        self.dropped += 1;
        self.pending += 1;
    }

    /// Counts since the last flush.
    pub fn pending(&self) -> u32 {
        self.pending
    }

    /// Counts one answered query.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &mut self,
        tables: Option<&Tables>,
        qtype: u16,
        rcode: Rcode,
        res: Option<&Resolution>,
        ecs: bool,
        fast: bool,
        truncated: bool,
    ) {
        self.queries[rcode.index()][qtype_index(qtype)] += 1;
        self.ecs[usize::from(ecs)] += 1;
        self.paths[usize::from(fast)] += 1;
        self.truncated += u64::from(truncated);
        if let (Some(t), Some(res)) = (tables, res) {
            if let Some(slot) = res.slot {
                let slot = slot as usize;
                if slot < self.steered.len() {
                    self.steered[slot] += 1;
                    if res.fallback {
                        self.fallbacks[slot] += 1;
                    }
                }
            }
            if let Answer::Steered {
                service,
                family,
                route,
                picks,
                count,
            } = res.answer
            {
                for p in t.steered(service, family, route, &picks[..usize::from(count)]) {
                    if let Some(c) = self.edges.get_mut(p.edge as usize) {
                        *c += 1;
                    }
                }
            }
        }
        self.pending += 1;
    }

    /// Adds the counts to the shared families (`tables` is the config they
    /// were counted under) and zeroes them.
    pub fn flush(&mut self, m: &Metrics, tables: Option<&Tables>) {
        if self.pending == 0 {
            return;
        }
        self.pending = 0;
        let l = |pairs: &[(&str, &str)]| -> Labels {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        for (ri, row) in self.queries.iter_mut().enumerate() {
            for (qi, n) in row.iter_mut().enumerate() {
                if *n > 0 {
                    m.queries
                        .get_or_create(&l(&[
                            ("transport", self.transport),
                            ("qtype", QTYPES[qi]),
                            ("rcode", Rcode::ALL[ri].name()),
                        ]))
                        .inc_by(*n);
                    *n = 0;
                }
            }
        }
        for (i, n) in self.ecs.iter_mut().enumerate() {
            if *n > 0 {
                let v = if i == 1 { "present" } else { "absent" };
                m.ecs.get_or_create(&l(&[("ecs", v)])).inc_by(*n);
                *n = 0;
            }
        }
        for (i, n) in self.paths.iter_mut().enumerate() {
            if *n > 0 {
                let v = if i == 1 { "fast" } else { "general" };
                m.paths.get_or_create(&l(&[("path", v)])).inc_by(*n);
                *n = 0;
            }
        }
        m.dropped.inc_by(std::mem::take(&mut self.dropped));
        m.truncated.inc_by(std::mem::take(&mut self.truncated));
        m.batches.inc_by(std::mem::take(&mut self.batches));
        let Some(t) = tables.filter(|t| Some(t.version) == self.version) else {
            return;
        };
        let group = |slot: usize| {
            if slot == 0 {
                "_unmatched"
            } else {
                t.group_id(slot as u32)
            }
        };
        for (slot, n) in self.steered.iter_mut().enumerate() {
            if *n > 0 {
                m.steered
                    .get_or_create(&l(&[("group", group(slot))]))
                    .inc_by(*n);
                *n = 0;
            }
        }
        for (slot, n) in self.fallbacks.iter_mut().enumerate() {
            if *n > 0 {
                m.fallbacks
                    .get_or_create(&l(&[("group", group(slot))]))
                    .inc_by(*n);
                *n = 0;
            }
        }
        for (e, n) in self.edges.iter_mut().enumerate() {
            if *n > 0 {
                let id = t.edges.get(e).map_or("", |x| x.id.as_str());
                m.edges.get_or_create(&l(&[("edge", id)])).inc_by(*n);
                *n = 0;
            }
        }
    }
}
