//! The subscriber side of the config stream, shared by the edge proxy and
//! (later) GeoDNS: connect, say hello with the version held, assemble
//! updates (chunks, deltas), check them with the caller's [`Build`], ACK or
//! NACK, persist the last good config, and publish it on a `watch`.
//!
//! Static stability: the last config accepted is written to the data
//! directory before it is ACKed; at start-up it is read back and served
//! before the control plane is even tried, and nothing a control-plane
//! outage does removes it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use sextant_proto::v1 as pb;
use sextant_proto::v1::distribution_service_client::DistributionServiceClient;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

/// Turns a complete node config into what the data plane serves, or says
/// why it cannot (the reason is sent as the NACK).
pub trait Build: Send + Sync + 'static {
    type Output: Send + Sync + 'static;
    fn build(&self, version: u64, config: &pb::NodeConfig) -> Result<Self::Output, String>;
}

/// A config in service, with its version.
#[derive(Debug)]
pub struct Applied<T> {
    pub version: u64,
    pub value: T,
    /// Unix ms when it was accepted (read from disk: when it was written).
    pub accepted_at_ms: i64,
    /// True when it was read from the data directory at start-up.
    pub from_disk: bool,
}

/// How to reach the control plane and who we are.
#[derive(Debug, Clone)]
pub struct Options {
    /// Control-plane gRPC URL, or several separated by commas (replicas):
    /// on failure the next one is tried.
    pub control_plane: String,
    pub node_id: String,
    pub kind: pb::NodeKind,
    pub site: String,
    pub data_dir: PathBuf,
    /// TLS to the control plane (`None`: plaintext).
    pub tls: Option<sextant_tls::ClientTls>,
}

/// Errors reading the persisted config.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot decode {path}: {source}")]
    Decode {
        path: PathBuf,
        #[source]
        source: prost::DecodeError,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The file the last good config is kept in.
#[derive(Clone, PartialEq, Message)]
pub struct Persisted {
    #[prost(uint64, tag = "1")]
    pub version: u64,
    #[prost(message, optional, tag = "2")]
    pub config: Option<pb::NodeConfig>,
    #[prost(int64, tag = "3")]
    pub accepted_at_ms: i64,
    /// Whose config it is (empty in files written before this was kept):
    /// a data directory reused by another node, or shared by an edge and a
    /// DNS server, must not hand one node another's config.
    #[prost(string, tag = "4")]
    pub node_id: String,
    #[prost(enumeration = "pb::NodeKind", tag = "5")]
    pub kind: i32,
    /// The server's digest of the version (empty in files written before
    /// it was kept), echoed in the hello.
    #[prost(string, tag = "6")]
    pub digest: String,
}

impl Persisted {
    /// Why this file is not `node`'s (of `kind`), if it is not.
    fn foreign(&self, node: &str, kind: pb::NodeKind) -> Option<String> {
        let theirs = pb::NodeKind::try_from(self.kind).map_or("unknown", |k| k.as_str_name());
        (!self.node_id.is_empty() && (self.node_id != node || self.kind != kind as i32)).then(
            || {
                format!(
                    "it belongs to {theirs} node {:?}, not to {} node {node:?}",
                    self.node_id,
                    kind.as_str_name()
                )
            },
        )
    }
}

fn config_path(dir: &Path) -> PathBuf {
    dir.join("last-good-config.pb")
}

/// Unix time in milliseconds (0 before 1970).
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Reads the persisted config, if there is one.
pub fn load(dir: &Path) -> Result<Option<Persisted>, PersistError> {
    let path = config_path(dir);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(PersistError::Read { path, source }),
    };
    Persisted::decode(bytes.as_slice())
        .map(Some)
        .map_err(|source| PersistError::Decode { path, source })
}

/// Writes `node`'s config (`version`, with the server's digest of it)
/// atomically (temporary file, fsync, rename).
pub fn store(
    dir: &Path,
    node: (&str, pb::NodeKind),
    (version, digest): (u64, &str),
    config: &pb::NodeConfig,
    at_ms: i64,
) -> Result<(), PersistError> {
    let path = config_path(dir);
    let tmp = dir.join("last-good-config.pb.tmp");
    let write = |p: &Path| -> std::io::Result<()> {
        use std::io::Write;
        std::fs::create_dir_all(dir)?;
        let mut f = std::fs::File::create(p)?;
        f.write_all(
            &Persisted {
                version,
                config: Some(config.clone()),
                accepted_at_ms: at_ms,
                node_id: node.0.to_owned(),
                kind: node.1 as i32,
                digest: digest.to_owned(),
            }
            .encode_to_vec(),
        )?;
        f.sync_all()?;
        std::fs::rename(p, &path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    };
    write(&tmp).map_err(|source| PersistError::Write {
        path: path.clone(),
        source,
    })
}

/// The version a node holds, the server's digest of it, and its config.
#[derive(Debug, Clone)]
struct Held {
    version: u64,
    digest: String,
    state: State,
}

/// The config held, kept as maps so that deltas apply by id.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    pub services: BTreeMap<String, pb::ServiceConfig>,
    pub edges: BTreeMap<String, pb::EdgeTarget>,
    pub groups: BTreeMap<String, pb::GroupMatch>,
    pub routes: BTreeMap<String, pb::GroupRouting>,
    pub origins: BTreeMap<String, pb::OriginTarget>,
    pub upstream: Vec<pb::OriginWeight>,
    pub asn_prefixes: BTreeMap<(u32, u32), pb::AsnPrefixes>,
}

impl State {
    pub fn from_config(c: &pb::NodeConfig) -> Self {
        let mut s = Self::default();
        s.merge(c);
        s
    }

    fn merge(&mut self, c: &pb::NodeConfig) {
        for x in &c.services {
            self.services.insert(x.id.clone(), x.clone());
        }
        for x in &c.edges {
            self.edges.insert(x.id.clone(), x.clone());
        }
        for x in &c.groups {
            self.groups.insert(x.id.clone(), x.clone());
        }
        for x in &c.routing {
            self.routes
                .insert(format!("{}/{}", x.service, x.group), x.clone());
        }
        for x in &c.origins {
            self.origins.insert(x.id.clone(), x.clone());
        }
        if !c.upstream.is_empty() {
            self.upstream = c.upstream.clone();
        }
        for x in &c.asn_prefixes {
            self.asn_prefixes.insert((x.asn, x.part), x.clone());
        }
    }

    /// Applies one update (all of whose chunks are given).
    fn apply(&mut self, u: &pb::ConfigUpdate) {
        for id in &u.removed_services {
            self.services.remove(id);
        }
        for id in &u.removed_edges {
            self.edges.remove(id);
        }
        for id in &u.removed_groups {
            self.groups.remove(id);
        }
        for id in &u.removed_routes {
            self.routes.remove(id);
        }
        for id in &u.removed_origins {
            self.origins.remove(id);
        }
        if u.removed_upstream {
            self.upstream.clear();
        }
        for name in &u.removed_asn_prefixes {
            if let Some((asn, part)) = name.split_once('/') {
                if let (Ok(asn), Ok(part)) = (asn.parse(), part.parse()) {
                    self.asn_prefixes.remove(&(asn, part));
                }
            }
        }
        if let Some(c) = &u.config {
            self.merge(c);
        }
    }

    pub fn to_config(&self) -> pb::NodeConfig {
        pb::NodeConfig {
            services: self.services.values().cloned().collect(),
            edges: self.edges.values().cloned().collect(),
            origins: self.origins.values().cloned().collect(),
            groups: self.groups.values().cloned().collect(),
            routing: self.routes.values().cloned().collect(),
            upstream: self.upstream.clone(),
            asn_prefixes: self.asn_prefixes.values().cloned().collect(),
        }
    }
}

/// Follows the control plane forever (until `shutdown`), publishing every
/// accepted config on `out`. Reads the persisted config first.
pub async fn run<B: Build>(
    opts: Options,
    builder: Arc<B>,
    out: watch::Sender<Option<Arc<Applied<B::Output>>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut held: Option<Held> = None;
    match load(&opts.data_dir) {
        Ok(Some(p)) => {
            let version = p.version;
            let config = p.config.clone().unwrap_or_default();
            match p.foreign(&opts.node_id, opts.kind) {
                Some(why) => warn!(version, "persisted config ignored: {why}"),
                None => match builder.build(version, &config) {
                    Ok(value) => {
                        info!(
                            version,
                            "serving the persisted config until the control plane answers"
                        );
                        out.send_replace(Some(Arc::new(Applied {
                            version,
                            value,
                            accepted_at_ms: p.accepted_at_ms,
                            from_disk: true,
                        })));
                        held = Some(Held {
                            version,
                            digest: p.digest.clone(),
                            state: State::from_config(&config),
                        });
                    }
                    Err(e) => {
                        warn!(version, error = %e, "persisted config is not usable; ignoring it");
                    }
                },
            }
        }
        Ok(None) => info!("no persisted config; waiting for the control plane"),
        Err(e) => warn!(error = %e, "cannot read the persisted config; ignoring it"),
    }
    let urls = control_plane_urls(&opts.control_plane);
    let mut attempt = 0usize;
    let mut backoff = Duration::from_millis(100);
    loop {
        if *shutdown.borrow() {
            return;
        }
        let url = &urls[attempt % urls.len()];
        let started = tokio::time::Instant::now();
        let session = follow(&opts, url, &builder, &out, &mut held);
        let result = tokio::select! {
            r = session => r,
            _ = shutdown.changed() => return,
        };
        // This node's own trouble (a disk that takes no config) is asked
        // about again less often: each try builds the whole config.
        let mut most = Duration::from_secs(5);
        match result {
            Ok(()) => {
                info!("config stream ended; reconnecting");
                backoff = Duration::from_millis(100);
            }
            Err(e @ SessionError::Local { .. }) => {
                backoff = backoff.max(Duration::from_secs(5));
                most = Duration::from_secs(60);
                warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "config stream ended");
                attempt += 1;
            }
            Err(e) => {
                // A failure after a long session starts the backoff over;
                // one after this node's own trouble waits no longer than
                // any other.
                if started.elapsed() > Duration::from_secs(30) {
                    backoff = Duration::from_millis(100);
                }
                backoff = backoff.min(most);
                warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "config stream failed");
                attempt += 1;
            }
        }
        let jitter = Duration::from_millis(fastrand::u64(0..=backoff.as_millis() as u64 / 4 + 1));
        tokio::select! {
            _ = tokio::time::sleep(backoff + jitter) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(most);
    }
}

/// The most one update (all its chunks) may take: far above any fleet's
/// (a full BGP table of ASN prefixes is about 13 MB), and a bound on what a
/// broken or hostile server can make a node buffer.
const MAX_UPDATE_BYTES: usize = 256 * 1024 * 1024;

/// Why a stream session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("control plane refused or ended the stream: {0}")]
    Status(#[from] tonic::Status),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("version {version} could not be applied here: {reason}")]
    Local { version: u64, reason: String },
}

/// The URLs of a comma-separated list (at least one entry).
pub fn control_plane_urls(list: &str) -> Vec<String> {
    let urls: Vec<String> = list
        .split(',')
        .map(|u| u.trim().to_owned())
        .filter(|u| !u.is_empty())
        .collect();
    if urls.is_empty() {
        vec![list.to_owned()]
    } else {
        urls
    }
}

async fn follow<B: Build>(
    opts: &Options,
    url: &str,
    builder: &Arc<B>,
    out: &watch::Sender<Option<Arc<Applied<B::Output>>>>,
    held: &mut Option<Held>,
) -> Result<(), SessionError> {
    let connect_err = |reason: String| SessionError::Connect {
        url: url.to_owned(),
        reason,
    };
    let channel = sextant_tls::control_plane_endpoint(url, opts.tls.as_ref())
        .map_err(|e| connect_err(e.to_string()))?
        .connect_timeout(Duration::from_secs(3))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| connect_err(e.to_string()))?;
    let (tx, rx) = mpsc::channel(8);
    let version_held = held.as_ref().map_or(0, |h| h.version);
    let digest_held = held.as_ref().map(|h| h.digest.clone()).unwrap_or_default();
    let hello = pb::SubscribeRequest {
        message: Some(pb::subscribe_request::Message::Hello(pb::Hello {
            node_id: opts.node_id.clone(),
            kind: opts.kind.into(),
            site: opts.site.clone(),
            version_held,
            software: format!("sextant {}", env!("CARGO_PKG_VERSION")),
            digest_held,
        })),
    };
    tx.send(hello)
        .await
        .map_err(|_| SessionError::Protocol("request channel closed".into()))?;
    let mut inbound = DistributionServiceClient::new(channel)
        .max_decoding_message_size(8 * 1024 * 1024)
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    info!(control_plane = %url, version_held, "subscribed");
    let mut pending: Vec<pb::ConfigUpdate> = Vec::new();
    let mut pending_bytes = 0usize;
    while let Some(update) = inbound.message().await? {
        pending_bytes += update.encoded_len();
        if pending_bytes > MAX_UPDATE_BYTES {
            return Err(SessionError::Protocol(format!(
                "update {} is over {MAX_UPDATE_BYTES} bytes",
                update.version
            )));
        }
        if let Some(first) = pending.first() {
            if first.nonce != update.nonce || first.version != update.version {
                return Err(SessionError::Protocol(format!(
                    "update {} interleaved with the chunks of update {}",
                    update.version, first.version
                )));
            }
        }
        if update.chunk_index as usize != pending.len() {
            return Err(SessionError::Protocol(format!(
                "chunk {} of version {} arrived as chunk {}",
                update.chunk_index,
                update.version,
                pending.len()
            )));
        }
        let last = update.last;
        pending.push(update);
        if !last {
            continue;
        }
        let mut chunks = std::mem::take(&mut pending);
        pending_bytes = 0;
        // A server may send the config already encoded.
        for c in &mut chunks {
            if !c.config_bytes.is_empty() {
                let decoded = pb::NodeConfig::decode(c.config_bytes.as_ref()).map_err(|e| {
                    SessionError::Protocol(format!(
                        "version {}: config_bytes do not decode: {e}",
                        c.version
                    ))
                })?;
                c.config = Some(decoded);
                c.config_bytes = Default::default();
            }
        }
        let (version, nonce, full, base, digest) = {
            let c = &chunks[0];
            (
                c.version,
                c.nonce.clone(),
                c.full,
                c.base_version,
                c.digest.clone(),
            )
        };
        let reply = |accepted: Result<(), String>| pb::SubscribeRequest {
            message: Some(match accepted {
                Ok(()) => pb::subscribe_request::Message::Ack(pb::Ack {
                    version,
                    nonce: nonce.clone(),
                }),
                Err(reason) => pb::subscribe_request::Message::Nack(pb::Nack {
                    version,
                    nonce: nonce.clone(),
                    reason,
                }),
            }),
        };
        let mut state = match (full, held.as_ref()) {
            (true, _) => State::default(),
            (false, Some(h)) if h.version == base => h.state.clone(),
            (false, h) => {
                let reason = format!(
                    "delta on version {base}, but this node holds {}",
                    h.map_or(0, |h| h.version)
                );
                let _ = tx.send(reply(Err(reason.clone()))).await;
                // Forget what we hold so the next session starts from a snapshot.
                *held = None;
                return Err(SessionError::Protocol(reason));
            }
        };
        for c in &chunks {
            state.apply(c);
        }
        let config = state.to_config();
        // Building (DNS tables over a whole RIB take seconds) and the fsync
        // run off the event loop, which also carries the load reports.
        let work = {
            let (builder, dir, node) =
                (builder.clone(), opts.data_dir.clone(), opts.node_id.clone());
            let (kind, digest) = (opts.kind, digest.clone());
            tokio::task::spawn_blocking(move || {
                let value = builder.build(version, &config)?;
                let at = now_ms();
                let stored = store(&dir, (&node, kind), (version, &digest), &config, at);
                Ok::<_, String>((value, at, stored))
            })
        };
        let done = work.await.map_err(|e| {
            SessionError::Protocol(format!("applying version {version} failed: {e}"))
        })?;
        let verdict = match done {
            Ok((value, at, stored)) => {
                if let Err(e) = stored {
                    // Serving it without persisting would break static
                    // stability after a restart: refuse it. The failure is
                    // this node's, not the config's: the session ends and
                    // the next one (after a backoff) gets the version again.
                    let reason = format!("cannot persist the config: {e}");
                    warn!(version, reason = %reason, "config not applied; asking again after a backoff");
                    let _ = tx.send(reply(Err(reason.clone()))).await;
                    // The request side ends after the NACK, and the server
                    // ends the stream once it has read both: the NACK is
                    // not lost with a cancelled call.
                    drop(tx);
                    let drained = async { while let Ok(Some(_)) = inbound.message().await {} };
                    let _ = tokio::time::timeout(Duration::from_secs(5), drained).await;
                    return Err(SessionError::Local { version, reason });
                } else {
                    out.send_replace(Some(Arc::new(Applied {
                        version,
                        value,
                        accepted_at_ms: at,
                        from_disk: false,
                    })));
                    *held = Some(Held {
                        version,
                        digest,
                        state,
                    });
                    info!(version, full, "config applied");
                    Ok(())
                }
            }
            Err(reason) => {
                warn!(version, reason = %reason, "config rejected; keeping the previous one");
                Err(reason)
            }
        };
        debug!(version, ok = verdict.is_ok(), "answering");
        tx.send(reply(verdict))
            .await
            .map_err(|_| SessionError::Protocol("request channel closed".into()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_apply_by_id() {
        let mut s = State::from_config(&pb::NodeConfig {
            origins: vec![
                pb::OriginTarget {
                    id: "a".into(),
                    endpoints: vec!["127.0.0.1:1".into()],
                },
                pb::OriginTarget {
                    id: "b".into(),
                    endpoints: vec!["127.0.0.1:2".into()],
                },
            ],
            upstream: vec![pb::OriginWeight {
                origin: "a".into(),
                weight: 1.0,
            }],
            ..pb::NodeConfig::default()
        });
        s.apply(&pb::ConfigUpdate {
            removed_origins: vec!["b".into()],
            config: Some(pb::NodeConfig {
                origins: vec![pb::OriginTarget {
                    id: "c".into(),
                    endpoints: vec!["127.0.0.1:3".into()],
                }],
                ..pb::NodeConfig::default()
            }),
            ..pb::ConfigUpdate::default()
        });
        let ids: Vec<&str> = s.origins.keys().map(String::as_str).collect();
        assert_eq!(ids, ["a", "c"]);
        assert_eq!(s.upstream.len(), 1, "an update without upstream keeps it");
        s.apply(&pb::ConfigUpdate {
            removed_upstream: true,
            ..pb::ConfigUpdate::default()
        });
        assert!(s.upstream.is_empty());
    }

    #[test]
    fn the_last_good_config_persists_atomically() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(load(dir.path()).expect("load").is_none());
        let c = pb::NodeConfig {
            upstream: vec![pb::OriginWeight {
                origin: "a".into(),
                weight: 1.0,
            }],
            ..pb::NodeConfig::default()
        };
        store(dir.path(), ("e1", pb::NodeKind::Proxy), (7, "d7"), &c, 1234).expect("store");
        let p = load(dir.path()).expect("load").expect("some");
        assert_eq!(
            (p.version, p.accepted_at_ms, p.digest.as_str()),
            (7, 1234, "d7")
        );
        assert_eq!(p.config.as_ref(), Some(&c));
        // Only its own node takes it.
        assert_eq!(p.foreign("e1", pb::NodeKind::Proxy), None);
        let other = p
            .foreign("e2", pb::NodeKind::Proxy)
            .expect("another node's");
        assert!(
            other.contains("\"e1\"") && other.contains("\"e2\""),
            "{other}"
        );
        assert!(p.foreign("e1", pb::NodeKind::Dns).is_some());
        // A file from before owners were kept is taken.
        let legacy = Persisted {
            node_id: String::new(),
            ..p
        };
        assert_eq!(legacy.foreign("e9", pb::NodeKind::Dns), None);
        std::fs::write(config_path(dir.path()), b"\xff\xff garbage").expect("write");
        assert!(matches!(load(dir.path()), Err(PersistError::Decode { .. })));
    }
}
