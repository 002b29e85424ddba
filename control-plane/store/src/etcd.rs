//! The etcd store: [`Store`] on an etcd v3 cluster, so that several
//! control-plane replicas share one state.
//!
//! Every method maps to etcd's own feature: reads are (linearizable) ranges,
//! [`Txn`] is an etcd transaction with the same compares and operations,
//! watches are etcd watches with `prev_kv` and a start revision, leases are
//! etcd leases, and revisions are etcd's. Tested against etcd 3.4 (Debian's
//! `etcd-server`) with the same conformance suite as the embedded store.
//!
//! # Keys and namespace
//!
//! [`EtcdOptions::namespace`] is prepended to every key, so several
//! deployments (or tests) can share one etcd: the trait's keys, prefixes and
//! watches are relative to it, and keys come back without it. Leases and
//! compaction are not namespaced: they are global to the etcd cluster, as in
//! etcd itself (a [`Store::compact`] compacts every namespace).
//!
//! # Failures and timeouts
//!
//! Every request is bounded by [`EtcdOptions::request_timeout`]: an etcd that
//! is down, partitioned or without a leader makes calls fail with
//! [`StoreError::Unavailable`] naming the endpoints, never hang. As with any
//! etcd client, a write that timed out may still be applied once etcd gets
//! to it: writes that may be retried should compare-and-swap. The client
//! reconnects by itself: calls succeed again once etcd is back. A watch ends
//! with [`StoreError::Unavailable`] (saying the revision to re-watch from)
//! when its connection breaks or the member loses its leader; HTTP/2
//! keep-alive pings ([`EtcdOptions::keep_alive_interval`]) detect a dead
//! connection that did not close.
//!
//! # Semantics, and where etcd needs help to match the trait
//!
//! - **Compaction.** The trait says a compaction removes the history *at or
//!   below* its revision; etcd still accepts a watch from exactly the compact
//!   revision, but it may have dropped a delete made at that revision (a
//!   compaction drops tombstones at its revision). So [`EtcdStore::watch`]
//!   first checks that `start - 1` is still readable and answers
//!   [`StoreError::Compacted`] if not. etcd's Status call does not report the
//!   compact revision: [`Store::status`] finds it as the oldest revision etcd
//!   still reads at (a binary search of count-only reads, starting from the
//!   highest compact revision this client has seen). A compaction at revision
//!   1 is reported as 0 (revision 1 holds no data).
//! - **Duplicate keys.** etcd rejects a branch that puts a key twice or puts
//!   a key it also deletes ("duplicate key given in txn request"), checking
//!   both branches; so does the embedded store. Both answer
//!   [`StoreError::InvalidArgument`].
//! - **Leases.** A put with a lease that does not exist fails the whole
//!   transaction with [`StoreError::LeaseNotFound`] (etcd checks the branch
//!   that runs). TTLs are rounded up to whole seconds; etcd raises a TTL below
//!   its minimum (1.5 × the election timeout, rounded up: 2 s with the default
//!   1 s election timeout) and [`Lease::ttl`] is the TTL etcd granted.
//!   Expired leases are revoked by etcd's leader, which checks every 500 ms.
//! - **Limits** of etcd that the embedded store does not have: at most
//!   `--max-txn-ops` (128 by default) operations per transaction branch, and
//!   requests of at most `--max-request-bytes` (1.5 MiB by default); both
//!   answer [`StoreError::InvalidArgument`]. Responses may be up to
//!   [`EtcdOptions::max_response_bytes`].
//! - Empty keys are invalid (checked here, since the namespace would make
//!   them non-empty for etcd); an empty prefix matches every key of the
//!   namespace.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client as etcd;
use tonic::Code;

use crate::{
    Compare, CompareOp, CompareTarget, EventKind, GetResponse, KeyValue, Lease, LeaseId,
    OpResponse, Revision, Store, StoreError, StoreStatus, Txn, TxnOp, TxnResponse, WatchBatch,
    WatchEvent, WatchStream,
};

/// The longest lease TTL etcd accepts (`MaxLeaseTTL`).
const MAX_LEASE_TTL_SECS: u64 = 9_000_000_000;

/// How to reach etcd, and where in it the keys live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdOptions {
    /// Prepended to every key (e.g. `/prod-eu`): the trait's keys are relative
    /// to it. Empty: keys are used as they are.
    pub namespace: String,
    /// Longest wait for one request (a read, a transaction, a lease call, the
    /// opening of a watch). A request without an answer by then fails with
    /// [`StoreError::Unavailable`].
    pub request_timeout: Duration,
    /// Longest wait for a TCP connection to an endpoint.
    pub connect_timeout: Duration,
    /// HTTP/2 keep-alive pings, which detect a dead connection (and end the
    /// watches on it). etcd refuses pings more often than every 5 s
    /// (`--grpc-keepalive-min-time`).
    pub keep_alive_interval: Duration,
    /// How long a keep-alive ping may go unanswered before the connection is
    /// dropped.
    pub keep_alive_timeout: Duration,
    /// Largest response accepted (a prefix read, a watch response), in bytes.
    pub max_response_bytes: usize,
    /// Mutual TLS to etcd (endpoints `https://...`); `None`: plaintext.
    pub tls: Option<EtcdTls>,
}

/// PEM contents for TLS to etcd: the CA that signed etcd's certificate, and
/// this client's certificate and key (etcd's `--client-cert-auth`).
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca_pem: Vec<u8>,
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for EtcdTls {
    // Never print the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdTls")
            .field("client_certificate", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for EtcdOptions {
    fn default() -> Self {
        Self {
            namespace: String::new(),
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            keep_alive_interval: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(5),
            max_response_bytes: 64 * 1024 * 1024,
            tls: None,
        }
    }
}

/// [`Store`] on etcd. See the module docs.
pub struct EtcdStore {
    kv: etcd::KvClient,
    watch: etcd::WatchClient,
    lease: etcd::LeaseClient,
    ctx: Arc<Ctx>,
    request_timeout: Duration,
    /// The highest compact revision seen (a lower bound of etcd's).
    known_compact: AtomicI64,
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.ctx.endpoints)
            .field("namespace", &String::from_utf8_lossy(&self.ctx.namespace))
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

/// What the store and its watch streams share: how keys map, and what to
/// say in errors.
#[derive(Debug)]
struct Ctx {
    namespace: Vec<u8>,
    /// The endpoints, comma-separated, for messages.
    endpoints: String,
}

/// Why a request failed, before it becomes a [`StoreError`].
enum Failure {
    Etcd(etcd::Error),
    TimedOut(Duration),
}

impl From<etcd::Error> for Failure {
    fn from(e: etcd::Error) -> Self {
        Self::Etcd(e)
    }
}

/// etcd's errors that callers handle themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    LeaseNotFound,
    Compacted,
    FutureRevision,
    Other,
}

impl Failure {
    fn kind(&self) -> Kind {
        let Failure::Etcd(etcd::Error::GRpcStatus(status)) = self else {
            return Kind::Other;
        };
        let message = status.message();
        match status.code() {
            Code::NotFound if message.contains("lease not found") => Kind::LeaseNotFound,
            Code::OutOfRange if message.contains("has been compacted") => Kind::Compacted,
            Code::OutOfRange if message.contains("future revision") => Kind::FutureRevision,
            _ => Kind::Other,
        }
    }
}

impl Ctx {
    fn unavailable(&self, what: &str, detail: impl fmt::Display) -> StoreError {
        StoreError::Unavailable(format!("etcd at {}: {what}: {detail}", self.endpoints))
    }

    /// The store error for a failed request.
    fn error(&self, what: &str, failure: Failure) -> StoreError {
        let e = match failure {
            Failure::TimedOut(after) => {
                return self.unavailable(
                    what,
                    format!(
                        "no answer within {after:?} (etcd down, unreachable or without a leader)"
                    ),
                )
            }
            Failure::Etcd(e) => e,
        };
        match e {
            etcd::Error::GRpcStatus(status) => {
                let detail = format!("{:?}: {}", status.code(), status.message());
                let too_large = status.code() == Code::ResourceExhausted
                    && status.message().contains("larger than max");
                match status.code() {
                    // gRPC's own limit on a request's size.
                    Code::ResourceExhausted if too_large => StoreError::InvalidArgument(format!(
                        "{what}: etcd refused it: {}",
                        status.message()
                    )),
                    // Also etcd's "no space" and "too many requests": not
                    // serving writes.
                    Code::Unavailable
                    | Code::DeadlineExceeded
                    | Code::Cancelled
                    | Code::Aborted
                    | Code::ResourceExhausted
                    | Code::Unknown
                    | Code::Internal => self.unavailable(what, detail),
                    Code::InvalidArgument | Code::OutOfRange => StoreError::InvalidArgument(
                        format!("{what}: etcd refused it: {}", status.message()),
                    ),
                    _ => StoreError::backend(
                        format!("etcd at {}: {what}: {detail}", self.endpoints),
                        status,
                    ),
                }
            }
            etcd::Error::TransportError(e) => self.unavailable(what, e),
            etcd::Error::IoError(e) => self.unavailable(what, e),
            etcd::Error::InvalidArgs(m) => {
                StoreError::InvalidArgument(format!("{what}: {m} (etcd at {})", self.endpoints))
            }
            etcd::Error::InvalidUri(e) => StoreError::InvalidArgument(format!(
                "invalid etcd endpoint in {}: {e}",
                self.endpoints
            )),
            other => StoreError::backend(format!("etcd at {}: {what}", self.endpoints), other),
        }
    }

    fn full_key(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        if key.is_empty() {
            return Err(StoreError::InvalidArgument("key must not be empty".into()));
        }
        let mut full = Vec::with_capacity(self.namespace.len() + key.len());
        full.extend_from_slice(&self.namespace);
        full.extend_from_slice(key.as_bytes());
        Ok(full)
    }

    /// `[key, range_end)` of every key under `prefix` (in etcd's encoding:
    /// `"\0", "\0"` is every key).
    fn prefix_range(&self, prefix: &str) -> (Vec<u8>, Vec<u8>) {
        let mut key = self.namespace.clone();
        key.extend_from_slice(prefix.as_bytes());
        if key.is_empty() {
            return (vec![0], vec![0]);
        }
        let end = prefix_end(&key);
        (key, end)
    }

    /// A key inside the namespace, for count-only probes.
    fn probe_key(&self) -> Vec<u8> {
        if self.namespace.is_empty() {
            vec![0]
        } else {
            self.namespace.clone()
        }
    }

    fn decode(&self, kv: &etcd::KeyValue) -> Result<KeyValue, StoreError> {
        let key = kv
            .key()
            .strip_prefix(self.namespace.as_slice())
            .ok_or_else(|| {
                StoreError::backend(
                    "decoding a key from etcd",
                    format!(
                        "key {:?} is outside the namespace {:?}",
                        String::from_utf8_lossy(kv.key()),
                        String::from_utf8_lossy(&self.namespace)
                    ),
                )
            })?;
        let key = String::from_utf8(key.to_vec()).map_err(|e| {
            StoreError::backend(
                format!(
                    "decoding key {:?} from etcd (keys are UTF-8)",
                    String::from_utf8_lossy(kv.key())
                ),
                e,
            )
        })?;
        Ok(KeyValue {
            key,
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
            version: kv.version(),
            lease: (kv.lease() != 0).then_some(kv.lease()),
        })
    }

    fn decode_all(&self, kvs: &[etcd::KeyValue]) -> Result<Vec<KeyValue>, StoreError> {
        kvs.iter().map(|kv| self.decode(kv)).collect()
    }
}

/// The smallest key above every key starting with `key` (`"\0"`: none, i.e.
/// to the end of the key space).
fn prefix_end(key: &[u8]) -> Vec<u8> {
    let mut end = key.to_vec();
    while let Some(&last) = end.last() {
        if last < 0xff {
            if let Some(byte) = end.last_mut() {
                *byte = last + 1;
            }
            return end;
        }
        end.pop();
    }
    vec![0]
}

fn header_revision(header: Option<&etcd::ResponseHeader>) -> Revision {
    header.map_or(0, etcd::ResponseHeader::revision)
}

fn lease_ttl_secs(ttl: Duration) -> Result<i64, StoreError> {
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
            "lease TTL of {secs} s is above etcd's maximum of {MAX_LEASE_TTL_SECS} s"
        )));
    }
    i64::try_from(secs).map_err(|_| StoreError::InvalidArgument("lease TTL too long".into()))
}

fn ttl_from_etcd(secs: i64) -> Duration {
    Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

impl EtcdStore {
    /// Connects to etcd at `endpoints` (`http://host:port`, or `host:port`)
    /// and checks that it answers: fails with [`StoreError::Unavailable`]
    /// naming the endpoints if it does not within the request timeout.
    pub async fn connect<S: AsRef<str>>(
        endpoints: &[S],
        options: EtcdOptions,
    ) -> Result<EtcdStore, StoreError> {
        let store = Self::connect_lazy(endpoints, options).await?;
        store.current_revision("connect (a first read)").await?;
        Ok(store)
    }

    /// Like [`EtcdStore::connect`], without the check: the store is returned
    /// even if etcd cannot be reached yet, and its calls fail with
    /// [`StoreError::Unavailable`] until it can.
    pub async fn connect_lazy<S: AsRef<str>>(
        endpoints: &[S],
        options: EtcdOptions,
    ) -> Result<EtcdStore, StoreError> {
        let endpoints: Vec<String> = endpoints
            .iter()
            .map(|e| e.as_ref().trim().to_owned())
            .filter(|e| !e.is_empty())
            .collect();
        if endpoints.is_empty() {
            return Err(StoreError::InvalidArgument("no etcd endpoint given".into()));
        }
        if options.request_timeout.is_zero() {
            return Err(StoreError::InvalidArgument(
                "etcd request timeout must be positive".into(),
            ));
        }
        let ctx = Arc::new(Ctx {
            namespace: options.namespace.as_bytes().to_vec(),
            endpoints: endpoints
                .iter()
                .map(|e| {
                    if e.contains("://") {
                        e.clone()
                    } else {
                        format!("http://{e}")
                    }
                })
                .collect::<Vec<_>>()
                .join(","),
        });
        let mut connect_options = etcd::ConnectOptions::new()
            .with_connect_timeout(options.connect_timeout)
            .with_keep_alive(options.keep_alive_interval, options.keep_alive_timeout)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        if let Some(tls) = &options.tls {
            let mut config = etcd::TlsOptions::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&tls.ca_pem));
            if let Some((cert, key)) = &tls.identity {
                config = config.identity(tonic::transport::Identity::from_pem(cert, key));
            }
            connect_options = connect_options.with_tls(config);
        }
        // Lazy: the channel connects on the first request, and reconnects.
        let client = etcd::Client::connect(&endpoints, Some(connect_options))
            .await
            .map_err(|e| ctx.error("connect", Failure::Etcd(e)))?;
        Ok(EtcdStore {
            kv: client
                .kv_client()
                .max_decoding_message_size(options.max_response_bytes),
            watch: client
                .watch_client()
                .max_decoding_message_size(options.max_response_bytes),
            lease: client.lease_client(),
            ctx,
            request_timeout: options.request_timeout,
            known_compact: AtomicI64::new(0),
        })
    }

    /// The etcd endpoints, comma-separated.
    pub fn endpoints(&self) -> &str {
        &self.ctx.endpoints
    }

    /// Runs one request under the request timeout.
    async fn timed<T, F>(&self, request: F) -> Result<T, Failure>
    where
        F: Future<Output = Result<T, etcd::Error>>,
    {
        match tokio::time::timeout(self.request_timeout, request).await {
            Ok(result) => result.map_err(Failure::Etcd),
            Err(_) => Err(Failure::TimedOut(self.request_timeout)),
        }
    }

    async fn range(
        &self,
        key: Vec<u8>,
        options: etcd::GetOptions,
    ) -> Result<etcd::GetResponse, Failure> {
        let mut kv = self.kv.clone();
        self.timed(kv.get(key, Some(options))).await
    }

    /// The current revision, from a linearizable count-only read.
    async fn current_revision(&self, what: &str) -> Result<Revision, StoreError> {
        let resp = self
            .range(
                self.ctx.probe_key(),
                etcd::GetOptions::new().with_count_only(),
            )
            .await
            .map_err(|f| self.ctx.error(what, f))?;
        Ok(header_revision(resp.header()))
    }

    /// Whether etcd still serves reads at `revision` (it is not below the
    /// compact revision).
    async fn readable_at(&self, revision: Revision) -> Result<bool, StoreError> {
        let options = etcd::GetOptions::new()
            .with_revision(revision)
            .with_count_only();
        match self.range(self.ctx.probe_key(), options).await {
            Ok(_) => Ok(true),
            Err(f) => match f.kind() {
                Kind::Compacted => Ok(false),
                Kind::FutureRevision => Ok(true),
                _ => Err(self.ctx.error(&format!("read at revision {revision}"), f)),
            },
        }
    }

    /// etcd's compact revision: the oldest revision it still reads at (0 if
    /// that is revision 1). `current` is a revision etcd has reached.
    async fn compact_revision(&self, current: Revision) -> Result<Revision, StoreError> {
        let known = self.known_compact.load(Ordering::Relaxed);
        let mut low = known.max(1);
        if self.readable_at(low).await? {
            return Ok(if low > 1 { low } else { known.clamp(0, 1) });
        }
        // Not readable at `low`, readable at `high` (etcd never compacts past
        // its current revision).
        let mut high = current.max(low + 1);
        while high - low > 1 {
            let mid = low + (high - low) / 2;
            if self.readable_at(mid).await? {
                high = mid;
            } else {
                low = mid;
            }
        }
        self.known_compact.fetch_max(high, Ordering::Relaxed);
        Ok(high)
    }

    fn etcd_compare(&self, compare: &Compare) -> Result<etcd::Compare, StoreError> {
        let key = self.ctx.full_key(&compare.key)?;
        let op = match compare.op {
            CompareOp::Equal => etcd::CompareOp::Equal,
            CompareOp::NotEqual => etcd::CompareOp::NotEqual,
            CompareOp::Greater => etcd::CompareOp::Greater,
            CompareOp::Less => etcd::CompareOp::Less,
        };
        Ok(match &compare.target {
            CompareTarget::Version(v) => etcd::Compare::version(key, op, *v),
            CompareTarget::CreateRevision(r) => etcd::Compare::create_revision(key, op, *r),
            CompareTarget::ModRevision(r) => etcd::Compare::mod_revision(key, op, *r),
            CompareTarget::Value(v) => etcd::Compare::value(key, op, v.clone()),
        })
    }

    fn etcd_op(&self, op: &TxnOp) -> Result<etcd::TxnOp, StoreError> {
        Ok(match op {
            TxnOp::Put { key, value, lease } => etcd::TxnOp::put(
                self.ctx.full_key(key)?,
                value.clone(),
                Some(
                    etcd::PutOptions::new()
                        .with_lease(lease.unwrap_or(0))
                        .with_prev_key(),
                ),
            ),
            TxnOp::Delete { key } => etcd::TxnOp::delete(
                self.ctx.full_key(key)?,
                Some(etcd::DeleteOptions::new().with_prev_key()),
            ),
            TxnOp::DeletePrefix { prefix } => {
                let (key, end) = self.ctx.prefix_range(prefix);
                etcd::TxnOp::delete(
                    key,
                    Some(etcd::DeleteOptions::new().with_range(end).with_prev_key()),
                )
            }
            TxnOp::Get { key } => etcd::TxnOp::get(self.ctx.full_key(key)?, None),
            TxnOp::GetPrefix { prefix } => {
                let (key, end) = self.ctx.prefix_range(prefix);
                etcd::TxnOp::get(key, Some(etcd::GetOptions::new().with_range(end)))
            }
        })
    }

    /// Which lease of `txn` etcd did not find (it does not say).
    async fn missing_lease(&self, txn: &Txn) -> LeaseId {
        let mut leases: Vec<LeaseId> = txn
            .success
            .iter()
            .chain(&txn.failure)
            .filter_map(|op| match op {
                TxnOp::Put {
                    lease: Some(id), ..
                } => Some(*id),
                _ => None,
            })
            .collect();
        leases.sort_unstable();
        leases.dedup();
        if leases.len() > 1 {
            for &id in &leases {
                let mut lease = self.lease.clone();
                if let Ok(resp) = self.timed(lease.time_to_live(id, None)).await {
                    if resp.ttl() < 0 {
                        return id;
                    }
                }
            }
        }
        leases.first().copied().unwrap_or(0)
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<GetResponse, StoreError> {
        let full = self.ctx.full_key(key)?;
        let resp = self
            .range(full, etcd::GetOptions::new())
            .await
            .map_err(|f| self.ctx.error(&format!("get {key:?}"), f))?;
        Ok(GetResponse {
            kvs: self.ctx.decode_all(resp.kvs())?,
            revision: header_revision(resp.header()),
        })
    }

    async fn get_prefix(&self, prefix: &str) -> Result<GetResponse, StoreError> {
        let (key, end) = self.ctx.prefix_range(prefix);
        let resp = self
            .range(key, etcd::GetOptions::new().with_range(end))
            .await
            .map_err(|f| self.ctx.error(&format!("get prefix {prefix:?}"), f))?;
        Ok(GetResponse {
            kvs: self.ctx.decode_all(resp.kvs())?,
            revision: header_revision(resp.header()),
        })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        let compares = txn
            .compare
            .iter()
            .map(|c| self.etcd_compare(c))
            .collect::<Result<Vec<_>, _>>()?;
        let success = txn
            .success
            .iter()
            .map(|op| self.etcd_op(op))
            .collect::<Result<Vec<_>, _>>()?;
        let failure = txn
            .failure
            .iter()
            .map(|op| self.etcd_op(op))
            .collect::<Result<Vec<_>, _>>()?;
        let request = etcd::Txn::new()
            .when(compares)
            .and_then(success)
            .or_else(failure);
        let mut kv = self.kv.clone();
        let resp = match self.timed(kv.txn(request)).await {
            Ok(resp) => resp,
            Err(f) if f.kind() == Kind::LeaseNotFound => {
                return Err(StoreError::LeaseNotFound(self.missing_lease(&txn).await))
            }
            Err(f) => return Err(self.ctx.error("transaction", f)),
        };
        let responses = resp
            .op_responses()
            .into_iter()
            .map(|r| {
                Ok(match r {
                    etcd::TxnOpResponse::Put(put) => OpResponse::Put {
                        prev: put.prev_key().map(|kv| self.ctx.decode(kv)).transpose()?,
                    },
                    etcd::TxnOpResponse::Delete(delete) => OpResponse::Delete {
                        deleted: self.ctx.decode_all(delete.prev_kvs())?,
                    },
                    etcd::TxnOpResponse::Get(get) => OpResponse::Get {
                        kvs: self.ctx.decode_all(get.kvs())?,
                    },
                    etcd::TxnOpResponse::Txn(_) => {
                        return Err(StoreError::backend(
                            "decoding a transaction response from etcd",
                            "unexpected nested transaction response",
                        ))
                    }
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(TxnResponse {
            succeeded: resp.succeeded(),
            revision: header_revision(resp.header()),
            responses,
        })
    }

    async fn watch(
        &self,
        prefix: &str,
        start_revision: Revision,
    ) -> Result<WatchStream, StoreError> {
        if start_revision < 0 {
            return Err(StoreError::InvalidArgument(format!(
                "watch start revision {start_revision} is negative"
            )));
        }
        let what = format!("watch {prefix:?} from revision {start_revision}");
        // The trait's history ends at the compact revision included; etcd's
        // starts there. Revision 1 holds no events, so from 1 nothing is lost.
        if start_revision >= 2 && !self.readable_at(start_revision - 1).await? {
            let current = self.current_revision(&what).await?;
            return Err(StoreError::Compacted {
                requested: start_revision,
                compact_revision: self.compact_revision(current).await?,
            });
        }
        let (key, end) = self.ctx.prefix_range(prefix);
        let mut options = etcd::WatchOptions::new().with_range(end).with_prev_key();
        if start_revision > 0 {
            options = options.with_start_revision(start_revision);
        }
        let mut client = self.watch.clone();
        // Opened once etcd confirms it: a write after this returns is seen.
        let (stream, first) = self
            .timed(async {
                let mut stream = client.watch(key, Some(options)).await?;
                let first = stream.message().await?;
                Ok((stream, first))
            })
            .await
            .map_err(|f| self.ctx.error(&what, f))?;
        let Some(first) = first else {
            return Err(self
                .ctx
                .unavailable(&what, "etcd closed the watch before confirming it"));
        };
        let next = if start_revision > 0 {
            start_revision
        } else {
            header_revision(first.header()) + 1
        };
        let mut live = LiveWatch {
            stream,
            ctx: Arc::clone(&self.ctx),
            pending: VecDeque::new(),
            end: None,
            next,
            finished: false,
        };
        live.absorb(&first);
        if live.pending.is_empty() {
            match live.end.take() {
                Some(End::Compacted(compact_revision)) => {
                    self.known_compact
                        .fetch_max(compact_revision, Ordering::Relaxed);
                    return Err(StoreError::Compacted {
                        requested: start_revision.max(1),
                        compact_revision,
                    });
                }
                Some(end) => return Err(live.end_error(end)),
                None => {}
            }
        }
        Ok(Box::pin(live.into_stream()))
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<Lease, StoreError> {
        let secs = lease_ttl_secs(ttl)?;
        let mut lease = self.lease.clone();
        let resp = self
            .timed(lease.grant(secs, None))
            .await
            .map_err(|f| self.ctx.error(&format!("grant a lease of {secs} s"), f))?;
        if !resp.error().is_empty() {
            return Err(StoreError::backend(
                format!("etcd at {}: grant a lease", self.ctx.endpoints),
                resp.error().to_owned(),
            ));
        }
        Ok(Lease {
            id: resp.id(),
            ttl: ttl_from_etcd(resp.ttl()),
        })
    }

    async fn lease_keep_alive(&self, id: LeaseId) -> Result<Duration, StoreError> {
        let mut lease = self.lease.clone();
        // etcd-client's keep_alive renews once and keeps that answer's TTL to
        // itself; renew once more on the same stream to read it.
        let result = self
            .timed(async {
                let (mut keeper, mut stream) = lease.keep_alive(id).await?;
                keeper.keep_alive().await?;
                stream.message().await
            })
            .await;
        match result {
            Ok(Some(resp)) if resp.ttl() > 0 => Ok(ttl_from_etcd(resp.ttl())),
            Ok(Some(_)) | Err(Failure::Etcd(etcd::Error::LeaseKeepAliveError(_))) => {
                Err(StoreError::LeaseNotFound(id))
            }
            Ok(None) => Err(self.ctx.unavailable(
                &format!("keep lease {id} alive"),
                "etcd closed the keep-alive stream",
            )),
            Err(f) if f.kind() == Kind::LeaseNotFound => Err(StoreError::LeaseNotFound(id)),
            Err(f) => Err(self.ctx.error(&format!("keep lease {id} alive"), f)),
        }
    }

    async fn lease_revoke(&self, id: LeaseId) -> Result<(), StoreError> {
        let mut lease = self.lease.clone();
        match self.timed(lease.revoke(id)).await {
            Ok(_) => Ok(()),
            Err(f) if f.kind() == Kind::LeaseNotFound => Err(StoreError::LeaseNotFound(id)),
            Err(f) => Err(self.ctx.error(&format!("revoke lease {id}"), f)),
        }
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        if revision <= 0 {
            return Ok(());
        }
        let what = format!("compact to revision {revision}");
        let mut kv = self.kv.clone();
        match self.timed(kv.compact(revision, None)).await {
            Ok(_) => {
                self.known_compact.fetch_max(revision, Ordering::Relaxed);
                Ok(())
            }
            // Already compacted there: nothing to do, as the trait says.
            Err(f) if f.kind() == Kind::Compacted => Ok(()),
            Err(f) if f.kind() == Kind::FutureRevision => Err(StoreError::FutureRevision {
                requested: revision,
                current: self.current_revision(&what).await?,
            }),
            Err(f) => Err(self.ctx.error(&what, f)),
        }
    }

    async fn status(&self) -> Result<StoreStatus, StoreError> {
        let revision = self.current_revision("status").await?;
        let compact_revision = self.compact_revision(revision).await?;
        let mut location = self.ctx.endpoints.clone();
        if !self.ctx.namespace.is_empty() {
            location.push_str(&format!(
                " (namespace {:?})",
                String::from_utf8_lossy(&self.ctx.namespace)
            ));
        }
        Ok(StoreStatus {
            kind: "etcd",
            revision,
            compact_revision,
            location,
        })
    }
}

/// Why a watch ended.
enum End {
    /// etcd cancelled it because the history it needs is compacted.
    Compacted(Revision),
    /// etcd cancelled it for another reason.
    Cancelled(String),
    /// The stream ended or broke.
    Broken(String),
    /// A response could not be decoded.
    Invalid(StoreError),
}

/// A watch in progress: etcd's stream, split into one batch per revision.
struct LiveWatch {
    stream: etcd::WatchStream,
    ctx: Arc<Ctx>,
    pending: VecDeque<WatchBatch>,
    end: Option<End>,
    /// The revision a re-watch would start from.
    next: Revision,
    finished: bool,
}

impl LiveWatch {
    /// Takes in one etcd response: its events as batches, and whether it ends
    /// the watch.
    fn absorb(&mut self, resp: &etcd::WatchResponse) {
        for event in resp.events() {
            match self.event(event) {
                Ok((revision, event)) => match self.pending.back_mut() {
                    Some(batch) if batch.revision == revision => batch.events.push(event),
                    _ => self.pending.push_back(WatchBatch {
                        revision,
                        events: vec![event],
                    }),
                },
                Err(e) => {
                    self.end = Some(End::Invalid(e));
                    return;
                }
            }
        }
        if resp.canceled() {
            self.end = Some(if resp.compact_revision() > 0 {
                End::Compacted(resp.compact_revision())
            } else {
                End::Cancelled(resp.cancel_reason().to_owned())
            });
        }
    }

    fn event(&self, event: &etcd::Event) -> Result<(Revision, WatchEvent), StoreError> {
        let kv = event.kv().ok_or_else(|| {
            StoreError::backend("decoding a watch event from etcd", "event without a key")
        })?;
        let kv = self.ctx.decode(kv)?;
        let prev_kv = event.prev_kv().map(|kv| self.ctx.decode(kv)).transpose()?;
        let kind = match event.event_type() {
            etcd::EventType::Put => EventKind::Put,
            etcd::EventType::Delete => EventKind::Delete,
        };
        Ok((kv.mod_revision, WatchEvent { kind, kv, prev_kv }))
    }

    fn end_error(&self, end: End) -> StoreError {
        let next = self.next;
        match end {
            End::Compacted(compact_revision) => StoreError::Compacted {
                requested: next,
                compact_revision,
            },
            End::Cancelled(reason) => self.ctx.unavailable(
                "watch",
                format!("etcd cancelled the watch ({reason}); re-watch from revision {next}"),
            ),
            End::Broken(detail) => self
                .ctx
                .unavailable("watch", format!("{detail}; re-watch from revision {next}")),
            End::Invalid(e) => e,
        }
    }

    fn into_stream(
        self,
    ) -> impl futures::Stream<Item = Result<WatchBatch, StoreError>> + Send + 'static {
        futures::stream::unfold(self, |mut live| async move {
            loop {
                if let Some(batch) = live.pending.pop_front() {
                    live.next = batch.revision + 1;
                    return Some((Ok(batch), live));
                }
                if live.finished {
                    return None;
                }
                if let Some(end) = live.end.take() {
                    live.finished = true;
                    let error = live.end_error(end);
                    return Some((Err(error), live));
                }
                match live.stream.message().await {
                    Ok(Some(resp)) => live.absorb(&resp),
                    Ok(None) => {
                        live.end = Some(End::Broken("etcd closed the watch stream".into()));
                    }
                    Err(e) => {
                        live.end = Some(End::Broken(format!("the watch stream broke: {e}")));
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn keys_are_namespaced() {
        let ctx = Ctx {
            namespace: b"/ns".to_vec(),
            endpoints: "http://127.0.0.1:2379".into(),
        };
        assert_eq!(ctx.full_key("/a").ok(), Some(b"/ns/a".to_vec()));
        assert!(matches!(
            ctx.full_key(""),
            Err(StoreError::InvalidArgument(_))
        ));
        assert_eq!(ctx.prefix_range(""), (b"/ns".to_vec(), b"/nt".to_vec()));
        assert_eq!(
            ctx.prefix_range("/p/"),
            (b"/ns/p/".to_vec(), b"/ns/p0".to_vec())
        );
        let bare = Ctx {
            namespace: Vec::new(),
            endpoints: String::new(),
        };
        assert_eq!(bare.prefix_range(""), (vec![0], vec![0]));
    }

    #[test]
    fn ttls_are_whole_seconds() {
        assert_eq!(lease_ttl_secs(Duration::from_millis(1)).ok(), Some(1));
        assert_eq!(lease_ttl_secs(Duration::from_millis(1000)).ok(), Some(1));
        assert_eq!(lease_ttl_secs(Duration::from_millis(1500)).ok(), Some(2));
        assert!(lease_ttl_secs(Duration::ZERO).is_err());
        assert!(lease_ttl_secs(Duration::from_secs(MAX_LEASE_TTL_SECS + 1)).is_err());
    }
}
