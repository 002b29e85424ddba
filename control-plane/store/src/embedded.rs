//! The embedded store: Sextant's default, single-node [`Store`], persisted in
//! a data directory.
//!
//! # Why redb
//!
//! The data lives in one [redb](https://docs.rs/redb) file,
//! `<dir>/sextant-store.redb`. redb is a pure-Rust embedded key-value store:
//!
//! - **pure Rust, no C build**: no RocksDB/LMDB toolchain, cross-compiles like
//!   the rest of the workspace;
//! - **ACID with fsync'd commits**: a commit returns once it is durable
//!   (`Durability::Immediate`, redb's default), and a crash leaves the last
//!   committed state, never half a transaction. Every store transaction (its
//!   keys, its watch-history entry, the revision counter, lease attachments)
//!   is one redb transaction, so they cannot disagree after a crash;
//! - **a single file** in the data directory, simple to back up, and locked
//!   while open, so a second process (or a second [`EmbeddedStore`] in this
//!   one) opening the same directory is refused instead of corrupting it;
//! - **MVCC readers**: reads and watch replays use read transactions that see
//!   a consistent snapshot and never wait for the writer.
//!
//! # Layout
//!
//! | table        | key              | value                                   |
//! |--------------|------------------|-----------------------------------------|
//! | `kv`         | key              | value, create/mod revision, version, lease |
//! | `history`    | revision         | the events of that revision             |
//! | `meta`       | name             | revision, compact revision, next lease id, format |
//! | `leases`     | lease id         | TTL in seconds                          |
//! | `lease_keys` | lease id (multi) | attached keys                           |
//!
//! The history keeps the last [`EmbeddedOptions::history_retention`]
//! revisions; older ones are compacted automatically as new ones are written.
//!
//! # Concurrency
//!
//! Writes (transactions, lease changes, compaction) are serialised by one
//! mutex, held while the redb write transaction commits and while its events
//! are handed to watchers, so watchers see every revision in order. A watch
//! registers itself and opens its history snapshot under that same mutex, so
//! the replayed history and the live events meet without gap or duplicate.
//! All redb work runs on tokio's blocking pool (`spawn_blocking`), never on a
//! runtime worker thread. Watchers get a bounded channel; a watcher that lets
//! it fill up is cancelled with [`StoreError::WatchLagged`] instead of
//! blocking writers or buffering without bound.
//!
//! Lease deadlines are kept in memory: a lease's TTL is persisted, and on
//! reopen its deadline restarts at now + TTL, as etcd does after a leader
//! change. Expiry is driven by a background thread (it does blocking redb
//! work, and is joined when the store is dropped so that the file is closed
//! by then); it checks every [`EmbeddedOptions::lease_check_interval`].
//!
//! # Semantics beyond the trait's docs (as etcd)
//!
//! - A branch may not put a key twice, nor put a key it also deletes
//!   ([`StoreError::InvalidArgument`], etcd's "duplicate key").
//! - Lease checks apply to the branch that runs: a put with a lease that does
//!   not exist (or whose deadline has passed) fails the whole transaction
//!   with [`StoreError::LeaseNotFound`]. A put without a lease detaches the
//!   key from its previous lease.
//! - An empty prefix matches every key. Empty keys are invalid, as is a zero
//!   TTL.
//! - Compacting to a revision already compacted is a no-op (etcd answers
//!   "already compacted"); compaction never moves the revision.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use redb::{
    Database, MultimapTable, MultimapTableDefinition, ReadableDatabase, ReadableMultimapTable,
    ReadableTable, Table, TableDefinition, WriteTransaction,
};
use tokio::sync::mpsc;

use crate::{
    Compare, CompareOp, CompareTarget, EventKind, GetResponse, KeyValue, Lease, LeaseId,
    OpResponse, Revision, Store, StoreError, StoreStatus, Txn, TxnOp, TxnResponse, WatchBatch,
    WatchEvent, WatchStream,
};

mod codec;

/// Name of the database file inside the data directory.
pub const DB_FILE_NAME: &str = "sextant-store.redb";

/// Version of the on-disk layout, stored in `meta`.
const FORMAT_VERSION: i64 = 1;

/// The longest lease TTL accepted (etcd's `MaxLeaseTTL`).
const MAX_LEASE_TTL_SECS: u64 = 9_000_000_000;

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const HISTORY: TableDefinition<i64, &[u8]> = TableDefinition::new("history");
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
const LEASES: TableDefinition<i64, u64> = TableDefinition::new("leases");
const LEASE_KEYS: MultimapTableDefinition<i64, &str> = MultimapTableDefinition::new("lease_keys");

const META_FORMAT: &str = "format_version";
const META_REVISION: &str = "revision";
const META_COMPACT_REVISION: &str = "compact_revision";
const META_NEXT_LEASE_ID: &str = "next_lease_id";

/// Tuning of an [`EmbeddedStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddedOptions {
    /// How many revisions of watch history are kept. Older revisions are
    /// compacted automatically as new ones are written; a watch from before
    /// the kept window gets [`StoreError::Compacted`].
    pub history_retention: u64,
    /// How many revisions a watcher may have pending before it is cancelled
    /// with [`StoreError::WatchLagged`].
    pub watch_buffer: usize,
    /// How often lease deadlines are checked. Keys of an expired lease are
    /// deleted within about this long after its deadline.
    pub lease_check_interval: Duration,
    /// Size of redb's page cache, in bytes.
    pub cache_size_bytes: usize,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self {
            history_retention: 10_000,
            watch_buffer: 1024,
            lease_check_interval: Duration::from_millis(100),
            cache_size_bytes: 64 * 1024 * 1024,
        }
    }
}

/// The default [`Store`]: one node, persisted to a data directory. See the
/// module docs.
///
/// Dropping it stops lease expiry, ends every watch (with
/// [`StoreError::Unavailable`]) and closes the database file once in-flight
/// operations have finished.
pub struct EmbeddedStore {
    inner: Arc<Inner>,
    expiry: Option<ExpiryThread>,
}

impl fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("dir", &self.inner.dir)
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

struct ExpiryThread {
    shutdown: std_mpsc::Sender<()>,
    handle: JoinHandle<()>,
}

struct Inner {
    db: Database,
    dir: PathBuf,
    options: EmbeddedOptions,
    state: Mutex<State>,
}

/// What the writer keeps in memory, guarded by the write mutex.
struct State {
    /// Mirrors `meta.revision`, updated after each commit.
    revision: Revision,
    /// Mirrors `meta.compact_revision`.
    compact_revision: Revision,
    next_lease_id: LeaseId,
    leases: HashMap<LeaseId, LeaseState>,
    watchers: Vec<Watcher>,
}

struct LeaseState {
    ttl: Duration,
    deadline: Instant,
}

struct Watcher {
    prefix: String,
    /// First revision to send live (history before it was replayed).
    from: Revision,
    tx: mpsc::Sender<WatchBatch>,
    /// Set to the first revision not delivered when the watcher is cancelled
    /// for lagging.
    lagged: Arc<OnceLock<Revision>>,
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store in `dir` with default options.
    ///
    /// Blocking: it opens and may create the database file. Fails with
    /// [`StoreError::Unavailable`] if the directory is already open, by this
    /// process or another one.
    pub fn open(dir: &Path) -> Result<EmbeddedStore, StoreError> {
        Self::open_with(dir, EmbeddedOptions::default())
    }

    /// Opens (creating if needed) the store in `dir`.
    pub fn open_with(dir: &Path, options: EmbeddedOptions) -> Result<EmbeddedStore, StoreError> {
        if options.watch_buffer == 0 {
            return Err(StoreError::InvalidArgument(
                "watch_buffer must be at least 1".into(),
            ));
        }
        if options.lease_check_interval.is_zero() {
            return Err(StoreError::InvalidArgument(
                "lease_check_interval must be positive".into(),
            ));
        }
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::backend(format!("creating data directory {}", dir.display()), e)
        })?;
        let path = dir.join(DB_FILE_NAME);
        let db = redb::Builder::new()
            .set_cache_size(options.cache_size_bytes)
            .create(&path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Unavailable(format!(
                    "data directory {} is already in use by another store (in this process or \
                     another one); stop it first",
                    dir.display()
                )),
                e => StoreError::backend(format!("opening {}", path.display()), e),
            })?;
        let state = load_state(&db, Instant::now())?;
        tracing::info!(
            dir = %dir.display(),
            revision = state.revision,
            compact_revision = state.compact_revision,
            leases = state.leases.len(),
            "opened embedded store"
        );
        let inner = Arc::new(Inner {
            db,
            dir: dir.to_path_buf(),
            options,
            state: Mutex::new(state),
        });
        let expiry = spawn_expiry(&inner)?;
        Ok(EmbeddedStore {
            inner,
            expiry: Some(expiry),
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Runs `f` on tokio's blocking pool.
    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::backend("embedded store worker failed", e))?
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        if let Some(expiry) = self.expiry.take() {
            drop(expiry.shutdown);
            if expiry.handle.join().is_err() {
                tracing::error!("lease expiry thread panicked");
            }
        }
    }
}

fn spawn_expiry(inner: &Arc<Inner>) -> Result<ExpiryThread, StoreError> {
    let (shutdown, stop) = std_mpsc::channel::<()>();
    let weak: Weak<Inner> = Arc::downgrade(inner);
    let interval = inner.options.lease_check_interval;
    let span = tracing::info_span!("lease_expiry", dir = %inner.dir.display());
    let handle = std::thread::Builder::new()
        .name("sextant-store-leases".into())
        .spawn(move || {
            let _entered = span.enter();
            // Ends when the store drops the sender (or when it is gone).
            while let Err(std_mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(interval) {
                let Some(inner) = weak.upgrade() else { break };
                if let Err(e) = inner.expire_due(Instant::now()) {
                    tracing::warn!(error = %e, "lease expiry failed; will retry");
                }
            }
        })
        .map_err(|e| StoreError::backend("starting the lease expiry thread", e))?;
    Ok(ExpiryThread { shutdown, handle })
}

/// Maps any redb error to [`StoreError::Backend`] with a context.
fn db_err<E: Into<redb::Error>>(context: &'static str) -> impl FnOnce(E) -> StoreError {
    move |e| StoreError::backend(context, e.into())
}

fn decode_err(context: &'static str) -> impl FnOnce(codec::DecodeError) -> StoreError {
    move |e| StoreError::backend(context, e)
}

/// Creates the tables if needed, checks the format and loads the writer state.
fn load_state(db: &Database, now: Instant) -> Result<State, StoreError> {
    let wtx = db.begin_write().map_err(db_err("beginning a write"))?;
    let (revision, compact_revision, next_lease_id, leases) = {
        wtx.open_table(KV).map_err(db_err("opening table kv"))?;
        wtx.open_table(HISTORY)
            .map_err(db_err("opening table history"))?;
        wtx.open_multimap_table(LEASE_KEYS)
            .map_err(db_err("opening table lease_keys"))?;
        let mut meta = wtx.open_table(META).map_err(db_err("opening table meta"))?;
        match meta_get(&meta, META_FORMAT)? {
            None => {
                meta.insert(META_FORMAT, FORMAT_VERSION)
                    .map_err(db_err("writing the format version"))?;
            }
            Some(FORMAT_VERSION) => {}
            Some(other) => {
                return Err(StoreError::Unavailable(format!(
                    "the data directory holds store format {other}; this build reads format \
                     {FORMAT_VERSION}"
                )))
            }
        }
        let revision = meta_get(&meta, META_REVISION)?.unwrap_or(1);
        let compact_revision = meta_get(&meta, META_COMPACT_REVISION)?.unwrap_or(0);
        let next_lease_id = meta_get(&meta, META_NEXT_LEASE_ID)?.unwrap_or(1);
        let leases_table = wtx
            .open_table(LEASES)
            .map_err(db_err("opening table leases"))?;
        let mut leases = HashMap::new();
        for entry in leases_table.iter().map_err(db_err("reading leases"))? {
            let (id, ttl) = entry.map_err(db_err("reading leases"))?;
            let ttl = Duration::from_secs(ttl.value());
            let deadline = now.checked_add(ttl).ok_or_else(|| {
                StoreError::backend(
                    "loading leases",
                    format!("lease {} has an impossible TTL", id.value()),
                )
            })?;
            leases.insert(id.value(), LeaseState { ttl, deadline });
        }
        (revision, compact_revision, next_lease_id, leases)
    };
    wtx.commit().map_err(db_err("initialising the database"))?;
    Ok(State {
        revision,
        compact_revision,
        next_lease_id,
        leases,
        watchers: Vec::new(),
    })
}

fn meta_get(
    meta: &impl ReadableTable<&'static str, i64>,
    name: &str,
) -> Result<Option<i64>, StoreError> {
    Ok(meta
        .get(name)
        .map_err(db_err("reading store metadata"))?
        .map(|v| v.value()))
}

fn read_key(
    kv: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<KeyValue>, StoreError> {
    match kv.get(key).map_err(db_err("reading a key"))? {
        Some(record) => Ok(Some(
            codec::decode_record(key, record.value()).map_err(decode_err("decoding a key"))?,
        )),
        None => Ok(None),
    }
}

fn read_prefix(
    kv: &impl ReadableTable<&'static str, &'static [u8]>,
    prefix: &str,
) -> Result<Vec<KeyValue>, StoreError> {
    let mut out = Vec::new();
    for entry in kv.range(prefix..).map_err(db_err("reading a prefix"))? {
        let (key, record) = entry.map_err(db_err("reading a prefix"))?;
        let key = key.value();
        if !key.starts_with(prefix) {
            break;
        }
        out.push(codec::decode_record(key, record.value()).map_err(decode_err("decoding a key"))?);
    }
    Ok(out)
}

fn check_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty() {
        return Err(StoreError::InvalidArgument("key must not be empty".into()));
    }
    Ok(())
}

/// Checks keys, and that no key is written twice in one branch (etcd's
/// "duplicate key given in txn request").
fn validate_txn(txn: &Txn) -> Result<(), StoreError> {
    for compare in &txn.compare {
        check_key(&compare.key)?;
    }
    for ops in [&txn.success, &txn.failure] {
        let mut puts = HashSet::new();
        let mut deletes: Vec<(&str, bool)> = Vec::new();
        for op in ops {
            match op {
                TxnOp::Put { key, .. } => {
                    check_key(key)?;
                    if !puts.insert(key.as_str()) {
                        return Err(duplicate_key(key));
                    }
                }
                TxnOp::Delete { key } => {
                    check_key(key)?;
                    deletes.push((key, false));
                }
                TxnOp::DeletePrefix { prefix } => deletes.push((prefix, true)),
                TxnOp::Get { key } => check_key(key)?,
                TxnOp::GetPrefix { .. } => {}
            }
        }
        for put in &puts {
            let overlaps = deletes.iter().any(|&(deleted, is_prefix)| {
                if is_prefix {
                    put.starts_with(deleted)
                } else {
                    *put == deleted
                }
            });
            if overlaps {
                return Err(duplicate_key(put));
            }
        }
    }
    Ok(())
}

fn duplicate_key(key: &str) -> StoreError {
    StoreError::InvalidArgument(format!(
        "key {key:?} is written twice in one transaction branch (a key may be put or deleted \
         once per transaction)"
    ))
}

fn lease_ttl_secs(ttl: Duration) -> Result<u64, StoreError> {
    if ttl.is_zero() {
        return Err(StoreError::InvalidArgument(
            "lease TTL must be positive".into(),
        ));
    }
    let secs = ttl
        .as_secs()
        .saturating_add(u64::from(ttl.subsec_nanos() > 0));
    if secs > MAX_LEASE_TTL_SECS {
        return Err(StoreError::InvalidArgument(format!(
            "lease TTL of {secs} s is above the maximum of {MAX_LEASE_TTL_SECS} s"
        )));
    }
    Ok(secs)
}

fn deadline_after(now: Instant, ttl: Duration) -> Result<Instant, StoreError> {
    now.checked_add(ttl).ok_or_else(|| {
        StoreError::InvalidArgument(format!("lease TTL of {} s is too long", ttl.as_secs()))
    })
}

impl State {
    fn lease_alive(&self, id: LeaseId, now: Instant) -> bool {
        self.leases.get(&id).is_some_and(|l| l.deadline > now)
    }

    /// Hands one committed revision to the watchers. Never blocks: a watcher
    /// whose channel is full is cancelled.
    fn notify(&mut self, batch: &WatchBatch) {
        self.watchers.retain(|watcher| {
            if batch.revision < watcher.from {
                return !watcher.tx.is_closed();
            }
            let events: Vec<WatchEvent> = batch
                .events
                .iter()
                .filter(|e| e.kv.key.starts_with(&watcher.prefix))
                .cloned()
                .collect();
            if events.is_empty() {
                return !watcher.tx.is_closed();
            }
            match watcher.tx.try_send(WatchBatch {
                revision: batch.revision,
                events,
            }) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!(
                        prefix = %watcher.prefix,
                        resume_from = batch.revision,
                        "watcher fell behind; cancelling it"
                    );
                    // Only set here, once, before the sender is dropped.
                    let _ = watcher.lagged.set(batch.revision);
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }
}

/// The tables a store transaction changes, with the events it produced.
struct KvWriter<'t> {
    kv: Table<'t, &'static str, &'static [u8]>,
    lease_keys: MultimapTable<'t, i64, &'static str>,
    /// The revision writes are made at (current + 1).
    revision: Revision,
    events: Vec<WatchEvent>,
}

impl<'t> KvWriter<'t> {
    fn open(wtx: &'t WriteTransaction, revision: Revision) -> Result<Self, StoreError> {
        Ok(Self {
            kv: wtx.open_table(KV).map_err(db_err("opening table kv"))?,
            lease_keys: wtx
                .open_multimap_table(LEASE_KEYS)
                .map_err(db_err("opening table lease_keys"))?,
            revision,
            events: Vec::new(),
        })
    }

    fn compare(&self, compare: &Compare) -> Result<bool, StoreError> {
        let kv = read_key(&self.kv, &compare.key)?;
        let ordering = match (&compare.target, &kv) {
            // A missing key has no value: every value compare is false.
            (CompareTarget::Value(_), None) => return Ok(false),
            (CompareTarget::Value(v), Some(kv)) => kv.value.as_slice().cmp(v.as_slice()),
            (CompareTarget::Version(v), kv) => kv.as_ref().map_or(0, |kv| kv.version).cmp(v),
            (CompareTarget::CreateRevision(r), kv) => {
                kv.as_ref().map_or(0, |kv| kv.create_revision).cmp(r)
            }
            (CompareTarget::ModRevision(r), kv) => {
                kv.as_ref().map_or(0, |kv| kv.mod_revision).cmp(r)
            }
        };
        Ok(match compare.op {
            CompareOp::Equal => ordering.is_eq(),
            CompareOp::NotEqual => ordering.is_ne(),
            CompareOp::Greater => ordering.is_gt(),
            CompareOp::Less => ordering.is_lt(),
        })
    }

    fn apply(&mut self, op: &TxnOp) -> Result<OpResponse, StoreError> {
        Ok(match op {
            TxnOp::Put { key, value, lease } => OpResponse::Put {
                prev: self.put(key, value, *lease)?,
            },
            TxnOp::Delete { key } => OpResponse::Delete {
                deleted: self.delete(key)?.into_iter().collect(),
            },
            TxnOp::DeletePrefix { prefix } => {
                let keys: Vec<String> = read_prefix(&self.kv, prefix)?
                    .into_iter()
                    .map(|kv| kv.key)
                    .collect();
                let mut deleted = Vec::with_capacity(keys.len());
                for key in keys {
                    deleted.extend(self.delete(&key)?);
                }
                OpResponse::Delete { deleted }
            }
            TxnOp::Get { key } => OpResponse::Get {
                kvs: read_key(&self.kv, key)?.into_iter().collect(),
            },
            TxnOp::GetPrefix { prefix } => OpResponse::Get {
                kvs: read_prefix(&self.kv, prefix)?,
            },
        })
    }

    fn put(
        &mut self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<Option<KeyValue>, StoreError> {
        let prev = read_key(&self.kv, key)?;
        let kv = KeyValue {
            key: key.to_owned(),
            value: value.to_vec(),
            create_revision: prev.as_ref().map_or(self.revision, |p| p.create_revision),
            mod_revision: self.revision,
            version: prev.as_ref().map_or(1, |p| p.version + 1),
            lease,
        };
        self.kv
            .insert(key, codec::encode_record(&kv).as_slice())
            .map_err(db_err("writing a key"))?;
        let old_lease = prev.as_ref().and_then(|p| p.lease);
        if old_lease != lease {
            if let Some(old) = old_lease {
                self.lease_keys
                    .remove(old, key)
                    .map_err(db_err("detaching a key from its lease"))?;
            }
            if let Some(new) = lease {
                self.lease_keys
                    .insert(new, key)
                    .map_err(db_err("attaching a key to its lease"))?;
            }
        }
        self.events.push(WatchEvent {
            kind: EventKind::Put,
            kv,
            prev_kv: prev.clone(),
        });
        Ok(prev)
    }

    fn delete(&mut self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let Some(prev) = read_key(&self.kv, key)? else {
            return Ok(None);
        };
        self.kv.remove(key).map_err(db_err("deleting a key"))?;
        if let Some(lease) = prev.lease {
            self.lease_keys
                .remove(lease, key)
                .map_err(db_err("detaching a key from its lease"))?;
        }
        self.events.push(WatchEvent {
            kind: EventKind::Delete,
            kv: KeyValue {
                key: key.to_owned(),
                value: Vec::new(),
                create_revision: 0,
                mod_revision: self.revision,
                version: 0,
                lease: None,
            },
            prev_kv: Some(prev.clone()),
        });
        Ok(Some(prev))
    }

    /// Deletes every key attached to `lease`.
    fn delete_lease_keys(&mut self, lease: LeaseId) -> Result<usize, StoreError> {
        let mut keys = Vec::new();
        for key in self
            .lease_keys
            .get(lease)
            .map_err(db_err("reading a lease's keys"))?
        {
            keys.push(
                key.map_err(db_err("reading a lease's keys"))?
                    .value()
                    .to_owned(),
            );
        }
        for key in &keys {
            self.delete(key)?;
        }
        self.lease_keys
            .remove_all(lease)
            .map_err(db_err("detaching a lease's keys"))?;
        Ok(keys.len())
    }
}

impl Inner {
    fn lock(&self) -> Result<MutexGuard<'_, State>, StoreError> {
        self.state.lock().map_err(|_| {
            StoreError::Unavailable("the embedded store's state is poisoned by a panic".into())
        })
    }

    fn begin_write(&self) -> Result<WriteTransaction, StoreError> {
        self.db.begin_write().map_err(db_err("beginning a write"))
    }

    /// Ends a write transaction. If it produced events: records them in the
    /// history at the next revision, compacts history beyond the retention,
    /// commits, and notifies watchers. If not: commits only when `commit_anyway`
    /// (lease bookkeeping), else aborts. Returns the store's revision after.
    fn finish(
        &self,
        st: &mut State,
        wtx: WriteTransaction,
        events: Vec<WatchEvent>,
        commit_anyway: bool,
    ) -> Result<Revision, StoreError> {
        if events.is_empty() {
            if commit_anyway {
                wtx.commit().map_err(db_err("committing"))?;
            } else {
                wtx.abort()
                    .map_err(db_err("aborting a read-only transaction"))?;
            }
            return Ok(st.revision);
        }
        let batch = WatchBatch {
            revision: st.revision + 1,
            events,
        };
        let retention = i64::try_from(self.options.history_retention).unwrap_or(i64::MAX);
        let mut compact_revision = st.compact_revision;
        {
            let mut history = wtx
                .open_table(HISTORY)
                .map_err(db_err("opening table history"))?;
            history
                .insert(batch.revision, codec::encode_batch(&batch).as_slice())
                .map_err(db_err("writing watch history"))?;
            let mut meta = wtx.open_table(META).map_err(db_err("opening table meta"))?;
            meta.insert(META_REVISION, batch.revision)
                .map_err(db_err("writing the revision"))?;
            let floor = batch.revision.saturating_sub(retention);
            if floor > compact_revision {
                history
                    .retain_in((compact_revision + 1)..=floor, |_, _| false)
                    .map_err(db_err("compacting watch history"))?;
                compact_revision = floor;
                meta.insert(META_COMPACT_REVISION, compact_revision)
                    .map_err(db_err("writing the compact revision"))?;
            }
        }
        wtx.commit().map_err(db_err("committing"))?;
        st.revision = batch.revision;
        st.compact_revision = compact_revision;
        st.notify(&batch);
        Ok(batch.revision)
    }

    fn read(&self, key: &str, prefix: bool) -> Result<GetResponse, StoreError> {
        let rtx = self.db.begin_read().map_err(db_err("beginning a read"))?;
        let meta = rtx.open_table(META).map_err(db_err("opening table meta"))?;
        let revision = meta_get(&meta, META_REVISION)?.unwrap_or(1);
        let kv = rtx.open_table(KV).map_err(db_err("opening table kv"))?;
        let kvs = if prefix {
            read_prefix(&kv, key)?
        } else {
            read_key(&kv, key)?.into_iter().collect()
        };
        Ok(GetResponse { kvs, revision })
    }

    fn txn(&self, txn: &Txn) -> Result<TxnResponse, StoreError> {
        validate_txn(txn)?;
        let mut st = self.lock()?;
        let now = Instant::now();
        let wtx = self.begin_write()?;
        let (succeeded, responses, events) = {
            let mut writer = KvWriter::open(&wtx, st.revision + 1)?;
            let mut succeeded = true;
            for compare in &txn.compare {
                if !writer.compare(compare)? {
                    succeeded = false;
                    break;
                }
            }
            let ops = if succeeded {
                &txn.success
            } else {
                &txn.failure
            };
            for op in ops {
                if let TxnOp::Put {
                    lease: Some(lease), ..
                } = op
                {
                    if !st.lease_alive(*lease, now) {
                        return Err(StoreError::LeaseNotFound(*lease));
                    }
                }
            }
            let mut responses = Vec::with_capacity(ops.len());
            for op in ops {
                responses.push(writer.apply(op)?);
            }
            (succeeded, responses, writer.events)
        };
        let revision = self.finish(&mut st, wtx, events, false)?;
        Ok(TxnResponse {
            succeeded,
            revision,
            responses,
        })
    }

    /// Registers a watcher and returns the history to replay before its live
    /// events.
    fn watch(&self, prefix: String, start_revision: Revision) -> Result<NewWatch, StoreError> {
        if start_revision < 0 {
            return Err(StoreError::InvalidArgument(format!(
                "watch start revision {start_revision} is negative"
            )));
        }
        let (tx, rx) = mpsc::channel(self.options.watch_buffer);
        let lagged = Arc::new(OnceLock::new());
        // Under the write lock: check compaction, take a snapshot holding
        // exactly the revisions up to `current`, and subscribe from
        // `current + 1`. The snapshot is read after the lock is released.
        let (snapshot, start, current) = {
            let mut st = self.lock()?;
            let current = st.revision;
            let start = if start_revision == 0 {
                current + 1
            } else {
                start_revision
            };
            if start <= st.compact_revision {
                return Err(StoreError::Compacted {
                    requested: start,
                    compact_revision: st.compact_revision,
                });
            }
            let snapshot = if start <= current {
                Some(self.db.begin_read().map_err(db_err("beginning a read"))?)
            } else {
                None
            };
            st.watchers.push(Watcher {
                prefix: prefix.clone(),
                from: start.max(current + 1),
                tx,
                lagged: Arc::clone(&lagged),
            });
            (snapshot, start, current)
        };
        let mut replay = Vec::new();
        if let Some(snapshot) = snapshot {
            let history = snapshot
                .open_table(HISTORY)
                .map_err(db_err("opening table history"))?;
            for entry in history
                .range(start..=current)
                .map_err(db_err("reading watch history"))?
            {
                let (revision, record) = entry.map_err(db_err("reading watch history"))?;
                let mut batch = codec::decode_batch(revision.value(), record.value())
                    .map_err(decode_err("decoding watch history"))?;
                batch.events.retain(|e| e.kv.key.starts_with(&prefix));
                if !batch.events.is_empty() {
                    replay.push(batch);
                }
            }
        }
        Ok(NewWatch { replay, rx, lagged })
    }

    fn lease_grant(&self, ttl: Duration) -> Result<Lease, StoreError> {
        let secs = lease_ttl_secs(ttl)?;
        let ttl = Duration::from_secs(secs);
        let mut st = self.lock()?;
        let id = st.next_lease_id;
        let wtx = self.begin_write()?;
        {
            let mut leases = wtx
                .open_table(LEASES)
                .map_err(db_err("opening table leases"))?;
            leases.insert(id, secs).map_err(db_err("writing a lease"))?;
            let mut meta = wtx.open_table(META).map_err(db_err("opening table meta"))?;
            meta.insert(META_NEXT_LEASE_ID, id + 1)
                .map_err(db_err("writing the next lease id"))?;
        }
        wtx.commit().map_err(db_err("committing a lease"))?;
        st.next_lease_id = id + 1;
        let deadline = deadline_after(Instant::now(), ttl)?;
        st.leases.insert(id, LeaseState { ttl, deadline });
        tracing::debug!(lease = id, ttl_secs = secs, "lease granted");
        Ok(Lease { id, ttl })
    }

    fn lease_keep_alive(&self, id: LeaseId) -> Result<Duration, StoreError> {
        let mut st = self.lock()?;
        let now = Instant::now();
        if !st.lease_alive(id, now) {
            return Err(StoreError::LeaseNotFound(id));
        }
        let lease = st
            .leases
            .get_mut(&id)
            .ok_or(StoreError::LeaseNotFound(id))?;
        lease.deadline = deadline_after(now, lease.ttl)?;
        Ok(lease.ttl)
    }

    fn lease_revoke(&self, id: LeaseId) -> Result<(), StoreError> {
        let mut st = self.lock()?;
        if !st.leases.contains_key(&id) {
            return Err(StoreError::LeaseNotFound(id));
        }
        let (revision, keys) = self.remove_lease(&mut st, id)?;
        tracing::debug!(lease = id, keys, revision, "lease revoked");
        Ok(())
    }

    /// Deletes a lease and its keys, in one revision if it had keys.
    fn remove_lease(&self, st: &mut State, id: LeaseId) -> Result<(Revision, usize), StoreError> {
        let wtx = self.begin_write()?;
        let (keys, events) = {
            let mut writer = KvWriter::open(&wtx, st.revision + 1)?;
            let keys = writer.delete_lease_keys(id)?;
            let mut leases = wtx
                .open_table(LEASES)
                .map_err(db_err("opening table leases"))?;
            leases.remove(id).map_err(db_err("removing a lease"))?;
            (keys, writer.events)
        };
        let revision = self.finish(st, wtx, events, true)?;
        st.leases.remove(&id);
        Ok((revision, keys))
    }

    /// Revokes every lease whose deadline has passed.
    fn expire_due(&self, now: Instant) -> Result<(), StoreError> {
        let mut st = self.lock()?;
        let mut due: Vec<LeaseId> = st
            .leases
            .iter()
            .filter(|(_, lease)| lease.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        due.sort_unstable();
        for id in due {
            let (revision, keys) = self.remove_lease(&mut st, id)?;
            tracing::info!(lease = id, keys, revision, "lease expired");
        }
        Ok(())
    }

    fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let mut st = self.lock()?;
        if revision > st.revision {
            return Err(StoreError::FutureRevision {
                requested: revision,
                current: st.revision,
            });
        }
        if revision <= st.compact_revision {
            return Ok(());
        }
        let wtx = self.begin_write()?;
        {
            let mut history = wtx
                .open_table(HISTORY)
                .map_err(db_err("opening table history"))?;
            history
                .retain_in((st.compact_revision + 1)..=revision, |_, _| false)
                .map_err(db_err("compacting watch history"))?;
            let mut meta = wtx.open_table(META).map_err(db_err("opening table meta"))?;
            meta.insert(META_COMPACT_REVISION, revision)
                .map_err(db_err("writing the compact revision"))?;
        }
        wtx.commit().map_err(db_err("committing a compaction"))?;
        st.compact_revision = revision;
        tracing::debug!(revision, "compacted watch history");
        Ok(())
    }

    fn status(&self) -> Result<StoreStatus, StoreError> {
        let rtx = self.db.begin_read().map_err(db_err("beginning a read"))?;
        let meta = rtx.open_table(META).map_err(db_err("opening table meta"))?;
        Ok(StoreStatus {
            kind: "embedded",
            revision: meta_get(&meta, META_REVISION)?.unwrap_or(1),
            compact_revision: meta_get(&meta, META_COMPACT_REVISION)?.unwrap_or(0),
            location: self.dir.display().to_string(),
        })
    }
}

/// A registered watcher: the history to replay, then its live channel.
struct NewWatch {
    replay: Vec<WatchBatch>,
    rx: mpsc::Receiver<WatchBatch>,
    lagged: Arc<OnceLock<Revision>>,
}

/// The live part of a watch: buffered batches, then the reason it ended.
fn live_stream(
    rx: mpsc::Receiver<WatchBatch>,
    lagged: Arc<OnceLock<Revision>>,
) -> impl futures::Stream<Item = Result<WatchBatch, StoreError>> + Send {
    futures::stream::unfold(Some((rx, lagged)), |state| async move {
        let (mut rx, lagged) = state?;
        match rx.recv().await {
            Some(batch) => Some((Ok(batch), Some((rx, lagged)))),
            None => {
                let error = match lagged.get() {
                    Some(&resume_from) => StoreError::WatchLagged { resume_from },
                    None => StoreError::Unavailable("the embedded store was closed".into()),
                };
                Some((Err(error), None))
            }
        }
    })
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<GetResponse, StoreError> {
        check_key(key)?;
        let key = key.to_owned();
        self.blocking(move |inner| inner.read(&key, false)).await
    }

    async fn get_prefix(&self, prefix: &str) -> Result<GetResponse, StoreError> {
        let prefix = prefix.to_owned();
        self.blocking(move |inner| inner.read(&prefix, true)).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        self.blocking(move |inner| inner.txn(&txn)).await
    }

    async fn watch(
        &self,
        prefix: &str,
        start_revision: Revision,
    ) -> Result<WatchStream, StoreError> {
        let prefix = prefix.to_owned();
        let NewWatch { replay, rx, lagged } = self
            .blocking(move |inner| inner.watch(prefix, start_revision))
            .await?;
        let replay = futures::stream::iter(replay.into_iter().map(Ok));
        Ok(Box::pin(replay.chain(live_stream(rx, lagged))))
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<Lease, StoreError> {
        self.blocking(move |inner| inner.lease_grant(ttl)).await
    }

    async fn lease_keep_alive(&self, id: LeaseId) -> Result<Duration, StoreError> {
        self.blocking(move |inner| inner.lease_keep_alive(id)).await
    }

    async fn lease_revoke(&self, id: LeaseId) -> Result<(), StoreError> {
        self.blocking(move |inner| inner.lease_revoke(id)).await
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.blocking(move |inner| inner.compact(revision)).await
    }

    async fn status(&self) -> Result<StoreStatus, StoreError> {
        self.blocking(|inner| inner.status()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_is_rounded_up_to_whole_seconds() {
        assert_eq!(lease_ttl_secs(Duration::from_millis(1)).ok(), Some(1));
        assert_eq!(lease_ttl_secs(Duration::from_millis(1000)).ok(), Some(1));
        assert_eq!(lease_ttl_secs(Duration::from_millis(1001)).ok(), Some(2));
        assert!(matches!(
            lease_ttl_secs(Duration::ZERO),
            Err(StoreError::InvalidArgument(_))
        ));
        assert!(matches!(
            lease_ttl_secs(Duration::from_secs(MAX_LEASE_TTL_SECS + 1)),
            Err(StoreError::InvalidArgument(_))
        ));
    }

    #[test]
    fn a_key_is_written_at_most_once_per_branch() {
        let put = |k: &str| TxnOp::put(k, "v");
        let ok = |txn: Txn| validate_txn(&txn).is_ok();
        assert!(ok(Txn::new().and_then([put("/a"), put("/b")])));
        assert!(ok(Txn::new().and_then([put("/a")]).or_else([put("/a")])));
        assert!(ok(Txn::new().and_then([
            TxnOp::delete("/a"),
            TxnOp::DeletePrefix { prefix: "/".into() },
            TxnOp::Get { key: "/a".into() },
        ])));
        assert!(!ok(Txn::new().and_then([put("/a"), put("/a")])));
        assert!(!ok(Txn::new().and_then([TxnOp::delete("/a"), put("/a")])));
        assert!(!ok(Txn::new().or_else([
            put("/p/x"),
            TxnOp::DeletePrefix {
                prefix: "/p/".into()
            },
        ])));
        assert!(!ok(Txn::new().and_then([put("")])));
        assert!(!ok(Txn::new().when([Compare::absent("")])));
    }
}
