//! Sextant's state store.
//!
//! One trait, [`Store`], whose semantics are etcd's v3 API, exactly where
//! Sextant relies on them:
//!
//! - **one global revision**, incremented by one for every transaction that
//!   writes (a read-only or failed transaction does not move it);
//! - per key: `create_revision`, `mod_revision` and `version` (number of
//!   writes since creation, reset by a delete);
//! - **compare-and-swap transactions** ([`Txn`]): compares on a key's
//!   version, create/mod revision or value, then a success or failure branch
//!   of puts, deletes and reads, applied atomically at one revision;
//! - **prefix reads** and **prefix watches from a revision**, with put and
//!   delete events (also the deletes caused by a lease expiring), and a clear
//!   [`StoreError::Compacted`] when the revision asked for has been compacted;
//! - **leases** with a TTL and keep-alive; keys attached to a lease are
//!   deleted (in one revision) when it expires or is revoked.
//!
//! Implementations: [`embedded::EmbeddedStore`] (the default: one node,
//! persisted to a data directory) and [`etcd::EtcdStore`] (several
//! control-plane replicas sharing one etcd cluster). Both must pass
//! [`conformance`], the suite that tests each property above;
//! [`etcd_server`] starts a throwaway etcd for such tests.
//!
//! Keys are UTF-8 strings. Callers put a schema version in their keys
//! (`/sextant/v1/...`), so that a later layout can live beside this one.

#![forbid(unsafe_code)]

use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use futures::Stream;
use serde::{Deserialize, Serialize};

pub mod conformance;
pub mod embedded;
pub mod etcd;
pub mod etcd_server;

/// A store revision. Like etcd's, it starts at 1 for an empty store and grows
/// by one per writing transaction.
pub type Revision = i64;

/// A lease id. Never 0.
pub type LeaseId = i64;

/// A key with its value and metadata, as etcd returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the transaction that created the key (since its last delete).
    pub create_revision: Revision,
    /// Revision of the last transaction that wrote the key. For a delete
    /// event, the revision of the delete.
    pub mod_revision: Revision,
    /// Number of writes since creation (1 after the first put); 0 in a delete event.
    pub version: i64,
    /// Lease the key is attached to, if any.
    pub lease: Option<LeaseId>,
}

/// Result of a read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetResponse {
    /// Matching keys, sorted by key.
    pub kvs: Vec<KeyValue>,
    /// Store revision at which the read was served.
    pub revision: Revision,
}

/// What a [`Compare`] looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompareTarget {
    /// The key's version (0 when the key does not exist).
    Version(i64),
    /// The key's create revision (0 when the key does not exist).
    CreateRevision(Revision),
    /// The key's mod revision (0 when the key does not exist).
    ModRevision(Revision),
    /// The key's value (a missing key never compares equal to any value).
    Value(Vec<u8>),
}

/// How a [`Compare`] compares (the key's field `op` the given value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOp {
    Equal,
    NotEqual,
    Greater,
    Less,
}

/// One condition of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    pub key: String,
    pub op: CompareOp,
    pub target: CompareTarget,
}

impl Compare {
    /// The key does not exist (`version == 0`).
    pub fn absent(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            op: CompareOp::Equal,
            target: CompareTarget::Version(0),
        }
    }

    /// The key was last written at `rev` (0: does not exist).
    pub fn mod_revision(key: impl Into<String>, rev: Revision) -> Self {
        Self {
            key: key.into(),
            op: CompareOp::Equal,
            target: CompareTarget::ModRevision(rev),
        }
    }

    /// The key's value equals `value`.
    pub fn value(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        Self {
            key: key.into(),
            op: CompareOp::Equal,
            target: CompareTarget::Value(value.into()),
        }
    }
}

/// One operation of a transaction branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOp {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
    },
    DeletePrefix {
        prefix: String,
    },
    Get {
        key: String,
    },
    GetPrefix {
        prefix: String,
    },
}

impl TxnOp {
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        Self::Put {
            key: key.into(),
            value: value.into(),
            lease: None,
        }
    }

    pub fn delete(key: impl Into<String>) -> Self {
        Self::Delete { key: key.into() }
    }
}

/// An atomic transaction: if every compare holds, apply `success`, else
/// `failure`. All writes of the applied branch share one new revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub compare: Vec<Compare>,
    pub success: Vec<TxnOp>,
    pub failure: Vec<TxnOp>,
}

impl Txn {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn when(mut self, compare: impl IntoIterator<Item = Compare>) -> Self {
        self.compare.extend(compare);
        self
    }

    pub fn and_then(mut self, ops: impl IntoIterator<Item = TxnOp>) -> Self {
        self.success.extend(ops);
        self
    }

    pub fn or_else(mut self, ops: impl IntoIterator<Item = TxnOp>) -> Self {
        self.failure.extend(ops);
        self
    }
}

/// The result of one operation of the applied branch, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpResponse {
    /// A put, with the key's previous value if it existed.
    Put { prev: Option<KeyValue> },
    /// A delete, with the keys it deleted (their last values).
    Delete { deleted: Vec<KeyValue> },
    /// A read, sorted by key.
    Get { kvs: Vec<KeyValue> },
}

/// Result of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnResponse {
    /// Whether every compare held (the success branch was applied).
    pub succeeded: bool,
    /// Store revision after the transaction (the new revision if it wrote,
    /// else the current one).
    pub revision: Revision,
    pub responses: Vec<OpResponse>,
}

/// Kind of a watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchEvent {
    pub kind: EventKind,
    /// For a put, the key as written. For a delete, the key with an empty
    /// value, `mod_revision` = the delete's revision and `version` = 0.
    pub kv: KeyValue,
    /// The key's previous value, when it existed.
    pub prev_kv: Option<KeyValue>,
}

/// The events of one revision that match a watch, in the order written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchBatch {
    pub revision: Revision,
    pub events: Vec<WatchEvent>,
}

/// A stream of watch batches, in revision order. It ends with an error
/// (e.g. [`StoreError::WatchLagged`]) when it cannot continue; the caller may
/// re-watch from the revision it says.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchBatch, StoreError>> + Send>>;

/// A granted lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub id: LeaseId,
    pub ttl: Duration,
}

/// Health and position of a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreStatus {
    /// `embedded` or `etcd`.
    pub kind: &'static str,
    pub revision: Revision,
    /// Revisions at or below this are compacted (0: none).
    pub compact_revision: Revision,
    /// Where the data lives (a directory, or the etcd endpoints).
    pub location: String,
}

/// Errors of a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A watch asked for history that compaction has removed.
    #[error("revision {requested} has been compacted (compacted up to {compact_revision}); re-read and watch from {next}", next = compact_revision + 1)]
    Compacted {
        requested: Revision,
        compact_revision: Revision,
    },
    /// A compaction asked for a revision the store has not reached.
    #[error("cannot compact to revision {requested}: the store is at revision {current}")]
    FutureRevision {
        requested: Revision,
        current: Revision,
    },
    /// The lease does not exist (never granted, revoked or expired).
    #[error("lease {0} not found (revoked or expired)")]
    LeaseNotFound(LeaseId),
    /// A watcher fell too far behind and was cancelled.
    #[error("watch fell behind and was cancelled; re-watch from revision {resume_from}")]
    WatchLagged { resume_from: Revision },
    /// The request is not valid (empty key, TTL of zero, ...).
    #[error("invalid store request: {0}")]
    InvalidArgument(String),
    /// The store cannot be reached or is not serving writes.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The backend failed (disk, database, decoding).
    #[error("store backend error: {context}")]
    Backend {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl StoreError {
    pub fn backend(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::Backend {
            context: context.into(),
            source: source.into(),
        }
    }
}

/// The state store. Semantics are etcd's; see the crate docs.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Reads one key.
    async fn get(&self, key: &str) -> Result<GetResponse, StoreError>;

    /// Reads every key that starts with `prefix`, sorted by key.
    async fn get_prefix(&self, prefix: &str) -> Result<GetResponse, StoreError>;

    /// Applies a transaction atomically.
    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError>;

    /// Watches every key that starts with `prefix`, from `start_revision`
    /// inclusive (0: from the next revision). Events of revisions already
    /// written are replayed first, then live ones follow, without gap or
    /// duplicate.
    async fn watch(
        &self,
        prefix: &str,
        start_revision: Revision,
    ) -> Result<WatchStream, StoreError>;

    /// Grants a lease with the given TTL (rounded up to whole seconds, at
    /// least 1 s).
    async fn lease_grant(&self, ttl: Duration) -> Result<Lease, StoreError>;

    /// Renews a lease for another full TTL; returns the TTL.
    async fn lease_keep_alive(&self, id: LeaseId) -> Result<Duration, StoreError>;

    /// Revokes a lease, deleting its keys in one revision.
    async fn lease_revoke(&self, id: LeaseId) -> Result<(), StoreError>;

    /// Removes watch history at or below `revision`.
    async fn compact(&self, revision: Revision) -> Result<(), StoreError>;

    /// Where the store is and how far it has got.
    async fn status(&self) -> Result<StoreStatus, StoreError>;

    /// Writes one key (a one-operation transaction); returns the new revision.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<Revision, StoreError> {
        Ok(self
            .txn(Txn::new().and_then([TxnOp::put(key, value)]))
            .await?
            .revision)
    }

    /// Deletes one key; returns whether it existed.
    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let resp = self.txn(Txn::new().and_then([TxnOp::delete(key)])).await?;
        Ok(
            matches!(resp.responses.first(), Some(OpResponse::Delete { deleted }) if !deleted.is_empty()),
        )
    }
}
