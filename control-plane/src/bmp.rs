//! The BMP station (`sextant-cp --bmp-listen ADDR`): accepts BMP sessions
//! from edge routers (RFC 7854) and turns what they say about the anycast
//! prefixes of the fleet's `[[anycast]]` sites into health votes.
//!
//! Each router of an anycast site votes as `bgp:<router>` on every edge of
//! the site: *ok* when its BMP session is up and some RIB it monitors has
//! a route for at least one of the site's prefixes; *failing* when none
//! has (withdrawn, the BGP peer that sent it went down) or its BMP session
//! went down, with the details as the error. Votes are cast every
//! `interval`, and at once when a route of a watched prefix changes, so
//! that a withdrawal reaches the verdict without waiting for the interval;
//! the K/M hysteresis of the health settings then counts intervals.
//!
//! A router is known by its Initiation sysName, its BGP router id (from a
//! Loc-RIB per-peer header or a Peer Up's OPEN), or the address its BMP
//! session comes from. A router the station has not heard from since it
//! started casts no vote. A new session votes once it has sent its table
//! (an End-of-RIB, or a watched prefix), or after `sync_grace`.
//!
//! With several replicas, routers send BMP to every replica (BMP clients
//! take several stations); only the leader's station votes, so a new
//! leader already knows every router's routes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sextant_bgp::bmp::{decode, Framer, Message, Session};
use sextant_core::automation::Observation;
use sextant_core::health::BGP_PREFIX;
use sextant_core::Fleet;
use sextant_proto::v1 as pb;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tracing::{debug, info, warn, Instrument};

use crate::cluster::{Node, Role};
use crate::control_loop::Clock;
use crate::inbox::Reports;
use crate::timefmt::rfc3339;

/// How the station runs.
#[derive(Debug, Clone)]
pub struct StationConfig {
    /// Votes are cast this often (and at once on a change).
    pub interval: Duration,
    /// A new session that has not sent its table yet votes after this.
    pub sync_grace: Duration,
    /// Routers may connect only from these networks (BMP has no
    /// authentication of its own); empty: from anywhere.
    pub allow: Vec<ipnet::IpNet>,
    /// Sessions at once, at most.
    pub max_sessions: usize,
}

impl Default for StationConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            sync_grace: Duration::from_secs(3),
            allow: Vec::new(),
            max_sessions: 256,
        }
    }
}

/// One BMP session, up or ended.
#[derive(Debug, Clone)]
pub struct Conn {
    pub id: u64,
    pub remote: SocketAddr,
    pub connected_ms: i64,
    pub session: Session,
    /// When and why it ended.
    pub ended: Option<(i64, String)>,
    pub last_error: String,
}

impl Conn {
    /// Whether `router` (a configured name) is this session's router.
    pub fn is(&self, router: &str) -> bool {
        self.session.sys_name.as_deref() == Some(router)
            || self
                .session
                .bgp_id
                .is_some_and(|id| id.to_string() == router)
            || self.remote.ip().to_string() == router
    }

    fn name(&self) -> String {
        match &self.session.sys_name {
            Some(n) => format!("{n} ({})", self.remote),
            None => self.remote.to_string(),
        }
    }
}

/// Whether a connection from `remote` may open a session while `open`
/// are up.
fn admits(config: &StationConfig, remote: SocketAddr, open: usize) -> Result<(), String> {
    if !config.allow.is_empty() && !config.allow.iter().any(|n| n.contains(&remote.ip())) {
        return Err(format!(
            "{} is outside --bmp-allow ({})",
            remote.ip(),
            config
                .allow
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if open >= config.max_sessions {
        return Err(format!(
            "{open} sessions are up, the most --bmp allows ({})",
            config.max_sessions
        ));
    }
    Ok(())
}

/// The station's metrics.
#[derive(Debug, Default)]
struct StationMetrics {
    sessions: Gauge,
    messages: Family<Vec<(String, String)>, Counter>,
    decode_errors: Counter,
    refused: Counter,
    votes: Family<Vec<(String, String)>, Counter<u64, AtomicU64>>,
}

impl StationMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("sextant");
        r.register(
            "bmp_sessions",
            "BMP sessions up at this replica's station",
            m.sessions.clone(),
        );
        r.register(
            "bmp_messages",
            "BMP messages received, by type",
            m.messages.clone(),
        );
        r.register(
            "bmp_decode_errors",
            "BMP streams refused (malformed message; the session is closed)",
            m.decode_errors.clone(),
        );
        r.register(
            "bmp_sessions_refused",
            "BMP connections refused (source outside --bmp-allow, or too many sessions)",
            m.refused.clone(),
        );
        r.register(
            "bmp_votes",
            "Anycast health votes cast from BMP, by result",
            m.votes.clone(),
        );
        m
    }
}

/// The BMP station: sessions and what they say.
#[derive(Debug)]
pub struct Station {
    config: StationConfig,
    conns: Mutex<BTreeMap<u64, Conn>>,
    next_id: AtomicU64,
    /// Every anycast prefix of the fleet.
    watched: Mutex<Arc<BTreeSet<IpNet>>>,
    changed: Notify,
    metrics: StationMetrics,
}

impl Station {
    pub fn new(config: StationConfig, registry: &mut Registry) -> Arc<Self> {
        Arc::new(Self {
            config,
            conns: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
            watched: Mutex::new(Arc::new(BTreeSet::new())),
            changed: Notify::new(),
            metrics: StationMetrics::register(registry),
        })
    }

    /// The sessions, up and recently ended.
    pub fn conns(&self) -> Vec<Conn> {
        self.conns
            .lock()
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default()
    }

    fn watched(&self) -> Arc<BTreeSet<IpNet>> {
        self.watched.lock().map(|w| w.clone()).unwrap_or_default()
    }

    fn set_watched(&self, fleet: Option<&Fleet>) {
        let w: BTreeSet<IpNet> = fleet
            .map(|f| {
                f.anycast
                    .values()
                    .flat_map(|a| a.prefixes.iter().copied())
                    .collect()
            })
            .unwrap_or_default();
        if let Ok(mut cur) = self.watched.lock() {
            if **cur != w {
                if let Ok(mut conns) = self.conns.lock() {
                    for c in conns.values_mut() {
                        c.session.retain(&w);
                    }
                }
                *cur = Arc::new(w);
            }
        }
    }

    /// Serves BMP on `listener` and casts votes into `reports` while this
    /// replica leads. Returns when the listener fails.
    pub async fn run(
        self: Arc<Self>,
        listener: TcpListener,
        node: Node,
        reports: Arc<Reports>,
        clock: Arc<dyn Clock>,
    ) {
        tokio::spawn(self.clone().vote(node, reports, clock.clone()));
        loop {
            let (stream, remote) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "bmp accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let open = self
                .conns
                .lock()
                .map(|c| c.values().filter(|c| c.ended.is_none()).count())
                .unwrap_or(0);
            if let Err(why) = admits(&self.config, remote, open) {
                warn!(%remote, "bmp connection refused: {why}");
                self.metrics.refused.inc();
                continue;
            }
            let id = self
                .next_id
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let span = tracing::info_span!("bmp", %remote, id);
            tokio::spawn(
                self.clone()
                    .session(stream, remote, id, clock.clone())
                    .instrument(span),
            );
        }
    }

    /// Reads one router's BMP stream until it ends.
    async fn session(
        self: Arc<Self>,
        mut stream: TcpStream,
        remote: SocketAddr,
        id: u64,
        clock: Arc<dyn Clock>,
    ) {
        info!("bmp session up");
        let _ = stream.set_nodelay(true);
        keepalive(&stream);
        let now = clock.now_ms();
        if let Ok(mut conns) = self.conns.lock() {
            conns.insert(
                id,
                Conn {
                    id,
                    remote,
                    connected_ms: now,
                    session: Session::default(),
                    ended: None,
                    last_error: String::new(),
                },
            );
        }
        self.metrics.sessions.inc();
        let mut framer = Framer::new();
        let mut buf = vec![0u8; 64 * 1024];
        let why = loop {
            let n = match stream.read(&mut buf).await {
                Ok(0) => {
                    break match framer.finish() {
                        Ok(()) => "the router closed the BMP session".to_owned(),
                        Err(e) => {
                            self.metrics.decode_errors.inc();
                            format!("the router closed the BMP session mid-message: {e}")
                        }
                    }
                }
                Ok(n) => n,
                Err(e) => break format!("BMP session lost: {e}"),
            };
            framer.push(&buf[..n]);
            match self.take(&mut framer, id, &clock) {
                Ok(None) => {}
                Ok(Some(reason)) => break reason,
                Err(e) => break e,
            }
        };
        self.metrics.sessions.dec();
        let now = clock.now_ms();
        info!(reason = %why, "bmp session down");
        if let Ok(mut conns) = self.conns.lock() {
            // A router's latest ended session is enough to say it is down
            // (and keeps the list bounded by the routers).
            let ident = conns
                .get(&id)
                .map(|c| (c.session.sys_name.clone(), c.remote.ip()));
            conns.retain(|k, c| {
                *k == id
                    || c.ended.is_none()
                    || ident.as_ref() != Some(&(c.session.sys_name.clone(), c.remote.ip()))
            });
            if let Some(c) = conns.get_mut(&id) {
                c.ended = Some((now, why));
            }
        }
        self.changed.notify_one();
    }

    /// Decodes and applies every whole message framed; `Some(reason)` when
    /// the session must end (Termination), `Err` on a malformed stream.
    fn take(
        &self,
        framer: &mut Framer,
        id: u64,
        clock: &Arc<dyn Clock>,
    ) -> Result<Option<String>, String> {
        let watched = self.watched();
        let mut changed = false;
        let mut end = None;
        let refuse = |e: String| {
            self.metrics.decode_errors.inc();
            warn!(error = %e, "malformed bmp stream; closing the session");
            if let Ok(mut conns) = self.conns.lock() {
                if let Some(c) = conns.get_mut(&id) {
                    c.last_error.clone_from(&e);
                }
            }
            format!("malformed BMP: {e}")
        };
        loop {
            let (at, bytes) = match framer.next_message() {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => return Err(refuse(e.to_string())),
            };
            let msg = decode(&bytes, at).map_err(|e| refuse(e.to_string()))?;
            self.metrics
                .messages
                .get_or_create(&vec![("type".to_owned(), msg.kind().to_owned())])
                .inc();
            let now = clock.now_ms();
            if let Ok(mut conns) = self.conns.lock() {
                if let Some(c) = conns.get_mut(&id) {
                    let synced = c.session.synced;
                    changed |= c.session.apply(&msg, now, &watched);
                    changed |= c.session.synced != synced;
                    if let Message::Initiation { sys_name, .. } = &msg {
                        info!(
                            sys_name = sys_name.as_deref().unwrap_or("-"),
                            "bmp initiation"
                        );
                        changed = true;
                    }
                }
            }
            if let Message::Termination { reason } = &msg {
                end = Some(format!("the router terminated the BMP session: {reason}"));
                break;
            }
        }
        if changed {
            self.changed.notify_one();
        }
        Ok(end)
    }

    /// Casts votes every interval and on every change, while leading.
    async fn vote(self: Arc<Self>, node: Node, reports: Arc<Reports>, clock: Arc<dyn Clock>) {
        let mut tick = tokio::time::interval(self.config.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut snaps = node.subscribe();
        // Each voter's last vote: a change casts only the votes that
        // changed, so that a change elsewhere is not an extra vote.
        let mut last: BTreeMap<(String, String), bool> = BTreeMap::new();
        loop {
            let on_change = tokio::select! {
                _ = tick.tick() => false,
                () = self.changed.notified() => true,
                r = snaps.changed() => {
                    if r.is_err() {
                        return;
                    }
                    // A new fleet may watch other prefixes. No vote: the
                    // snapshot also changes because of the votes' verdicts,
                    // and votes count intervals.
                    let fleet = snaps.borrow_and_update().fleet.clone();
                    self.set_watched(fleet.as_deref());
                    continue;
                }
            };
            let snap = node.snapshot();
            let fleet = snap.fleet.as_deref();
            self.set_watched(fleet);
            let Some(fleet) = fleet else { continue };
            if fleet.anycast.is_empty() {
                continue;
            }
            let now = clock.now_ms();
            let grace = i64::try_from(self.config.sync_grace.as_millis()).unwrap_or(i64::MAX);
            let mut obs = votes(fleet, &self.conns(), now, grace);
            if on_change {
                obs.retain(|o| last.get(&(o.voter.clone(), o.edge.clone())) != Some(&o.ok));
            }
            if last.len() > 100_000 {
                last.clear();
            }
            for o in &obs {
                last.insert((o.voter.clone(), o.edge.clone()), o.ok);
                self.metrics
                    .votes
                    .get_or_create(&vec![(
                        "result".to_owned(),
                        if o.ok { "ok" } else { "failing" }.to_owned(),
                    )])
                    .inc();
            }
            if matches!(node.role(), Role::Leader(_)) {
                if !obs.is_empty() {
                    debug!(votes = obs.len(), on_change, "bmp votes");
                }
                reports.push(obs);
            }
            if on_change {
                // The next periodic vote one interval after this one: the
                // hysteresis counts intervals, not events.
                tick.reset();
            }
        }
    }

    /// The sessions for `ListBmpSessions`.
    pub fn list(&self, fleet: Option<&Fleet>) -> Vec<pb::BmpSession> {
        let conns = self.conns();
        conns
            .iter()
            .map(|c| {
                let mut out = pb::BmpSession {
                    peer: c.remote.to_string(),
                    sys_name: c.session.sys_name.clone().unwrap_or_default(),
                    connected_unix_ms: u64::try_from(c.connected_ms).unwrap_or(0),
                    messages: c.session.counts.messages,
                    bgp_peers_up: c.session.peers_up.len() as u32,
                    last_error: c.last_error.clone(),
                    up: c.ended.is_none(),
                    ended_unix_ms: c
                        .ended
                        .as_ref()
                        .map_or(0, |e| u64::try_from(e.0).unwrap_or(0)),
                    ended_reason: c.ended.as_ref().map(|e| e.1.clone()).unwrap_or_default(),
                    bgp_id: c.session.bgp_id.map(|i| i.to_string()).unwrap_or_default(),
                    ..pb::BmpSession::default()
                };
                let site = fleet.and_then(|f| {
                    f.anycast
                        .values()
                        .find_map(|a| a.routers.iter().find(|r| c.is(r)).map(|r| (a, r.clone())))
                });
                if let Some((a, router)) = site {
                    out.site = a.site.to_string();
                    out.router = router;
                    for p in &a.prefixes {
                        if c.session.announces(p) {
                            let by: Vec<String> =
                                c.session.announced_by(p).map(ToString::to_string).collect();
                            out.announced.push(format!("{p} via {}", by.join(", ")));
                        } else {
                            out.missing.push(missing(c, p));
                        }
                    }
                }
                out
            })
            .collect()
    }
}

/// Why `p` has no route at `c`, in words.
fn missing(c: &Conn, p: &IpNet) -> String {
    match c.session.last.get(p) {
        Some(ch) if !ch.announced => {
            format!("{p} {} by {} at {}", ch.why, ch.by, rfc3339(ch.at_ms))
        }
        _ => format!(
            "{p} not announced since the session came up at {}",
            rfc3339(c.connected_ms)
        ),
    }
}

/// TCP keepalive, so that a router that vanishes without closing its
/// session (power loss) counts as down within about 20 s.
fn keepalive(stream: &TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(3))
        .with_retries(3);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&ka) {
        debug!(error = %e, "cannot set tcp keepalive on a bmp session");
    }
}

/// The votes of every router of every anycast site of `fleet`, from the
/// sessions `conns`, at `now_ms`. A router with no session casts none; a
/// new session that has not sent its table casts none for `grace_ms`.
pub fn votes(fleet: &Fleet, conns: &[Conn], now_ms: i64, grace_ms: i64) -> Vec<Observation> {
    let mut out = Vec::new();
    for a in fleet.anycast.values() {
        let Some(info) = fleet.domains.get(&a.site) else {
            continue;
        };
        for router in &a.routers {
            let mine: Vec<&Conn> = conns.iter().filter(|c| c.is(router)).collect();
            let up: Vec<&Conn> = mine.iter().copied().filter(|c| c.ended.is_none()).collect();
            let vote = if up.is_empty() {
                // The latest ended session says why.
                mine.iter()
                    .filter_map(|c| c.ended.as_ref().map(|e| (e.0, c, &e.1)))
                    .max_by_key(|(at, _, _)| *at)
                    .map(|(at, c, why)| {
                        (
                            false,
                            format!(
                                "BMP session from {} down since {}: {why}",
                                c.name(),
                                rfc3339(at)
                            ),
                        )
                    })
            } else if up
                .iter()
                .all(|c| !c.session.synced && now_ms - c.connected_ms < grace_ms)
            {
                None
            } else if up
                .iter()
                .any(|c| a.prefixes.iter().any(|p| c.session.announces(p)))
            {
                Some((true, String::new()))
            } else {
                let lost: Vec<String> = a
                    .prefixes
                    .iter()
                    .map(|p| up.iter().map(|c| missing(c, p)).next().unwrap_or_default())
                    .collect();
                Some((false, format!("no route: {}", lost.join("; "))))
            };
            let Some((ok, error)) = vote else { continue };
            for edge in &info.edges {
                out.push(Observation {
                    edge: edge.to_string(),
                    voter: format!("{BGP_PREFIX}{router}"),
                    ok,
                    at_ms: now_ms,
                    error: error.clone(),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use sextant_bgp::bmp::write::{self, Peer};
    use std::net::Ipv4Addr;

    #[test]
    fn only_allowed_sources_and_a_bounded_number_of_sessions_are_admitted() {
        let addr = |s: &str| s.parse::<SocketAddr>().expect("addr");
        let open = StationConfig::default();
        assert!(admits(&open, addr("192.0.2.1:179"), 0).is_ok());
        let config = StationConfig {
            allow: vec![
                "10.0.0.0/8".parse().expect("net"),
                "::1/128".parse().expect("net"),
            ],
            max_sessions: 2,
            ..StationConfig::default()
        };
        assert!(admits(&config, addr("10.1.2.3:5000"), 0).is_ok());
        assert!(admits(&config, addr("[::1]:5000"), 1).is_ok());
        let e = admits(&config, addr("127.0.0.1:5000"), 0).expect_err("outside");
        assert!(
            e.contains("127.0.0.1 is outside --bmp-allow (10.0.0.0/8, ::1/128)"),
            "{e}"
        );
        let e = admits(&config, addr("10.1.2.3:5000"), 2).expect_err("full");
        assert!(e.contains("2 sessions are up"), "{e}");
    }

    fn fleet() -> Fleet {
        Fleet::from_toml(
            r#"
[[services]]
id = "www"
hostname = "www.example.com"
zone = "example.com"
default_group = "g"
nameservers = ["ns1.example.com"]

[[edges]]
id = "ams1"
kind = "self_built"
site = "region/eu/metro/ams/site/ams1"
addresses = ["127.0.0.1"]
capacity_rps = 100
health_check = "127.0.0.1:80"

[[groups]]
id = "g"
prefixes = ["10.0.0.0/8"]
latency_ms = { "region/eu" = 10 }

[[anycast]]
site = "region/eu/metro/ams/site/ams1"
routers = ["r1", "192.0.2.2"]
prefixes = ["203.0.113.0/24"]
"#,
        )
        .expect("fleet")
    }

    fn conn(id: u64, msgs: &[Vec<u8>], at: i64) -> Conn {
        let w: BTreeSet<IpNet> = ["203.0.113.0/24".parse().expect("net")].into();
        let mut session = Session::default();
        for m in msgs {
            session.apply(&decode(m, 0).expect("bmp"), at, &w);
        }
        Conn {
            id,
            remote: "127.0.0.1:4000".parse().expect("addr"),
            connected_ms: 0,
            session,
            ended: None,
            last_error: String::new(),
        }
    }

    #[test]
    fn routers_vote_from_their_sessions() {
        let f = fleet();
        let p: IpNet = "203.0.113.0/24".parse().expect("net");
        let loc = Peer::loc_rib(65001, Ipv4Addr::new(192, 0, 2, 1));
        // r1 by sysName announces; 192.0.2.2 (by BGP id) has not synced.
        let r1 = conn(
            1,
            &[
                write::initiation("r1", "x"),
                write::route_monitoring(&loc, &[p], &[]),
            ],
            0,
        );
        let r2 = conn(
            2,
            &[
                write::initiation("other", "x"),
                write::route_monitoring(
                    &Peer::loc_rib(65001, Ipv4Addr::new(192, 0, 2, 2)),
                    &[],
                    &[],
                ),
            ],
            0,
        );
        assert!(r2.session.synced, "an End-of-RIB syncs");
        let v = votes(&f, &[r1.clone(), r2.clone()], 1000, 3000);
        assert_eq!(v.len(), 2);
        assert_eq!((v[0].voter.as_str(), v[0].ok), ("bgp:r1", true));
        assert_eq!((v[1].voter.as_str(), v[1].ok), ("bgp:192.0.2.2", false));
        assert!(
            v[1].error.contains("203.0.113.0/24 not announced since"),
            "{}",
            v[1].error
        );

        // r1 withdraws: failing, with who and when.
        let mut r1w = r1.clone();
        let w: BTreeSet<IpNet> = [p].into();
        r1w.session.apply(
            &decode(&write::route_monitoring(&loc, &[], &[p]), 0).expect("bmp"),
            1_700_000_000_000,
            &w,
        );
        let v = votes(&f, &[r1w.clone()], 1_700_000_000_500, 3000);
        assert_eq!(v.len(), 1);
        assert!(!v[0].ok);
        assert_eq!(
            v[0].error,
            "no route: 203.0.113.0/24 withdrawn by Loc-RIB (AS65001) at 2023-11-14T22:13:20Z"
        );
        // Its session ends: failing, and says so.
        r1w.ended = Some((
            1_700_000_001_000,
            "the router closed the BMP session".into(),
        ));
        let v = votes(&f, &[r1w], 1_700_000_002_000, 3000);
        assert!(!v[0].ok);
        assert!(
            v[0].error.starts_with(
                "BMP session from r1 (127.0.0.1:4000) down since 2023-11-14T22:13:21Z"
            ),
            "{}",
            v[0].error
        );

        // A new session that has sent nothing yet: no vote within the grace.
        let fresh = conn(3, &[write::initiation("r1", "x")], 0);
        assert!(votes(&f, std::slice::from_ref(&fresh), 1000, 3000).is_empty());
        let v = votes(&f, &[fresh], 4000, 3000);
        assert!(
            !v[0].ok,
            "after the grace, nothing announced is a failing vote"
        );
    }
}
