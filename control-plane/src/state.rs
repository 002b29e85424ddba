//! How Sextant's state is laid out in the store, and how it is read and
//! committed.
//!
//! Layout (every key carries the schema version `v1`):
//!
//! ```text
//! /sextant/v1/fleet/current               {generation, chunks}
//! /sextant/v1/fleet/g/<gen:020>/<i:06>    chunk i of the fleet spec (JSON)
//! /sextant/v1/drains/<domain path>        one drain (JSON)
//! /sextant/v1/routing/current             {meta, chunks} of the current table
//! /sextant/v1/routing/meta/<ver:020>      meta of each kept version
//! /sextant/v1/routing/v/<ver:020>/<i:06>  chunk i of a kept version (JSON)
//! /sextant/v1/audit/seq                   the last audit sequence number
//! /sextant/v1/audit/r/<seq:020>           one audit record (JSON)
//! /sextant/v1/drills/<id>                 one drill and its timeline (JSON)
//! /sextant/v1/bgp/rib/current             {meta, chunks} of the loaded RIB map
//! /sextant/v1/bgp/rib/g/<gen:020>/<i:06>  chunk i of its binary form
//! ```
//!
//! Large values (a fleet or routing table of 10,000 groups is several MB)
//! are split into chunks of at most [`CHUNK_BYTES`], each written in its own
//! transaction under a key no reader looks at yet; then one final
//! transaction flips the pointers, writes drains and audit records, and
//! deletes versions that fell out of the kept window. This keeps every
//! request under etcd's 1.5 MiB limit and every transaction far below its
//! 128 operations, and makes the commit atomic: readers see the old state or
//! the new one. The final transaction compares the routing pointer's
//! `mod_revision`, so a writer that lost track of the store (another leader)
//! fails instead of overwriting.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sextant_bgp::rib::RibMap;
use sextant_core::drain::Drain;
use sextant_core::routing::{Routing, RoutingMeta, RoutingTable};
use sextant_core::{ConfigVersion, DomainPath, DrainSet, Fleet, FleetSpec};
use sextant_store::{Compare, Revision, Store, StoreError, Txn, TxnOp};

use crate::audit::AuditRecord;
use tracing::debug;

/// Root of every key.
pub const ROOT: &str = "/sextant/v1/";
/// Largest chunk written in one request.
pub const CHUNK_BYTES: usize = 512 * 1024;
/// Routing versions kept (for `routes --version`, rollback and deltas).
pub const KEEP_VERSIONS: u64 = 20;
/// Fleet generations kept.
pub const KEEP_GENERATIONS: u64 = 5;

const FLEET_CURRENT: &str = "/sextant/v1/fleet/current";
const ROUTING_CURRENT: &str = "/sextant/v1/routing/current";
const AUDIT_SEQ: &str = "/sextant/v1/audit/seq";
const DRAINS: &str = "/sextant/v1/drains/";
const ROUTING_META: &str = "/sextant/v1/routing/meta/";
const AUDIT_RECORDS: &str = "/sextant/v1/audit/r/";
/// Bearer tokens by id (their secrets' hashes, never the secrets).
const TOKENS: &str = "/sextant/v1/tokens/";
const DRILLS: &str = "/sextant/v1/drills/";
const RIB_CURRENT: &str = "/sextant/v1/bgp/rib/current";
/// RIB generations kept (the current one and the one before).
pub const KEEP_RIBS: u64 = 2;

fn rib_chunks(generation: u64) -> String {
    format!("/sextant/v1/bgp/rib/g/{generation:020}/")
}

fn fleet_chunks(generation: u64) -> String {
    format!("/sextant/v1/fleet/g/{generation:020}/")
}

fn routing_chunks(version: u64) -> String {
    format!("/sextant/v1/routing/v/{version:020}/")
}

fn routing_meta(version: u64) -> String {
    format!("{ROUTING_META}{version:020}")
}

/// Errors reading or writing state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stored value at {key} cannot be read: {source}")]
    Decode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "stored {what} is incomplete: expected {expected} chunks under {prefix}, found {found}"
    )]
    MissingChunks {
        what: &'static str,
        prefix: String,
        expected: usize,
        found: usize,
    },
    #[error("stored fleet generation {generation} is no longer valid: {source}")]
    InvalidStoredFleet {
        generation: u64,
        #[source]
        source: sextant_core::fleet::FleetError,
    },
    #[error("the store was changed by another writer (expected routing pointer at revision {expected}); re-read and retry")]
    Conflict { expected: Revision },
    #[error("stored RIB map generation {generation} cannot be read: {source}")]
    InvalidStoredRib {
        generation: u64,
        #[source]
        source: sextant_bgp::rib::CodecError,
    },
    #[error("cannot encode {what}: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("the state changed during each of {0} reads; try again")]
    Busy(usize),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct FleetPointer {
    generation: u64,
    chunks: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RoutingPointer {
    meta: RoutingMeta,
    chunks: usize,
}

/// What is known of a loaded RIB map besides its routes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RibMeta {
    pub generation: u64,
    /// Where the dump came from (a file name).
    pub source: String,
    pub loaded_at_ms: i64,
    pub loaded_by: String,
    pub entries: u64,
    pub skipped: u64,
    pub multi_origin: u64,
    pub other_records: u64,
    pub digest: String,
    /// A digest of the dump's bytes: loading the same file again is
    /// answered without decoding it.
    #[serde(default)]
    pub dump_digest: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RibPointer {
    meta: RibMeta,
    chunks: usize,
}

/// A loaded RIB map and what is known of it.
#[derive(Debug, Clone)]
pub struct LoadedRib {
    pub meta: RibMeta,
    pub map: Arc<RibMap>,
}

/// Everything the control loop owns, as last committed.
#[derive(Debug, Clone, Default)]
pub struct State {
    pub fleet: Option<Arc<Fleet>>,
    pub fleet_generation: u64,
    pub drains: DrainSet,
    /// Every drill, running or past, by id.
    pub drills: std::collections::BTreeMap<String, sextant_core::drill::Drill>,
    pub table: Option<Arc<RoutingTable>>,
    /// The latest routing version (0: none yet).
    pub version: ConfigVersion,
    /// Last audit sequence number written.
    pub audit_seq: u64,
    /// mod_revision of the routing pointer (0: absent); the commit guard.
    pub routing_rev: Revision,
    /// The prefix → origin ASN map, once one is loaded.
    pub rib: Option<LoadedRib>,
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StateError> {
    crate::blocking::heavy(|| serde_json::from_slice(bytes)).map_err(|source| StateError::Decode {
        key: key.to_owned(),
        source,
    })
}

fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, StateError> {
    crate::blocking::heavy(|| serde_json::to_vec(value))
        .map_err(|source| StateError::Encode { what, source })
}

async fn read_chunks(
    store: &dyn Store,
    what: &'static str,
    prefix: &str,
    expected: usize,
) -> Result<Vec<u8>, StateError> {
    let resp = store.get_prefix(prefix).await?;
    if resp.kvs.len() != expected {
        return Err(StateError::MissingChunks {
            what,
            prefix: prefix.to_owned(),
            expected,
            found: resp.kvs.len(),
        });
    }
    Ok(resp.kvs.into_iter().flat_map(|kv| kv.value).collect())
}

async fn write_chunks(store: &dyn Store, prefix: &str, bytes: &[u8]) -> Result<usize, StateError> {
    // Clear what a crashed earlier attempt may have left under this prefix.
    store
        .txn(Txn::new().and_then([TxnOp::DeletePrefix {
            prefix: prefix.to_owned(),
        }]))
        .await?;
    let mut n = 0;
    for chunk in bytes.chunks(CHUNK_BYTES) {
        store
            .put(&format!("{prefix}{n:06}"), chunk.to_vec())
            .await?;
        n += 1;
    }
    Ok(n)
}

/// Reads the committed state.
pub async fn load(store: &dyn Store) -> Result<State, StateError> {
    load_since(store, None).await
}

/// Reads the committed state, reusing the fleet and routing table of `prev`
/// when they have not changed (a follower reloads on every commit; a fleet
/// of 10,000 groups is worth not parsing again).
///
/// The keys are read one by one, so a commit landing in between would give
/// a fleet of one revision with the routing table of another (a replica
/// would then serve a version number with the wrong content). Every change
/// of the fleet or the drains commits a routing table with it, so the
/// routing pointer's revision is read before and after everything else,
/// and the read is made again while it has moved.
pub async fn load_since(store: &dyn Store, prev: Option<&State>) -> Result<State, StateError> {
    let mut before = routing_rev(store).await?;
    for _ in 0..TORN_READ_RETRIES {
        let state = load_once(store, prev).await?;
        let after = routing_rev(store).await?;
        if state.routing_rev == before && after == before {
            return Ok(state);
        }
        debug!(
            before,
            after, "a commit landed while the state was read: reading again"
        );
        before = after;
    }
    Err(StateError::Busy(TORN_READ_RETRIES))
}

/// The routing version committed in the store (0: none yet).
pub async fn committed_version(store: &dyn Store) -> Result<u64, StateError> {
    match store.get(ROUTING_CURRENT).await?.kvs.first() {
        Some(kv) => Ok(decode::<RoutingPointer>(ROUTING_CURRENT, &kv.value)?
            .meta
            .version
            .0),
        None => Ok(0),
    }
}

/// The routing pointer's revision (0: none yet).
async fn routing_rev(store: &dyn Store) -> Result<Revision, StateError> {
    Ok(store
        .get(ROUTING_CURRENT)
        .await?
        .kvs
        .first()
        .map_or(0, |kv| kv.mod_revision))
}

/// How many times [`load_since`] reads the state while commits keep
/// landing during the read.
const TORN_READ_RETRIES: usize = 20;

/// One read of the committed state (see [`load_since`]).
async fn load_once(store: &dyn Store, prev: Option<&State>) -> Result<State, StateError> {
    let mut state = State::default();

    if let Some(kv) = store.get(FLEET_CURRENT).await?.kvs.into_iter().next() {
        let ptr: FleetPointer = decode(FLEET_CURRENT, &kv.value)?;
        if let Some(p) = prev.filter(|p| p.fleet.is_some() && p.fleet_generation == ptr.generation)
        {
            state.fleet = p.fleet.clone();
            state.fleet_generation = ptr.generation;
        } else {
            let prefix = fleet_chunks(ptr.generation);
            let bytes = read_chunks(store, "fleet", &prefix, ptr.chunks).await?;
            let spec: FleetSpec = decode(&prefix, &bytes)?;
            let fleet = crate::blocking::heavy(|| Fleet::from_spec(spec)).map_err(|source| {
                StateError::InvalidStoredFleet {
                    generation: ptr.generation,
                    source,
                }
            })?;
            state.fleet = Some(Arc::new(fleet));
            state.fleet_generation = ptr.generation;
        }
    }

    for kv in store.get_prefix(DRAINS).await?.kvs {
        let drain: Drain = decode(&kv.key, &kv.value)?;
        state.drains.insert(drain);
    }

    for kv in store.get_prefix(DRILLS).await?.kvs {
        let drill: sextant_core::drill::Drill = decode(&kv.key, &kv.value)?;
        state.drills.insert(drill.id.clone(), drill);
    }

    if let Some(kv) = store.get(ROUTING_CURRENT).await?.kvs.into_iter().next() {
        let ptr: RoutingPointer = decode(ROUTING_CURRENT, &kv.value)?;
        state.version = ptr.meta.version;
        state.routing_rev = kv.mod_revision;
        let kept = prev
            .and_then(|p| p.table.clone())
            .filter(|t| t.meta.version == ptr.meta.version);
        state.table = match kept {
            Some(t) => Some(t),
            None => {
                let routing = read_routing(store, ptr.meta.version.0, ptr.chunks).await?;
                Some(Arc::new(RoutingTable {
                    meta: ptr.meta,
                    routing,
                }))
            }
        };
    }

    if let Some(kv) = store.get(RIB_CURRENT).await?.kvs.into_iter().next() {
        let ptr: RibPointer = decode(RIB_CURRENT, &kv.value)?;
        let kept = prev
            .and_then(|p| p.rib.clone())
            .filter(|r| r.meta.generation == ptr.meta.generation);
        state.rib = match kept {
            Some(r) => Some(r),
            None => {
                let generation = ptr.meta.generation;
                let prefix = rib_chunks(generation);
                let bytes = read_chunks(store, "RIB map", &prefix, ptr.chunks).await?;
                let map = crate::blocking::heavy(|| RibMap::decode(&bytes))
                    .map_err(|source| StateError::InvalidStoredRib { generation, source })?;
                Some(LoadedRib {
                    meta: ptr.meta,
                    map: Arc::new(map),
                })
            }
        };
    }

    if let Some(kv) = store.get(AUDIT_SEQ).await?.kvs.into_iter().next() {
        state.audit_seq = decode(AUDIT_SEQ, &kv.value)?;
    }
    Ok(state)
}

async fn read_routing(
    store: &dyn Store,
    version: u64,
    chunks: usize,
) -> Result<Routing, StateError> {
    let prefix = routing_chunks(version);
    let bytes = read_chunks(store, "routing table", &prefix, chunks).await?;
    decode(&prefix, &bytes)
}

/// Reads a kept routing version, if it is still kept.
pub async fn load_version(
    store: &dyn Store,
    version: u64,
) -> Result<Option<RoutingTable>, StateError> {
    let key = routing_meta(version);
    let Some(kv) = store.get(&key).await?.kvs.into_iter().next() else {
        return Ok(None);
    };
    let ptr: RoutingPointer = decode(&key, &kv.value)?;
    let routing = read_routing(store, version, ptr.chunks).await?;
    Ok(Some(RoutingTable {
        meta: ptr.meta,
        routing,
    }))
}

/// Metas of the kept routing versions, newest first.
pub async fn list_versions(store: &dyn Store) -> Result<Vec<RoutingMeta>, StateError> {
    let mut out = Vec::new();
    for kv in store.get_prefix(ROUTING_META).await?.kvs {
        let ptr: RoutingPointer = decode(&kv.key, &kv.value)?;
        out.push(ptr.meta);
    }
    out.reverse();
    Ok(out)
}

/// Reads the audit log, oldest first.
pub async fn load_audit(store: &dyn Store) -> Result<Vec<AuditRecord>, StateError> {
    store
        .get_prefix(AUDIT_RECORDS)
        .await?
        .kvs
        .into_iter()
        .map(|kv| decode(&kv.key, &kv.value))
        .collect()
}

/// One change of state, committed atomically.
#[derive(Debug, Default)]
pub struct Commit {
    /// A new fleet spec and its generation.
    pub fleet: Option<(FleetSpec, u64)>,
    pub put_drains: Vec<Drain>,
    pub delete_drains: Vec<DomainPath>,
    pub put_drills: Vec<sextant_core::drill::Drill>,
    /// The new routing table (its version must be the next one).
    pub table: Option<RoutingTable>,
    /// Audit records (their seq numbers must follow the state's).
    pub audit: Vec<AuditRecord>,
    /// A new RIB map (its generation must be the next one).
    pub rib: Option<LoadedRib>,
    /// Tokens created or revoked.
    pub put_tokens: Vec<crate::auth::StoredToken>,
}

/// The key of a stored token.
pub fn token_key(id: &str) -> String {
    format!("{TOKENS}{id}")
}

/// One stored token by id.
pub async fn load_token(
    store: &dyn Store,
    id: &str,
) -> Result<Option<crate::auth::StoredToken>, StateError> {
    let key = token_key(id);
    match store.get(&key).await?.kvs.into_iter().next() {
        Some(kv) => Ok(Some(decode(&key, &kv.value)?)),
        None => Ok(None),
    }
}

/// Every stored token, by id.
pub async fn list_tokens(store: &dyn Store) -> Result<Vec<crate::auth::StoredToken>, StateError> {
    store
        .get_prefix(TOKENS)
        .await?
        .kvs
        .iter()
        .map(|kv| decode(&kv.key, &kv.value))
        .collect()
}

/// Writes a commit on top of `state`; returns the new pointer revision.
/// Fails with [`StateError::Conflict`] if someone else wrote the routing
/// pointer since `state` was read; nothing visible changes then.
pub async fn commit(store: &dyn Store, state: &State, c: &Commit) -> Result<Revision, StateError> {
    let mut ops = Vec::new();
    if let Some((spec, generation)) = &c.fleet {
        let prefix = fleet_chunks(*generation);
        let chunks = write_chunks(store, &prefix, &encode("fleet", spec)?).await?;
        ops.push(TxnOp::put(
            FLEET_CURRENT,
            encode(
                "fleet pointer",
                &FleetPointer {
                    generation: *generation,
                    chunks,
                },
            )?,
        ));
        if *generation > KEEP_GENERATIONS {
            ops.push(TxnOp::DeletePrefix {
                prefix: fleet_chunks(generation - KEEP_GENERATIONS),
            });
        }
    }
    if let Some(table) = &c.table {
        let version = table.meta.version.0;
        let prefix = routing_chunks(version);
        let chunks =
            write_chunks(store, &prefix, &encode("routing table", &table.routing)?).await?;
        let ptr = encode(
            "routing pointer",
            &RoutingPointer {
                meta: table.meta.clone(),
                chunks,
            },
        )?;
        ops.push(TxnOp::put(ROUTING_CURRENT, ptr.clone()));
        ops.push(TxnOp::put(routing_meta(version), ptr));
        if version > KEEP_VERSIONS {
            let old = version - KEEP_VERSIONS;
            ops.push(TxnOp::delete(routing_meta(old)));
            ops.push(TxnOp::DeletePrefix {
                prefix: routing_chunks(old),
            });
        }
    }
    if let Some(rib) = &c.rib {
        let generation = rib.meta.generation;
        let prefix = rib_chunks(generation);
        let bytes = crate::blocking::heavy(|| rib.map.encode());
        let chunks = write_chunks(store, &prefix, &bytes).await?;
        ops.push(TxnOp::put(
            RIB_CURRENT,
            encode(
                "RIB pointer",
                &RibPointer {
                    meta: rib.meta.clone(),
                    chunks,
                },
            )?,
        ));
        if generation > KEEP_RIBS {
            ops.push(TxnOp::DeletePrefix {
                prefix: rib_chunks(generation - KEEP_RIBS),
            });
        }
    }
    for d in &c.put_drains {
        ops.push(TxnOp::put(
            format!("{DRAINS}{}", d.domain),
            encode("drain", d)?,
        ));
    }
    for d in &c.delete_drains {
        ops.push(TxnOp::delete(format!("{DRAINS}{d}")));
    }
    for t in &c.put_tokens {
        ops.push(TxnOp::put(format!("{TOKENS}{}", t.id), encode("token", t)?));
    }
    for d in &c.put_drills {
        ops.push(TxnOp::put(format!("{DRILLS}{}", d.id), encode("drill", d)?));
    }
    if let Some(last) = c.audit.last() {
        for r in &c.audit {
            ops.push(TxnOp::put(
                format!("{AUDIT_RECORDS}{:020}", r.seq),
                encode("audit record", r)?,
            ));
        }
        ops.push(TxnOp::put(AUDIT_SEQ, encode("audit seq", &last.seq)?));
    }
    let resp = store
        .txn(
            Txn::new()
                .when([Compare::mod_revision(ROUTING_CURRENT, state.routing_rev)])
                .and_then(ops)
                .or_else([TxnOp::Get {
                    key: ROUTING_CURRENT.to_owned(),
                }]),
        )
        .await?;
    if !resp.succeeded {
        return Err(StateError::Conflict {
            expected: state.routing_rev,
        });
    }
    if c.table.is_some() {
        Ok(resp.revision)
    } else {
        Ok(state.routing_rev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    use sextant_store::{GetResponse, Lease, LeaseId, StoreStatus, TxnResponse, WatchStream};

    /// A store in which one commit lands in the middle of the next read of
    /// the state: just before the key (or prefix) `at` is read.
    struct Interrupted {
        inner: Arc<dyn Store>,
        at: &'static str,
        commit: Mutex<Option<(State, Commit)>>,
    }

    impl Interrupted {
        async fn maybe_commit(&self, key: &str) {
            if key != self.at {
                return;
            }
            let pending = self.commit.lock().expect("lock").take();
            if let Some((state, c)) = pending {
                commit(self.inner.as_ref(), &state, &c)
                    .await
                    .expect("the interrupting commit");
            }
        }
    }

    #[async_trait::async_trait]
    impl Store for Interrupted {
        async fn get(&self, key: &str) -> Result<GetResponse, StoreError> {
            self.maybe_commit(key).await;
            self.inner.get(key).await
        }
        async fn get_prefix(&self, prefix: &str) -> Result<GetResponse, StoreError> {
            self.maybe_commit(prefix).await;
            self.inner.get_prefix(prefix).await
        }
        async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
            self.inner.txn(txn).await
        }
        async fn watch(&self, prefix: &str, start: Revision) -> Result<WatchStream, StoreError> {
            self.inner.watch(prefix, start).await
        }
        async fn lease_grant(&self, ttl: std::time::Duration) -> Result<Lease, StoreError> {
            self.inner.lease_grant(ttl).await
        }
        async fn lease_keep_alive(&self, id: LeaseId) -> Result<std::time::Duration, StoreError> {
            self.inner.lease_keep_alive(id).await
        }
        async fn lease_revoke(&self, id: LeaseId) -> Result<(), StoreError> {
            self.inner.lease_revoke(id).await
        }
        async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
            self.inner.compact(revision).await
        }
        async fn status(&self) -> Result<StoreStatus, StoreError> {
            self.inner.status().await
        }
    }

    fn table(version: u64, fleet_generation: u64) -> RoutingTable {
        RoutingTable {
            meta: RoutingMeta {
                version: ConfigVersion(version),
                computed_at_ms: 0,
                fleet_generation,
                cause: String::new(),
                churn: 0.0,
            },
            routing: Routing::default(),
        }
    }

    #[tokio::test]
    async fn a_commit_during_a_read_never_gives_a_torn_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let inner: Arc<dyn Store> =
            Arc::new(sextant_store::embedded::EmbeddedStore::open(dir.path()).expect("open"));
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/examples/fleet.toml"
        ))
        .expect("example fleet");
        let spec = FleetSpec::from_toml(&text).expect("fleet");
        let first = Commit {
            fleet: Some((spec.clone(), 1)),
            table: Some(table(1, 1)),
            ..Commit::default()
        };
        commit(inner.as_ref(), &State::default(), &first)
            .await
            .expect("commit");
        let held = load(inner.as_ref()).await.expect("load");
        assert_eq!((held.version.0, held.fleet_generation), (1, 1));
        // The next fleet and its routing land while a follower reads.
        let mut next = spec;
        next.edges[0].capacity_rps = 12_345.0;
        let edge = next.edges[0].id.clone();
        let second = Commit {
            fleet: Some((next, 2)),
            table: Some(table(2, 2)),
            ..Commit::default()
        };
        let store = Interrupted {
            inner: inner.clone(),
            at: DRAINS,
            commit: Mutex::new(Some((held.clone(), second))),
        };
        let read = load_since(&store, Some(&held)).await.expect("load");
        let meta = &read.table.as_ref().expect("a table").meta;
        assert_eq!(
            (read.version.0, read.fleet_generation, meta.fleet_generation),
            (2, 2, 2),
            "the fleet and the routing of one commit"
        );
        let capacity = read
            .fleet
            .as_ref()
            .and_then(|f| f.edges.values().find(|e| e.id.as_str() == edge))
            .map(|e| e.capacity_rps);
        assert_eq!(capacity, Some(12_345.0));

        // A RIB loaded (with its routing) right after the routing pointer
        // was read.
        let third = Commit {
            table: Some(table(3, 2)),
            rib: Some(rib(1)),
            ..Commit::default()
        };
        let store = Interrupted {
            inner,
            at: RIB_CURRENT,
            commit: Mutex::new(Some((read.clone(), third))),
        };
        let read = load_since(&store, Some(&read)).await.expect("load");
        assert_eq!(
            (read.version.0, read.rib.as_ref().map(|r| r.meta.generation)),
            (3, Some(1)),
            "the routing and the RIB of one commit"
        );
    }

    fn rib(generation: u64) -> LoadedRib {
        LoadedRib {
            meta: RibMeta {
                generation,
                source: format!("dump-{generation}"),
                ..RibMeta::default()
            },
            map: Arc::new(RibMap::from_routes(Vec::new()).expect("empty RIB")),
        }
    }
}
