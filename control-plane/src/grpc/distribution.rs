//! `DistributionService`: the routing state as resources for the data
//! plane, pushed with the generic protocol of [`crate::push`].
//!
//! Resources, by name: `service/<id>`, `edge/<id>`, `group/<id>`,
//! `route/<service>/<group>`, `asn/<asn>/<part>` (the prefixes of an ASN
//! that a group names, from the loaded BGP RIB: what GeoDNS needs) and
//! `origin/<id>`,
//! `upstream/<edge>` (what an edge proxy needs; a proxy only gets its own
//! upstream). A snapshot is checked for consistency before it is published;
//! an inconsistent one is never sent, and the alarm says why.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use prost::Message;
use sextant_core::fleet::EdgeTarget;
use sextant_proto::v1 as pb;
use sextant_proto::v1::distribution_service_server::DistributionService;
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, error, info, warn, Instrument};

use crate::auth::{self, NodeKind, Principal};
use crate::control_loop::{Clock, Snapshot};
use crate::push::{self, Held, Identity, ProtocolError, Publisher, Registry};

/// One resource of the data-plane configuration.
#[derive(Debug, Clone, PartialEq)]
pub enum Resource {
    Service(pb::ServiceConfig),
    Edge(pb::EdgeTarget),
    Group(pb::GroupMatch),
    Route(pb::GroupRouting),
    Origin(pb::OriginTarget),
    Upstream(Vec<pb::OriginWeight>),
    AsnPrefixes(pb::AsnPrefixes),
}

impl Resource {
    fn encoded_len(&self) -> usize {
        match self {
            Resource::Service(m) => m.encoded_len(),
            Resource::Edge(m) => m.encoded_len(),
            Resource::Group(m) => m.encoded_len(),
            Resource::Route(m) => m.encoded_len(),
            Resource::Origin(m) => m.encoded_len(),
            Resource::Upstream(ws) => ws.iter().map(|w| w.encoded_len() + 2).sum(),
            Resource::AsnPrefixes(m) => m.encoded_len(),
        }
    }
}

/// Largest update message sent (chunks are cut before this).
pub const CHUNK_TARGET_BYTES: usize = 1024 * 1024;
/// Largest single resource: one resource must fit in one message.
pub const MAX_RESOURCE_BYTES: usize = 3 * 1024 * 1024;
/// Prefixes per `asn/<asn>/<part>` resource (at most 850 KB of IPv6).
pub const ASN_PART_PREFIXES: usize = 50_000;
/// Versions kept for deltas.
pub const KEEP_VERSIONS: usize = 16;
/// The longest `Hello.digest_held` taken (this server's are 32 bytes).
const MAX_DIGEST_BYTES: usize = 64;
/// How long a subscriber has to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a snapshot cannot be served.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("routing version {version} is inconsistent and is not served: {reason}")]
pub struct Inconsistent {
    pub version: u64,
    pub reason: String,
}

/// Builds the resources of a loop snapshot, checks them and takes their
/// digest.
pub fn resources(snap: &Snapshot) -> Result<push::Snapshot<Resource>, Inconsistent> {
    let mut out = checked_resources(snap)?;
    out.digest = digest(&out.resources);
    Ok(out)
}

/// A digest of resources, from their names and encodings (SHA-256, first
/// 128 bits in hex). The encodings are deterministic: the messages hold no
/// maps, and every list is in the order the resources are built in.
fn digest(resources: &std::collections::BTreeMap<String, Resource>) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for (name, r) in resources {
        let buf = match r {
            Resource::Service(m) => m.encode_to_vec(),
            Resource::Edge(m) => m.encode_to_vec(),
            Resource::Group(m) => m.encode_to_vec(),
            Resource::Route(m) => m.encode_to_vec(),
            Resource::Origin(m) => m.encode_to_vec(),
            Resource::Upstream(ws) => ws
                .iter()
                .flat_map(|w| w.encode_length_delimited_to_vec())
                .collect(),
            Resource::AsnPrefixes(m) => m.encode_to_vec(),
        };
        ctx.update(&(name.len() as u64).to_le_bytes());
        ctx.update(name.as_bytes());
        ctx.update(&(buf.len() as u64).to_le_bytes());
        ctx.update(&buf);
    }
    ctx.finish().as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn checked_resources(snap: &Snapshot) -> Result<push::Snapshot<Resource>, Inconsistent> {
    let version = snap.version();
    let bad = |reason: String| Inconsistent { version, reason };
    let mut out = push::Snapshot {
        version,
        resources: Default::default(),
        digest: String::new(),
    };
    let (fleet, table) = match (&snap.fleet, &snap.table) {
        (Some(f), Some(t)) => (f, t),
        (None, None) => return Ok(out),
        // Never serve half a state (a table without its fleet or the other
        // way round): subscribers would drop everything they hold.
        (None, Some(_)) => return Err(bad("a routing table without a fleet".into())),
        (Some(_), None) => return Err(bad("a fleet without a routing table".into())),
    };
    let r = &mut out.resources;
    for s in fleet.services.values() {
        if !fleet.groups.contains_key(&s.default_group) {
            return Err(bad(format!(
                "service {} has an unknown default group {}",
                s.id, s.default_group
            )));
        }
        r.insert(
            format!("service/{}", s.id),
            Resource::Service(pb::ServiceConfig {
                id: s.id.to_string(),
                hostname: s.hostname.clone(),
                zone: s.zone.clone(),
                ttl_seconds: s.ttl_seconds,
                default_group: s.default_group.to_string(),
                soa_mname: s
                    .soa
                    .mname
                    .clone()
                    .or_else(|| s.nameservers.first().cloned())
                    .unwrap_or_default(),
                soa_rname: s
                    .soa
                    .rname
                    .clone()
                    .unwrap_or_else(|| format!("hostmaster.{}", s.zone)),
                soa_refresh: s.soa.refresh,
                soa_retry: s.soa.retry,
                soa_expire: s.soa.expire,
                soa_minimum: s.soa.minimum,
                nameservers: s.nameservers.clone(),
                answer_count: s.answer_count,
            }),
        );
    }
    for e in fleet.edges.values() {
        let (addresses, cname) = match &e.target {
            EdgeTarget::SelfBuilt { addresses } => (
                addresses.iter().map(|a| a.to_string()).collect(),
                String::new(),
            ),
            EdgeTarget::ThirdParty { cname } => (vec![], cname.clone()),
        };
        r.insert(
            format!("edge/{}", e.id),
            Resource::Edge(pb::EdgeTarget {
                id: e.id.to_string(),
                addresses,
                cname,
                site: e.site.to_string(),
            }),
        );
    }
    for g in fleet.groups.values() {
        r.insert(
            format!("group/{}", g.id),
            Resource::Group(pb::GroupMatch {
                id: g.id.to_string(),
                prefixes: g.prefixes.iter().map(|p| p.to_string()).collect(),
                countries: g.countries.clone(),
                asns: g.asns.clone(),
            }),
        );
    }
    if let Some(rib) = &snap.rib {
        let asns: std::collections::BTreeSet<u32> = fleet
            .groups
            .values()
            .flat_map(|g| g.asns.iter().copied())
            .collect();
        for asn in asns {
            for part in super::bgp::asn_parts(&rib.map, asn, ASN_PART_PREFIXES) {
                r.insert(
                    format!("asn/{asn}/{}", part.part),
                    Resource::AsnPrefixes(part),
                );
            }
        }
    }
    for o in fleet.origins.values() {
        r.insert(
            format!("origin/{}", o.id),
            Resource::Origin(pb::OriginTarget {
                id: o.id.to_string(),
                endpoints: o.endpoints.clone(),
            }),
        );
    }
    for (svc, group, row) in table.routing.rows() {
        let mut sum = row.unserved;
        for w in &row.weights {
            if !fleet.edges.contains_key(&w.edge) {
                return Err(bad(format!(
                    "route {svc}/{group} names unknown edge {}",
                    w.edge
                )));
            }
            if !(w.weight.is_finite() && (0.0..=1.0).contains(&w.weight)) {
                return Err(bad(format!(
                    "route {svc}/{group}: weight {} of {}",
                    w.weight, w.edge
                )));
            }
            sum += w.weight;
        }
        if !(row.unserved.is_finite() && (0.0..=1.0).contains(&row.unserved))
            || (sum - 1.0).abs() > 1e-6
        {
            return Err(bad(format!(
                "route {svc}/{group}: weights and unserved sum to {sum}"
            )));
        }
        r.insert(
            format!("route/{svc}/{group}"),
            Resource::Route(pb::GroupRouting {
                service: svc.to_string(),
                group: group.to_string(),
                weights: super::weights(&row.weights),
                unserved: row.unserved,
                demand_rps: row.demand_rps,
                failed_open: row.failed_open,
                notes: vec![],
            }),
        );
    }
    for (edge, load) in &table.routing.edges {
        if !fleet.edges.contains_key(edge) {
            return Err(bad(format!("upstream of unknown edge {edge}")));
        }
        let mut sum = 0.0;
        for o in &load.origins {
            if !fleet.origins.contains_key(&o.origin) {
                return Err(bad(format!(
                    "edge {edge} names unknown origin {}",
                    o.origin
                )));
            }
            if !(o.weight.is_finite() && o.weight >= 0.0) {
                return Err(bad(format!("edge {edge}: origin weight {}", o.weight)));
            }
            sum += o.weight;
        }
        if load.origins.is_empty() {
            // No resource rather than an empty one: a delta then says it is
            // gone (an empty list in a delta means "unchanged").
            continue;
        }
        if (sum - 1.0).abs() > 1e-6 {
            return Err(bad(format!("edge {edge}: origin weights sum to {sum}")));
        }
        r.insert(
            format!("upstream/{edge}"),
            Resource::Upstream(
                load.origins
                    .iter()
                    .map(|o| pb::OriginWeight {
                        origin: o.origin.to_string(),
                        weight: o.weight,
                    })
                    .collect(),
            ),
        );
    }
    for (name, res) in &out.resources {
        let len = res.encoded_len();
        if len > MAX_RESOURCE_BYTES {
            return Err(bad(format!(
                "resource {name} is {len} bytes, over the {MAX_RESOURCE_BYTES} limit"
            )));
        }
    }
    Ok(out)
}

/// Which resources a node of `kind` gets.
#[derive(Debug, Clone)]
enum View {
    Proxy { upstream: String },
    Dns,
}

impl View {
    fn keeps(&self, name: &str) -> bool {
        match self {
            View::Proxy { upstream } => name.starts_with("origin/") || name == upstream,
            View::Dns => {
                name.starts_with("service/")
                    || name.starts_with("edge/")
                    || name.starts_with("group/")
                    || name.starts_with("route/")
                    || name.starts_with("asn/")
            }
        }
    }
}

fn add(config: &mut pb::NodeConfig, res: &Resource) {
    match res {
        Resource::Service(m) => config.services.push(m.clone()),
        Resource::Edge(m) => config.edges.push(m.clone()),
        Resource::Group(m) => config.groups.push(m.clone()),
        Resource::Route(m) => config.routing.push(m.clone()),
        Resource::Origin(m) => config.origins.push(m.clone()),
        Resource::Upstream(ws) => config.upstream = ws.clone(),
        Resource::AsnPrefixes(m) => config.asn_prefixes.push(m.clone()),
    }
}

fn remove(update: &mut pb::ConfigUpdate, name: &str) {
    let (kind, id) = name.split_once('/').unwrap_or((name, ""));
    let id = id.to_owned();
    match kind {
        "service" => update.removed_services.push(id),
        "edge" => update.removed_edges.push(id),
        "group" => update.removed_groups.push(id),
        "route" => update.removed_routes.push(id),
        "origin" => update.removed_origins.push(id),
        "upstream" => update.removed_upstream = true,
        "asn" => update.removed_asn_prefixes.push(id),
        _ => {}
    }
}

/// The update messages (chunks) carrying `items` (and `removals`).
fn chunks<'a>(
    header: pb::ConfigUpdate,
    items: impl Iterator<Item = &'a Resource>,
    removals: &[&String],
) -> Vec<pb::ConfigUpdate> {
    let mut out = Vec::new();
    let mut current = header.clone();
    for name in removals {
        remove(&mut current, name);
    }
    let mut size = current.encoded_len();
    let mut config = pb::NodeConfig::default();
    for res in items {
        let len = res.encoded_len() + 8;
        if size + len > CHUNK_TARGET_BYTES && config != pb::NodeConfig::default() {
            current.config = Some(std::mem::take(&mut config));
            let mut next = header.clone();
            next.chunk_index = current.chunk_index + 1;
            out.push(std::mem::replace(&mut current, next));
            size = current.encoded_len();
        }
        size += len;
        add(&mut config, res);
    }
    current.config = Some(config);
    current.last = true;
    out.push(current);
    // Encode each chunk's config once; every subscriber that gets this
    // update shares the bytes.
    for u in &mut out {
        if let Some(c) = u.config.take() {
            u.config_bytes = c.encode_to_vec().into();
        }
    }
    out
}

/// Updates already built for the DNS view, shared by every DNS subscriber
/// moving between the same two versions.
#[derive(Debug, Default)]
struct UpdateCache {
    entries: std::collections::VecDeque<((u64, u64), Updates)>,
}

/// The chunks of one update, shared.
type Updates = Arc<Vec<pb::ConfigUpdate>>;

const CACHED_UPDATES: usize = 32;

impl UpdateCache {
    fn get(&self, key: (u64, u64)) -> Option<Updates> {
        self.entries
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
    }

    fn put(&mut self, key: (u64, u64), v: Updates) {
        self.entries.push_back((key, v));
        while self.entries.len() > CACHED_UPDATES {
            self.entries.pop_front();
        }
    }
}

/// The update chunks (without nonce) that take a subscriber with `view`
/// from `base` (None: nothing, send everything) to `snap`.
fn build_updates(
    base: Option<&push::Snapshot<Resource>>,
    snap: &push::Snapshot<Resource>,
    view: &View,
) -> Vec<pb::ConfigUpdate> {
    let header = pb::ConfigUpdate {
        version: snap.version,
        digest: snap.digest.clone(),
        ..pb::ConfigUpdate::default()
    };
    match base {
        Some(base) => {
            let d = push::delta(base, snap, |n| view.keeps(n));
            let header = pb::ConfigUpdate {
                base_version: base.version,
                ..header
            };
            chunks(header, d.upserts.iter().map(|(_, r)| *r), &d.removals)
        }
        None => {
            let header = pb::ConfigUpdate {
                full: true,
                ..header
            };
            let items = snap
                .resources
                .iter()
                .filter(|(n, _)| view.keeps(n))
                .map(|(_, r)| r);
            chunks(header, items, &[])
        }
    }
}

/// Shared state of the distribution service.
pub struct Distribution {
    pub publisher: Publisher<Resource>,
    pub registry: Registry,
    /// The loop's snapshots, for checking who may subscribe.
    pub state: watch::Receiver<Arc<Snapshot>>,
    pub clock: Arc<dyn Clock>,
    /// The last snapshot refused as inconsistent, if any (an alarm).
    pub rejected: Mutex<Option<Inconsistent>>,
    /// How long a subscriber that holds a version newer than this server's
    /// is sent nothing older: a replica behind another catches up within
    /// it; past it, this server's versions are taken as the truth (a store
    /// restored to older versions) and it gets the current snapshot.
    pub ahead_grace: Duration,
    /// The store, asked when that grace is over whether its versions
    /// really are behind the subscriber's (`None`: this server's are taken
    /// as the store's).
    store: Option<Arc<dyn sextant_store::Store>>,
    cache: Mutex<UpdateCache>,
    /// What was sent, for the metrics.
    pub counts: SentCounts,
}

/// Updates sent, and claims found to hold other content.
#[derive(Debug, Default)]
pub struct SentCounts {
    pub full: std::sync::atomic::AtomicU64,
    pub delta: std::sync::atomic::AtomicU64,
    /// Subscribers that named a version this server holds with another
    /// digest (another history: a store restored from a backup), and got
    /// the current config whole. One that named no digest (an older
    /// release) is not counted: it gets the config whole as well.
    pub other_content: std::sync::atomic::AtomicU64,
}

impl SentCounts {
    fn add(n: &std::sync::atomic::AtomicU64) {
        n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Distribution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Distribution").finish_non_exhaustive()
    }
}

impl Distribution {
    pub fn new(
        state: watch::Receiver<Arc<Snapshot>>,
        clock: Arc<dyn Clock>,
        ahead_grace: Duration,
        store: Option<Arc<dyn sextant_store::Store>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            publisher: Publisher::new(KEEP_VERSIONS),
            registry: Registry::new(),
            state,
            clock,
            rejected: Mutex::new(None),
            ahead_grace,
            store,
            cache: Mutex::new(UpdateCache::default()),
            counts: SentCounts::default(),
        })
    }

    fn now(&self) -> u64 {
        u64::try_from(self.clock.now_ms()).unwrap_or(0)
    }

    /// Publishes every new routing version as resources, until the loop
    /// stops.
    pub async fn follow(self: Arc<Self>) {
        let mut state = self.state.clone();
        loop {
            let snap = state.borrow_and_update().clone();
            if snap.version() > self.publisher.current().version {
                match crate::blocking::heavy(|| resources(&snap)) {
                    Ok(res) => {
                        let n = res.resources.len();
                        if self.publisher.publish(res, self.now()) {
                            info!(version = snap.version(), resources = n, "config published");
                        }
                        if let Ok(mut r) = self.rejected.lock() {
                            *r = None;
                        }
                    }
                    Err(e) => {
                        error!(error = %e, "config not published");
                        if let Ok(mut r) = self.rejected.lock() {
                            *r = Some(e);
                        }
                    }
                }
            }
            if state.changed().await.is_err() {
                return;
            }
        }
    }

    /// The update chunks for a subscriber: built once per (base, version)
    /// for the DNS view, which every DNS server shares; built per proxy
    /// otherwise (a proxy's view is small).
    fn updates(
        &self,
        base: Option<&push::Snapshot<Resource>>,
        snap: &push::Snapshot<Resource>,
        view: &View,
    ) -> Updates {
        if !matches!(view, View::Dns) {
            return Arc::new(build_updates(base, snap, view));
        }
        let key = (base.map_or(0, |b| b.version), snap.version);
        if let Some(hit) = self.cache.lock().ok().and_then(|c| c.get(key)) {
            return hit;
        }
        let built = Arc::new(build_updates(base, snap, view));
        if let Ok(mut c) = self.cache.lock() {
            c.put(key, built.clone());
        }
        built
    }

    /// Notes a subscriber that named a version held here with another
    /// digest (counted only when it named one: an older node names none).
    /// It is sent the current config whole.
    fn other_content(&self, hello: &pb::Hello, current: u64) {
        if !hello.digest_held.is_empty() {
            SentCounts::add(&self.counts.other_content);
        }
        warn!(
            version_held = hello.version_held,
            digest_held = %hello.digest_held,
            current,
            "subscriber holds other content under this version number (another history, or an older node): sending the current snapshot whole"
        );
    }

    /// The alarm for a refused snapshot, if any.
    pub fn alarm(&self) -> Option<String> {
        self.rejected
            .lock()
            .ok()
            .and_then(|r| r.as_ref().map(|e| e.to_string()))
    }

    fn check_hello(&self, hello: &pb::Hello) -> Result<View, Status> {
        match pb::NodeKind::try_from(hello.kind) {
            Ok(pb::NodeKind::Proxy) => {
                let snap = self.state.borrow().clone();
                let edge = snap
                    .fleet
                    .as_ref()
                    .and_then(|f| f.edges.get(hello.node_id.as_str()).cloned());
                let Some(edge) = edge else {
                    return Err(Status::failed_precondition(format!(
                        "hello: node_id {:?} is not an edge of the fleet (an edge proxy's --node-id is its fleet edge id)",
                        hello.node_id
                    )));
                };
                if !hello.site.is_empty() && hello.site != edge.site.as_str() {
                    return Err(Status::failed_precondition(format!(
                        "hello: edge {} is at {} in the fleet, not at {}",
                        hello.node_id, edge.site, hello.site
                    )));
                }
                Ok(View::Proxy {
                    upstream: format!("upstream/{}", hello.node_id),
                })
            }
            Ok(pb::NodeKind::Dns) => Ok(View::Dns),
            _ => Err(Status::invalid_argument(format!(
                "hello: kind must be NODE_KIND_PROXY or NODE_KIND_DNS, got {}",
                hello.kind
            ))),
        }
    }

    async fn session(
        self: Arc<Self>,
        mut inbound: Streaming<pb::SubscribeRequest>,
        tx: mpsc::Sender<Result<pb::ConfigUpdate, Status>>,
        who: Principal,
    ) {
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(pb::SubscribeRequest {
                message: Some(pb::subscribe_request::Message::Hello(h)),
            }))) => h,
            Ok(Ok(Some(_))) => {
                let _ = tx
                    .send(Err(Status::invalid_argument(
                        ProtocolError::NoHello.to_string(),
                    )))
                    .await;
                return;
            }
            Ok(Ok(None)) => return,
            Ok(Err(status)) => {
                debug!(error = %status, "subscriber stream failed before hello");
                return;
            }
            Err(_) => {
                let _ = tx
                    .send(Err(Status::deadline_exceeded("no hello within 10 s")))
                    .await;
                return;
            }
        };
        let view = match self.check_hello(&hello) {
            Ok(v) => v,
            Err(status) => {
                warn!(node = %hello.node_id, error = %status.message(), "subscriber refused");
                let _ = tx.send(Err(status)).await;
                return;
            }
        };
        let (kind, node_kind) = match view {
            View::Proxy { .. } => ("proxy", NodeKind::Edge),
            View::Dns => ("dns", NodeKind::Dns),
        };
        if let Err(e) = auth::may_act_as(&who, node_kind, &hello.node_id) {
            warn!(node = %hello.node_id, %who, error = %e, "subscriber refused");
            let _ = tx.send(Err(e.into())).await;
            return;
        }
        let id = Identity {
            node_id: hello.node_id.clone(),
            kind: kind.to_owned(),
            site: hello.site.clone(),
            software: hello.software.clone(),
        };
        if hello.digest_held.len() > MAX_DIGEST_BYTES {
            let e = format!(
                "hello: digest_held is {} bytes (at most {MAX_DIGEST_BYTES})",
                hello.digest_held.len()
            );
            let _ = tx.send(Err(Status::invalid_argument(e))).await;
            return;
        }
        // A version newer than this server's is not taken as held until
        // the server reaches it, nor one whose content differs from this
        // server's (see `serve`).
        let claim = self.publisher.check(hello.version_held, &hello.digest_held);
        let current = self.publisher.current().version;
        let claimed = match &claim {
            Held::Same(_) | Held::Unknown => hello.version_held,
            Held::Nothing | Held::Other | Held::Ahead => 0,
        };
        let key = id.key();
        let session = match self.registry.connect(&id, claimed, self.now()) {
            Ok(s) => s,
            Err(e) => {
                let _ = tx
                    .send(Err(Status::invalid_argument(format!("hello: {e}"))))
                    .await;
                return;
            }
        };
        let span = tracing::info_span!("subscriber", node = %hello.node_id, kind, session);
        async {
            info!(version_held = hello.version_held, "subscriber connected");
            let result = self
                .serve(
                    &mut inbound,
                    &tx,
                    &hello,
                    view,
                    Session {
                        key: &key,
                        id: session,
                        current,
                        claim,
                    },
                )
                .await;
            self.registry.disconnect(&key, session, self.now());
            match result {
                Ok(()) => info!("subscriber disconnected"),
                Err(status) => {
                    warn!(error = %status.message(), "subscriber stream closed");
                    let _ = tx.send(Err(status)).await;
                }
            }
        }
        .instrument(span)
        .await;
    }

    async fn serve(
        &self,
        inbound: &mut Streaming<pb::SubscribeRequest>,
        tx: &mpsc::Sender<Result<pb::ConfigUpdate, Status>>,
        hello: &pb::Hello,
        view: View,
        session: Session<'_>,
    ) -> Result<(), Status> {
        let Session {
            key: node,
            id: session,
            current,
            claim,
        } = session;
        let mut published = self.publisher.subscribe();
        // The snapshot the subscriber holds (for deltas), the version it is
        // known to hold, and what is in flight.
        let claimed_ahead = matches!(claim, Held::Ahead);
        let (mut held, mut last_sent) = match claim {
            Held::Same(s) => (Some(s), hello.version_held),
            Held::Unknown | Held::Ahead => (None, hello.version_held),
            Held::Nothing => (None, 0),
            Held::Other => {
                self.other_content(hello, current);
                (None, 0)
            }
        };
        // A subscriber that holds a version newer than this server's is
        // sent nothing older for `ahead_grace` (see there).
        let mut ahead = claimed_ahead.then(|| {
            warn!(
                version_held = hello.version_held,
                current, "subscriber holds a version newer than this server's"
            );
            (
                hello.version_held,
                tokio::time::Instant::now() + self.ahead_grace,
            )
        });
        let mut in_flight: Option<(Arc<push::Snapshot<Resource>>, String)> = None;
        let mut replaced_check = tokio::time::interval(Duration::from_secs(2));
        let protocol = |e: ProtocolError| match e {
            ProtocolError::Replaced => Status::aborted(e.to_string()),
            other => Status::invalid_argument(other.to_string()),
        };
        loop {
            let snap = published.borrow_and_update().clone();
            if let Some((claimed, until)) = ahead {
                if snap.version >= claimed {
                    match self.publisher.check(claimed, &hello.digest_held) {
                        Held::Same(s) => {
                            self.registry
                                .holds(node, session, claimed)
                                .map_err(protocol)?;
                            held = Some(s);
                        }
                        Held::Other => {
                            self.other_content(hello, snap.version);
                            held = None;
                            last_sent = 0;
                        }
                        _ => {
                            info!(
                                version_held = claimed,
                                current = snap.version,
                                "the subscriber's version was passed here without being kept: sending the current snapshot whole"
                            );
                            held = None;
                            last_sent = 0;
                        }
                    }
                    ahead = None;
                } else if tokio::time::Instant::now() >= until {
                    // Only a store whose history is behind the claim (one
                    // restored from a backup) makes an older config the
                    // truth; a replica merely lagging (or a store out of
                    // reach) must not roll an edge back.
                    let committed = match &self.store {
                        Some(s) => crate::state::committed_version(s.as_ref()).await.ok(),
                        None => Some(snap.version),
                    };
                    if committed.is_some_and(|v| v < claimed) {
                        warn!(
                            version_held = claimed,
                            current = snap.version,
                            committed,
                            "the store's versions are behind the subscriber's: sending the current snapshot"
                        );
                        held = None;
                        last_sent = 0;
                        ahead = None;
                    } else {
                        warn!(
                            version_held = claimed,
                            current = snap.version,
                            committed,
                            "this replica is behind the subscriber's version: sending it nothing older"
                        );
                        ahead = Some((claimed, tokio::time::Instant::now() + self.ahead_grace));
                    }
                }
            }
            if in_flight.is_none() && snap.version > last_sent {
                let nonce = self.registry.nonce();
                let shared = self.updates(held.as_deref(), &snap, &view);
                let updates = shared.iter().map(|u| pb::ConfigUpdate {
                    nonce: nonce.clone(),
                    ..u.clone()
                });
                self.registry
                    .sent(node, session, snap.version, &nonce)
                    .map_err(protocol)?;
                debug!(
                    version = snap.version,
                    chunks = updates.len(),
                    full = held.is_none(),
                    "sending config"
                );
                for u in updates {
                    if tx.send(Ok(u)).await.is_err() {
                        return Ok(());
                    }
                }
                SentCounts::add(if held.is_none() {
                    &self.counts.full
                } else {
                    &self.counts.delta
                });
                last_sent = snap.version;
                in_flight = Some((snap, nonce));
            }
            tokio::select! {
                changed = published.changed() => {
                    if changed.is_err() {
                        return Err(Status::unavailable("control plane shutting down"));
                    }
                }
                () = tokio::time::sleep_until(ahead.map_or_else(tokio::time::Instant::now, |(_, t)| t)), if ahead.is_some() => {}
                _ = replaced_check.tick() => {
                    if !self.registry.is_current(node, session) {
                        return Err(protocol(ProtocolError::Replaced));
                    }
                }
                msg = inbound.message() => {
                    let msg = match msg {
                        Ok(Some(m)) => m,
                        Ok(None) => return Ok(()),
                        Err(status) => {
                            debug!(error = %status, "subscriber stream error");
                            return Ok(());
                        }
                    };
                    let now = self.now();
                    match msg.message {
                        Some(pb::subscribe_request::Message::Ack(a)) => {
                            let current = self.registry.ack(node, session, a.version, &a.nonce, now).map_err(protocol)?;
                            if current {
                                if let Some((snap, _)) = in_flight.take() {
                                    debug!(version = snap.version, "ack");
                                    held = Some(snap);
                                }
                            }
                        }
                        Some(pb::subscribe_request::Message::Nack(n)) => {
                            let current = self.registry.nack(node, session, n.version, &n.nonce, &n.reason, now).map_err(protocol)?;
                            if current {
                                warn!(version = n.version, reason = %n.reason, "nack");
                                in_flight = None;
                            }
                        }
                        Some(pb::subscribe_request::Message::Hello(_)) => {
                            return Err(protocol(ProtocolError::DuplicateHello));
                        }
                        None => return Err(Status::invalid_argument("empty subscribe message")),
                    }
                }
            }
        }
    }
}

/// One subscriber's stream: its registry key and session, and the
/// server's version when it said hello.
struct Session<'a> {
    key: &'a str,
    id: u64,
    current: u64,
    /// The subscriber's claim, checked.
    claim: Held<Resource>,
}

/// The gRPC face of [`Distribution`].
#[derive(Debug, Clone)]
pub struct DistributionApi {
    pub inner: Arc<Distribution>,
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<pb::ConfigUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl DistributionService for DistributionApi {
    type SubscribeStream = UpdateStream;

    async fn subscribe(
        &self,
        request: Request<Streaming<pb::SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let who = super::principal(&request)?;
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(self.inner.clone().session(inbound, tx, who));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn resources(weights: &[(&str, f64)], origin: (&str, &str)) -> BTreeMap<String, Resource> {
        let mut r = BTreeMap::new();
        r.insert(
            format!("origin/{}", origin.0),
            Resource::Origin(pb::OriginTarget {
                id: origin.0.into(),
                endpoints: vec![origin.1.into()],
            }),
        );
        r.insert(
            "upstream/e1".into(),
            Resource::Upstream(
                weights
                    .iter()
                    .map(|(o, w)| pb::OriginWeight {
                        origin: (*o).into(),
                        weight: *w,
                    })
                    .collect(),
            ),
        );
        r
    }

    #[test]
    fn the_digest_follows_the_content_only() {
        let a = resources(&[("o1", 0.25), ("o2", 0.75)], ("o1", "127.0.0.1:80"));
        let d = digest(&a);
        assert_eq!(d.len(), 32);
        // Built again, separately: the same.
        assert_eq!(digest(&a.clone()), d);
        assert_eq!(
            digest(&resources(
                &[("o1", 0.25), ("o2", 0.75)],
                ("o1", "127.0.0.1:80")
            )),
            d
        );
        // Any change of a weight, an order, an endpoint or a name: another.
        let others = [
            resources(&[("o1", 0.5), ("o2", 0.5)], ("o1", "127.0.0.1:80")),
            resources(&[("o2", 0.75), ("o1", 0.25)], ("o1", "127.0.0.1:80")),
            resources(&[("o1", 0.25), ("o2", 0.75)], ("o1", "127.0.0.1:81")),
            resources(&[("o1", 0.25), ("o2", 0.75)], ("o3", "127.0.0.1:80")),
            resources(&[("o1", 0.25)], ("o1", "127.0.0.1:80")),
        ];
        for o in &others {
            assert_ne!(digest(o), d, "{o:?}");
        }
        assert_ne!(digest(&BTreeMap::new()), d);
    }
}

#[cfg(test)]
mod digest_across_replicas {
    use std::sync::Arc;

    use sextant_core::routing::{RoutingMeta, RoutingTable};
    use sextant_core::solver::{solve, SolveInput};
    use sextant_core::{ConfigVersion, DrainSet, Fleet, FleetSpec};

    use crate::control_loop::Snapshot;
    use crate::state;

    /// The leader publishes the table it computed (in memory); a follower,
    /// or the leader after a restart, publishes the table it read back from
    /// the store (JSON). Same committed version, same content: the digest
    /// must be the same, or every node failing over gets a full snapshot.
    #[tokio::test]
    async fn a_follower_computes_the_leaders_digest() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/examples/fleet.toml"
        ))
        .expect("example fleet");
        let spec = FleetSpec::from_toml(&text).expect("fleet");
        let fleet = Arc::new(Fleet::from_spec(spec.clone()).expect("valid"));
        // Edges report what they can serve now (fewer hosts in rotation).
        let mut signals = sextant_core::signals::Signals::default();
        for e in fleet.edges.values() {
            signals.edges.insert(
                e.id.clone(),
                sextant_core::signals::EdgeSignal {
                    measured_capacity_rps: Some(e.capacity_rps * 0.413),
                    ..Default::default()
                },
            );
        }
        let routing = solve(SolveInput {
            fleet: &fleet,
            signals: &signals,
            drains: &DrainSet::default(),
            previous: None,
            now_ms: 0,
        });
        let table = RoutingTable {
            meta: RoutingMeta {
                version: ConfigVersion(1),
                computed_at_ms: 0,
                fleet_generation: 1,
                cause: String::new(),
                churn: 0.0,
            },
            routing,
        };
        // The leader's snapshot: the fleet and the table it computed.
        let leader = state::State {
            fleet: Some(fleet),
            fleet_generation: 1,
            table: Some(Arc::new(table.clone())),
            version: ConfigVersion(1),
            ..state::State::default()
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn sextant_store::Store> =
            Arc::new(sextant_store::embedded::EmbeddedStore::open(dir.path()).expect("open"));
        let commit = state::Commit {
            fleet: Some((spec, 1)),
            table: Some(table),
            ..state::Commit::default()
        };
        state::commit(store.as_ref(), &state::State::default(), &commit)
            .await
            .expect("commit");
        let follower = state::load(store.as_ref()).await.expect("load");
        let a = super::resources(&Snapshot::from_state(&leader)).expect("leader");
        let b = super::resources(&Snapshot::from_state(&follower)).expect("follower");
        assert_eq!(a.version, b.version);
        let differing: Vec<&String> = a
            .resources
            .iter()
            .filter(|(k, v)| b.resources.get(*k) != Some(*v))
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            a.digest, b.digest,
            "same committed version, other digest; resources that differ: {differing:?}"
        );
    }
}
