//! The push protocol, generic: versioned snapshots of named resources,
//! deltas between them, nonces, ACK/NACK bookkeeping and per-subscriber
//! status. Nothing here knows what a resource means; the distribution
//! service maps the routing state to resources and resources to the wire.
//!
//! Modelled on xDS: a subscriber holds a version; the server sends it the
//! newest snapshot (or the delta from the version it holds, when that
//! version is still kept); every update carries a nonce; the subscriber
//! answers ACK (applied) or NACK (rejected, keeps its version). A slow
//! subscriber is only ever sent the newest version (the publisher is a
//! `watch`, which coalesces), so it holds back no one.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

/// A versioned, complete set of named resources.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot<R> {
    pub version: u64,
    /// Resources by name; names sort by kind prefix (`edge/…`, `route/…`).
    pub resources: BTreeMap<String, R>,
    /// A digest of the resources, opaque here: equal digests mean equal
    /// snapshots. A subscriber echoes the digest of the version it holds,
    /// so that a server whose snapshot of that version differs (another
    /// history: a store restored from a backup) sends it everything rather
    /// than a delta on a base it does not hold.
    pub digest: String,
}

impl<R> Snapshot<R> {
    pub fn empty() -> Self {
        Self {
            version: 0,
            resources: BTreeMap::new(),
            digest: String::new(),
        }
    }

    /// Resources whose name starts with `prefix`.
    pub fn with_prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a String, &'a R)> {
        self.resources
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(move |(k, _)| k.starts_with(prefix))
    }
}

/// What changed between two snapshots.
#[derive(Debug, Clone, PartialEq)]
pub struct Delta<'a, R> {
    pub base: u64,
    pub version: u64,
    /// Added or changed resources.
    pub upserts: Vec<(&'a String, &'a R)>,
    /// Names of removed resources.
    pub removals: Vec<&'a String>,
}

/// The delta that turns `base` into `new`, restricted to names that `keep`
/// selects.
pub fn delta<'a, R: PartialEq>(
    base: &'a Snapshot<R>,
    new: &'a Snapshot<R>,
    keep: impl Fn(&str) -> bool,
) -> Delta<'a, R> {
    let upserts = new
        .resources
        .iter()
        .filter(|(k, v)| keep(k) && base.resources.get(*k) != Some(*v))
        .collect();
    let removals = base
        .resources
        .keys()
        .filter(|k| keep(k) && !new.resources.contains_key(*k))
        .collect();
    Delta {
        base: base.version,
        version: new.version,
        upserts,
        removals,
    }
}

/// Publishes snapshots and keeps the last few, so that a subscriber holding
/// a recent version can be sent a delta instead of everything.
#[derive(Debug)]
pub struct Publisher<R> {
    tx: watch::Sender<Arc<Snapshot<R>>>,
    kept: Mutex<VecDeque<Arc<Snapshot<R>>>>,
    keep: usize,
    /// Unix ms at which the current version was published.
    published_at_ms: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<R: Send + Sync + 'static> Publisher<R> {
    /// A publisher that keeps the last `keep` versions for deltas.
    pub fn new(keep: usize) -> Self {
        let (tx, _) = watch::channel(Arc::new(Snapshot::empty()));
        Self {
            tx,
            kept: Mutex::new(VecDeque::new()),
            keep: keep.max(1),
            published_at_ms: AtomicU64::new(0),
        }
    }

    /// Publishes a new snapshot. Versions must grow; an older or equal one is
    /// ignored (returns false).
    pub fn publish(&self, snapshot: Snapshot<R>, now_ms: u64) -> bool {
        if snapshot.version <= self.tx.borrow().version && snapshot.version != 0 {
            return false;
        }
        let snap = Arc::new(snapshot);
        {
            let mut kept = lock(&self.kept);
            kept.push_back(snap.clone());
            while kept.len() > self.keep {
                kept.pop_front();
            }
        }
        self.published_at_ms.store(now_ms, Ordering::Relaxed);
        self.tx.send_replace(snap);
        true
    }

    pub fn current(&self) -> Arc<Snapshot<R>> {
        self.tx.borrow().clone()
    }

    pub fn published_at_ms(&self) -> u64 {
        self.published_at_ms.load(Ordering::Relaxed)
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot<R>>> {
        self.tx.subscribe()
    }

    /// A kept snapshot of `version`, if still kept.
    pub fn kept(&self, version: u64) -> Option<Arc<Snapshot<R>>> {
        lock(&self.kept)
            .iter()
            .find(|s| s.version == version)
            .cloned()
    }

    /// What this server knows of a subscriber's claim to hold `version`
    /// with `digest`.
    pub fn check(&self, version: u64, digest: &str) -> Held<R> {
        if version == 0 {
            return Held::Nothing;
        }
        // The current version first: every version up to it that is
        // still kept is then found below (one published meanwhile is
        // taken as ahead, and checked again once reached).
        if version > self.current().version {
            return Held::Ahead;
        }
        match self.kept(version) {
            Some(s) if s.digest == digest => Held::Same(s),
            Some(_) => Held::Other,
            None => Held::Unknown,
        }
    }
}

/// A subscriber's claim to a version, checked against the kept snapshots.
#[derive(Debug)]
pub enum Held<R> {
    /// It holds nothing.
    Nothing,
    /// It holds this kept snapshot (same version, same digest): deltas
    /// from it are safe.
    Same(Arc<Snapshot<R>>),
    /// This server's snapshot of that version is another one: what the
    /// subscriber holds is unknown, and only a full snapshot is safe.
    Other,
    /// A version newer than this server's.
    Ahead,
    /// An older version no longer kept: its content cannot be checked, but
    /// anything sent is newer and whole.
    Unknown,
}

/// What a subscriber says it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub node_id: String,
    /// `proxy` or `dns` (kept as text: the protocol does not interpret it).
    pub kind: String,
    pub site: String,
    pub software: String,
}

impl Identity {
    /// The subscriber's key in the [`Registry`]: kind and node id, since
    /// nodes of different kinds (a GeoDNS server and an edge proxy) may
    /// share a name.
    pub fn key(&self) -> String {
        format!("{}/{}", self.kind, self.node_id)
    }
}

/// The server's view of one subscriber.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SubscriberStatus {
    pub node_id: String,
    pub kind: String,
    pub site: String,
    pub software: String,
    pub connected: bool,
    /// Last version sent, and its nonce (empty when none is outstanding).
    pub version_sent: u64,
    pub nonce_pending: String,
    /// Last version the subscriber ACKed.
    pub version_applied: u64,
    /// Unix ms of the last message from it.
    pub last_contact_ms: u64,
    pub last_nack_version: u64,
    pub last_nack_reason: String,
    /// Unix ms since which it has held a version older than the current one.
    pub behind_since_ms: u64,
    /// Connection generation; a newer connection of the same node replaces
    /// the older one.
    pub session: u64,
}

/// Why a subscriber's message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("the first message must be a hello")]
    NoHello,
    #[error("hello again on an open stream")]
    DuplicateHello,
    #[error("node_id is empty")]
    EmptyNodeId,
    #[error("node_id {0:?} is too long (at most 253 bytes)")]
    LongNodeId(String),
    #[error(
        "ack/nack for version {version} which was never sent on this stream (last sent: {sent})"
    )]
    UnknownVersion { version: u64, sent: u64 },
    #[error("this stream was replaced by a newer connection of the same node")]
    Replaced,
    #[error("ack for version {version} with the nonce of version {sent}")]
    WrongVersion { version: u64, sent: u64 },
    #[error("{0} subscribers are known already")]
    TooMany(usize),
}

/// A subscriber disconnected this long (a node decommissioned) leaves the
/// status, and the stale count.
pub const FORGET_AFTER_MS: u64 = 24 * 3600 * 1000;

/// Subscribers known at once (connected, or disconnected for less than
/// [`FORGET_AFTER_MS`]): far above a fleet's nodes, and a bound on what
/// clients naming ever new nodes can make the server keep.
pub const MAX_SUBSCRIBERS: usize = 200_000;

/// Per-subscriber status of every subscriber seen, connected or not.
#[derive(Debug, Default)]
pub struct Registry {
    subscribers: Mutex<BTreeMap<String, SubscriberStatus>>,
    sessions: AtomicU64,
    nonces: AtomicU64,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// A fresh nonce, unique for this registry.
    pub fn nonce(&self) -> String {
        format!("n{}", self.nonces.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// Records a new connection of `id` (keyed by [`Identity::key`]), which
    /// holds `version_held` (0: unknown); returns its session number.
    pub fn connect(
        &self,
        id: &Identity,
        version_held: u64,
        now_ms: u64,
    ) -> Result<u64, ProtocolError> {
        if id.node_id.is_empty() {
            return Err(ProtocolError::EmptyNodeId);
        }
        if id.node_id.len() > 253 {
            return Err(ProtocolError::LongNodeId(id.node_id.clone()));
        }
        let session = self.sessions.fetch_add(1, Ordering::Relaxed) + 1;
        let mut subs = lock(&self.subscribers);
        let key = id.key();
        if subs.len() >= MAX_SUBSCRIBERS && !subs.contains_key(&key) {
            return Err(ProtocolError::TooMany(MAX_SUBSCRIBERS));
        }
        let s = subs.entry(key).or_default();
        *s = SubscriberStatus {
            node_id: id.node_id.clone(),
            kind: id.kind.clone(),
            site: id.site.clone(),
            software: id.software.clone(),
            connected: true,
            version_applied: version_held,
            last_contact_ms: now_ms,
            last_nack_version: s.last_nack_version,
            last_nack_reason: std::mem::take(&mut s.last_nack_reason),
            session,
            ..SubscriberStatus::default()
        };
        Ok(session)
    }

    fn with<T>(
        &self,
        key: &str,
        session: u64,
        f: impl FnOnce(&mut SubscriberStatus) -> Result<T, ProtocolError>,
    ) -> Result<T, ProtocolError> {
        let mut subs = lock(&self.subscribers);
        match subs.get_mut(key) {
            Some(s) if s.session == session => f(s),
            _ => Err(ProtocolError::Replaced),
        }
    }

    /// Records that `version` was sent with `nonce`.
    pub fn sent(
        &self,
        key: &str,
        session: u64,
        version: u64,
        nonce: &str,
    ) -> Result<(), ProtocolError> {
        self.with(key, session, |s| {
            s.version_sent = version;
            s.nonce_pending = nonce.to_owned();
            Ok(())
        })
    }

    /// Handles an ACK. A stale nonce (an older update, or none outstanding)
    /// is ignored, as in xDS; a version never sent, or not the version of
    /// the update the nonce names, is a protocol error.
    pub fn ack(
        &self,
        key: &str,
        session: u64,
        version: u64,
        nonce: &str,
        now_ms: u64,
    ) -> Result<bool, ProtocolError> {
        self.with(key, session, |s| {
            s.last_contact_ms = now_ms;
            if version > s.version_sent {
                return Err(ProtocolError::UnknownVersion {
                    version,
                    sent: s.version_sent,
                });
            }
            if s.nonce_pending.is_empty() || nonce != s.nonce_pending {
                return Ok(false);
            }
            if version != s.version_sent {
                return Err(ProtocolError::WrongVersion {
                    version,
                    sent: s.version_sent,
                });
            }
            s.version_applied = version;
            s.nonce_pending.clear();
            Ok(true)
        })
    }

    /// Handles a NACK: the subscriber keeps what it had.
    pub fn nack(
        &self,
        key: &str,
        session: u64,
        version: u64,
        nonce: &str,
        reason: &str,
        now_ms: u64,
    ) -> Result<bool, ProtocolError> {
        self.with(key, session, |s| {
            s.last_contact_ms = now_ms;
            if version > s.version_sent {
                return Err(ProtocolError::UnknownVersion {
                    version,
                    sent: s.version_sent,
                });
            }
            if s.nonce_pending.is_empty() || nonce != s.nonce_pending {
                return Ok(false);
            }
            s.last_nack_version = version;
            s.last_nack_reason = reason.chars().take(1024).collect();
            s.nonce_pending.clear();
            Ok(true)
        })
    }

    /// Records that the subscriber holds `version` after all: a version
    /// it claimed at connection, newer than the server's then, which the
    /// server has now reached (an HA replica catching up).
    pub fn holds(&self, key: &str, session: u64, version: u64) -> Result<(), ProtocolError> {
        self.with(key, session, |s| {
            s.version_applied = s.version_applied.max(version);
            Ok(())
        })
    }

    /// Marks a connection closed (if it is still the node's current one).
    pub fn disconnect(&self, key: &str, session: u64, now_ms: u64) {
        let _ = self.with(key, session, |s| {
            s.connected = false;
            s.nonce_pending.clear();
            s.last_contact_ms = now_ms;
            Ok(())
        });
    }

    /// Whether `session` is still the node's current connection.
    pub fn is_current(&self, key: &str, session: u64) -> bool {
        lock(&self.subscribers)
            .get(key)
            .is_some_and(|s| s.session == session)
    }

    /// Every subscriber's status, as it is (see [`Registry::statuses`]).
    pub fn list(&self) -> Vec<SubscriberStatus> {
        lock(&self.subscribers).values().cloned().collect()
    }

    /// Updates the "behind since" marks against the current version,
    /// forgets subscribers disconnected for [`FORGET_AFTER_MS`], and
    /// returns every subscriber's status.
    pub fn statuses(
        &self,
        current: u64,
        published_at_ms: u64,
        now_ms: u64,
    ) -> Vec<SubscriberStatus> {
        let mut subs = lock(&self.subscribers);
        subs.retain(|_, s| {
            s.connected || now_ms.saturating_sub(s.last_contact_ms) < FORGET_AFTER_MS
        });
        for s in subs.values_mut() {
            if s.version_applied >= current {
                s.behind_since_ms = 0;
            } else if s.behind_since_ms == 0 {
                s.behind_since_ms = published_at_ms.max(1);
            }
        }
        subs.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(version: u64, items: &[(&str, u32)]) -> Snapshot<u32> {
        let resources: BTreeMap<String, u32> =
            items.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect();
        Snapshot {
            version,
            digest: format!("{resources:?}"),
            resources,
        }
    }

    #[test]
    fn deltas_hold_changes_and_removals_only() {
        let a = snap(1, &[("edge/a", 1), ("edge/b", 2), ("route/x", 3)]);
        let b = snap(2, &[("edge/a", 1), ("edge/b", 5), ("edge/c", 6)]);
        let d = delta(&a, &b, |_| true);
        let up: Vec<(&str, u32)> = d.upserts.iter().map(|(k, v)| (k.as_str(), **v)).collect();
        assert_eq!(up, [("edge/b", 5), ("edge/c", 6)]);
        assert_eq!(d.removals, [&"route/x".to_owned()]);
        let only_edges = delta(&a, &b, |k| k.starts_with("edge/"));
        assert!(only_edges.removals.is_empty());
        assert_eq!(b.with_prefix("edge/").count(), 3);
        assert_eq!(b.with_prefix("edge/c").count(), 1);
        assert_eq!(b.with_prefix("route/").count(), 0);
    }

    #[test]
    fn the_publisher_keeps_recent_versions_and_refuses_old_ones() {
        let p = Publisher::new(2);
        assert!(p.publish(snap(1, &[]), 10));
        assert!(p.publish(snap(2, &[]), 20));
        assert!(p.publish(snap(3, &[]), 30));
        assert!(!p.publish(snap(2, &[]), 40));
        assert_eq!(p.current().version, 3);
        assert!(p.kept(1).is_none());
        assert!(p.kept(2).is_some());
        assert_eq!(p.published_at_ms(), 30);
    }

    #[test]
    fn a_claim_is_taken_only_with_the_digest_of_the_version_kept() {
        let p = Publisher::new(2);
        let v1 = snap(1, &[("edge/a", 1)]);
        let digest = v1.digest.clone();
        p.publish(v1, 10);
        p.publish(snap(2, &[("edge/a", 2)]), 20);
        assert!(matches!(p.check(1, &digest), Held::Same(s) if s.version == 1));
        // Version 1 of another history (or a subscriber that kept no digest).
        assert!(matches!(p.check(1, "other"), Held::Other));
        assert!(matches!(p.check(1, ""), Held::Other));
        assert!(matches!(p.check(0, ""), Held::Nothing));
        assert!(matches!(p.check(3, &digest), Held::Ahead));
        p.publish(snap(3, &[]), 30);
        p.publish(snap(4, &[]), 40);
        assert!(matches!(p.check(1, &digest), Held::Unknown));
    }

    #[test]
    fn acks_and_nacks_follow_nonces() {
        let r = Registry::new();
        let id = Identity {
            node_id: "ams1".into(),
            kind: "proxy".into(),
            site: String::new(),
            software: String::new(),
        };
        let k = id.key();
        let s = r.connect(&id, 0, 1).expect("connect");
        // Nothing outstanding: an ACK without a nonce is not taken.
        assert_eq!(r.ack(&k, s, 0, "", 2), Ok(false));
        r.sent(&k, s, 4, "n1").expect("sent");
        assert_eq!(r.ack(&k, s, 4, "stale", 2), Ok(false));
        assert_eq!(
            r.ack(&k, s, 9, "n1", 2),
            Err(ProtocolError::UnknownVersion {
                version: 9,
                sent: 4
            })
        );
        assert_eq!(
            r.ack(&k, s, 3, "n1", 2),
            Err(ProtocolError::WrongVersion {
                version: 3,
                sent: 4
            })
        );
        assert_eq!(r.ack(&k, s, 4, "n1", 2), Ok(true));
        r.sent(&k, s, 5, "n2").expect("sent");
        assert_eq!(r.nack(&k, s, 5, "n2", "bad upstream", 3), Ok(true));
        // Once answered, the nonce is spent: a later ACK of the NACKed
        // version, with or without it, changes nothing.
        assert_eq!(r.ack(&k, s, 5, "", 3), Ok(false));
        assert_eq!(r.ack(&k, s, 5, "n2", 3), Ok(false));
        let st = &r.statuses(5, 100, 3)[0];
        assert_eq!((st.version_applied, st.last_nack_version), (4, 5));
        assert_eq!(st.last_nack_reason, "bad upstream");
        assert_eq!(st.behind_since_ms, 100);
        // A newer connection of the same node replaces the old one.
        let s2 = r.connect(&id, 4, 5).expect("reconnect");
        assert_eq!(r.ack(&k, s, 4, "n1", 6), Err(ProtocolError::Replaced));
        assert!(r.is_current(&k, s2));
        r.disconnect(&k, s, 7);
        assert!(r.statuses(5, 100, 7)[0].connected);
        // A node of another kind with the same name is another subscriber.
        let dns = Identity {
            kind: "dns".into(),
            ..id.clone()
        };
        let d = r.connect(&dns, 0, 8).expect("connect dns");
        assert!(r.is_current(&k, s2) && r.is_current(&dns.key(), d));
        assert_eq!(r.list().len(), 2);
        // A node gone for a day is forgotten; a connected one, however
        // quiet, is not.
        r.disconnect(&dns.key(), d, 10);
        assert_eq!(r.statuses(5, 100, 10 + FORGET_AFTER_MS - 1).len(), 2);
        let left = r.statuses(5, 100, 10 + FORGET_AFTER_MS);
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].kind, "proxy");
        assert_eq!(
            r.connect(
                &Identity {
                    node_id: String::new(),
                    ..id
                },
                0,
                1
            ),
            Err(ProtocolError::EmptyNodeId)
        );
    }
}
