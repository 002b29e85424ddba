//! The conformance suite: every property of the [`Store`] contract, as tests
//! that run unchanged against any implementation.
//!
//! Each property is a public async function `(store, prefix) -> Result<(),
//! String>` that only touches keys under `prefix`, so that several tests can
//! share one store (one etcd server) at the same time. Because other tests may
//! write concurrently, revisions are asserted robustly: keys written by one
//! transaction share its revision, revisions grow strictly, a failed compare
//! leaves the key's `mod_revision` unchanged. Properties that need the store
//! to themselves (exact `+1` revision deltas, compaction, which is global) are
//! the macro's `exclusive` list; they ask the factory for a store of their own
//! ([`TestSpec::needs_exclusive`]) and are skipped when the fixture is not
//! [`Fixture::exclusive`].
//!
//! [`store_conformance_tests!`](crate::store_conformance_tests) expands to one
//! `#[tokio::test]` per property, given a factory:
//!
//! ```text
//! async fn fixture(spec: sextant_store::conformance::TestSpec) -> sextant_store::conformance::Fixture {
//!     let dir = tempfile::tempdir().expect("tempdir");
//!     let store = EmbeddedStore::open(dir.path()).expect("open");
//!     Fixture::exclusive(Arc::new(store), format!("/conformance/{}/", spec.name)).with_guard(dir)
//! }
//! sextant_store::store_conformance_tests!(fixture);
//! ```
//!
//! The crate using the macro needs `tokio` (with `macros` and
//! `rt-multi-thread`) among its (dev-)dependencies.
//!
//! What the suite assumes of an implementation beyond the trait's docs:
//! `watch` returns once the watch is in place (a write made after it returns
//! is seen); a lease may be granted a longer TTL than asked (etcd's minimum),
//! and the waits follow the granted TTL; each test leaves its prefix empty
//! when it passes (the runner deletes it).

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;

use crate::{
    Compare, CompareOp, CompareTarget, EventKind, KeyValue, OpResponse, Revision, Store,
    StoreError, Txn, TxnOp, WatchBatch, WatchStream,
};

/// What a test needs from a fixture; passed to the factory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestSpec {
    /// The test's name (a function of this module), for a unique prefix.
    pub name: &'static str,
    /// Whether the test needs the store to itself (exact revision deltas,
    /// compaction).
    /// A factory may then give a dedicated store; if it does not, the test is
    /// skipped.
    pub needs_exclusive: bool,
}

/// A store to test, and where the test may write.
pub struct Fixture {
    pub store: Arc<dyn Store>,
    /// Unique to this test; every key the test touches starts with it.
    pub prefix: String,
    /// Whether nothing else writes to (or compacts) this store during the
    /// test: enables exact revision deltas and compaction tests.
    pub exclusive: bool,
    /// Anything to keep alive until the test ends (a temporary directory, a
    /// server handle).
    pub guard: Option<Box<dyn Any + Send>>,
}

impl Fixture {
    /// A store used by this test only.
    pub fn exclusive(store: Arc<dyn Store>, prefix: impl Into<String>) -> Self {
        Self {
            store,
            prefix: prefix.into(),
            exclusive: true,
            guard: None,
        }
    }

    /// A store other tests may use at the same time.
    pub fn shared(store: Arc<dyn Store>, prefix: impl Into<String>) -> Self {
        Self {
            exclusive: false,
            ..Self::exclusive(store, prefix)
        }
    }

    /// Keeps `guard` alive until the test ends.
    pub fn with_guard(mut self, guard: impl Any + Send) -> Self {
        self.guard = Some(Box::new(guard));
        self
    }
}

impl fmt::Debug for Fixture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fixture")
            .field("prefix", &self.prefix)
            .field("exclusive", &self.exclusive)
            .finish_non_exhaustive()
    }
}

/// The result of one property.
pub type Outcome = Result<(), String>;

/// How long a test waits for something that should happen (an event).
const WAIT: Duration = Duration::from_secs(5);

/// Cleans up after a test run by the macro, then fails the test with a clear
/// message if the property did not hold.
pub async fn finish(spec: TestSpec, fixture: Fixture, outcome: Outcome) {
    let cleanup = fixture
        .store
        .txn(Txn::new().and_then([TxnOp::DeletePrefix {
            prefix: fixture.prefix.clone(),
        }]))
        .await;
    drop(fixture);
    if let Err(message) = outcome {
        panic!("store conformance: {} failed: {message}", spec.name);
    }
    if let Err(error) = cleanup {
        panic!(
            "store conformance: {} passed but cleaning up its prefix failed: {error}",
            spec.name
        );
    }
}

/// Runs one property against a fixture made by `factory` (used by the macro).
pub async fn run<F, Fut, P, PFut>(spec: TestSpec, factory: F, property: P)
where
    F: FnOnce(TestSpec) -> Fut,
    Fut: Future<Output = Fixture>,
    P: FnOnce(Arc<dyn Store>, String) -> PFut,
    PFut: Future<Output = Outcome>,
{
    let fixture = factory(spec).await;
    if spec.needs_exclusive && !fixture.exclusive {
        eprintln!(
            "store conformance: skipping {}: it needs a store of its own",
            spec.name
        );
        return;
    }
    let outcome = property(Arc::clone(&fixture.store), fixture.prefix.clone()).await;
    finish(spec, fixture, outcome).await;
}

/// Expands to one `#[tokio::test]` per conformance property. The argument is
/// a factory: anything callable as `factory(TestSpec)` returning a future of
/// [`Fixture`] (an `async fn`, or a closure returning an `async` block).
#[macro_export]
macro_rules! store_conformance_tests {
    ($factory:expr) => {
        $crate::store_conformance_tests!(@each $factory; shared:
            txn_writes_share_one_revision,
            key_create_mod_revision_and_version,
            compare_on_version,
            compare_on_create_revision,
            compare_on_mod_revision,
            compare_on_value,
            compare_and_swap,
            failed_compare_changes_nothing,
            txn_reads_see_earlier_writes,
            prefix_reads_are_sorted_byte_prefixes,
            delete_prefix_deletes_in_one_revision,
            empty_keys_are_rejected,
            duplicate_keys_in_txn_are_rejected,
            watch_replays_history_then_live,
            watch_has_no_gap_or_duplicate_under_writes,
            watch_from_zero_sees_only_new_revisions,
            watch_groups_events_per_revision,
            watch_delete_events_carry_prev_kv,
            lease_grant_rounds_ttl,
            lease_expiry_deletes_keys_with_events,
            lease_keep_alive_keeps_keys,
            lease_revoke_deletes_keys,
            put_with_unknown_lease_writes_nothing,
            put_without_lease_detaches_key,
            compact_to_future_revision_fails,
            status_reports_position,
        );
        $crate::store_conformance_tests!(@each $factory; exclusive:
            revision_grows_by_one_per_writing_txn,
            watch_from_compacted_revision_fails,
        );
    };
    (@each $factory:expr; $mode:ident: $($name:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let spec = $crate::conformance::TestSpec {
                    name: stringify!($name),
                    needs_exclusive: $crate::store_conformance_tests!(@exclusive $mode),
                };
                $crate::conformance::run(spec, $factory, |store, prefix| async move {
                    $crate::conformance::$name(&*store, &prefix).await
                })
                .await;
            }
        )*
    };
    (@exclusive shared) => { false };
    (@exclusive exclusive) => { true };
}

// ---------------------------------------------------------------------------
// Assertion helpers.

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

macro_rules! ensure_eq {
    ($left:expr, $right:expr, $($msg:tt)+) => {
        match (&$left, &$right) {
            (left, right) => {
                if left != right {
                    return Err(format!(
                        "{}: expected {:?}, got {:?}",
                        format!($($msg)+),
                        right,
                        left
                    ));
                }
            }
        }
    };
}

/// Adds what was being done to a store error.
trait Context<T> {
    fn ctx(self, what: &str) -> Result<T, String>;
}

impl<T> Context<T> for Result<T, StoreError> {
    fn ctx(self, what: &str) -> Result<T, String> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

fn key(prefix: &str, name: &str) -> String {
    format!("{prefix}{name}")
}

async fn get(store: &dyn Store, key: &str) -> Result<Option<KeyValue>, String> {
    let resp = store.get(key).await.ctx(&format!("get {key}"))?;
    ensure!(
        resp.kvs.len() <= 1,
        "get {key} returned {} keys",
        resp.kvs.len()
    );
    Ok(resp.kvs.into_iter().next())
}

async fn must_get(store: &dyn Store, key: &str) -> Result<KeyValue, String> {
    get(store, key)
        .await?
        .ok_or_else(|| format!("key {key} should exist but does not"))
}

async fn put(store: &dyn Store, key: &str, value: &str) -> Result<Revision, String> {
    store
        .put(key, value.as_bytes().to_vec())
        .await
        .ctx(&format!("put {key}"))
}

fn put_leased(key: &str, value: &str, lease: i64) -> TxnOp {
    TxnOp::Put {
        key: key.to_owned(),
        value: value.as_bytes().to_vec(),
        lease: Some(lease),
    }
}

async fn next_batch(stream: &mut WatchStream, what: &str) -> Result<WatchBatch, String> {
    match tokio::time::timeout(WAIT, stream.next()).await {
        Err(_) => Err(format!("timed out after {WAIT:?} waiting for {what}")),
        Ok(None) => Err(format!("watch stream ended while waiting for {what}")),
        Ok(Some(Err(e))) => Err(format!("watch failed while waiting for {what}: {e}")),
        Ok(Some(Ok(batch))) => Ok(batch),
    }
}

/// Checks that nothing arrives on a watch for a short while.
async fn expect_quiet(stream: &mut WatchStream, what: &str) -> Outcome {
    match tokio::time::timeout(Duration::from_millis(200), stream.next()).await {
        Err(_) => Ok(()),
        Ok(other) => Err(format!("{what}: expected no watch event, got {other:?}")),
    }
}

fn events_summary(batch: &WatchBatch) -> Vec<(EventKind, String)> {
    batch
        .events
        .iter()
        .map(|e| (e.kind, e.kv.key.clone()))
        .collect()
}

async fn check_compare(store: &dyn Store, compare: Compare, expected: bool) -> Outcome {
    let what = format!("{compare:?}");
    let resp = store
        .txn(Txn::new().when([compare.clone()]).and_then([TxnOp::Get {
            key: compare.key.clone(),
        }]))
        .await
        .ctx(&what)?;
    ensure_eq!(resp.succeeded, expected, "compare {what}");
    let expected_responses = usize::from(expected);
    ensure_eq!(
        resp.responses.len(),
        expected_responses,
        "responses of the applied branch of {what}"
    );
    Ok(())
}

fn cmp(key: &str, op: CompareOp, target: CompareTarget) -> Compare {
    Compare {
        key: key.to_owned(),
        op,
        target,
    }
}

// ---------------------------------------------------------------------------
// Revisions and key metadata.

/// Every key written by one transaction carries the transaction's revision;
/// revisions grow strictly.
pub async fn txn_writes_share_one_revision(store: &dyn Store, prefix: &str) -> Outcome {
    let (a, b, c) = (key(prefix, "a"), key(prefix, "b"), key(prefix, "c"));
    let seed = put(store, &key(prefix, "seed"), "0").await?;
    let resp = store
        .txn(Txn::new().and_then([
            TxnOp::put(&a, "1"),
            TxnOp::put(&b, "1"),
            TxnOp::put(&c, "1"),
        ]))
        .await
        .ctx("three-put txn")?;
    ensure!(resp.succeeded, "a txn without compares must succeed");
    ensure!(
        resp.revision > seed,
        "txn revision {} is not above the earlier write's {seed}",
        resp.revision
    );
    for k in [&a, &b, &c] {
        let kv = must_get(store, k).await?;
        ensure_eq!(kv.mod_revision, resp.revision, "mod_revision of {k}");
        ensure_eq!(kv.create_revision, resp.revision, "create_revision of {k}");
    }
    let later = put(store, &a, "2").await?;
    ensure!(
        later > resp.revision,
        "a later put got revision {later}, not above {}",
        resp.revision
    );
    let read = store.get(&a).await.ctx("get a")?;
    ensure!(
        read.revision >= later,
        "a read after a write at {later} reports store revision {}",
        read.revision
    );
    let kvs = store.get_prefix(prefix).await.ctx("get prefix")?;
    ensure!(
        kvs.revision >= later,
        "a prefix read after a write at {later} reports store revision {}",
        kvs.revision
    );
    Ok(())
}

/// The global revision grows by exactly one per writing transaction, and not
/// at all for read-only, failed or no-op ones. Needs an exclusive store.
pub async fn revision_grows_by_one_per_writing_txn(store: &dyn Store, prefix: &str) -> Outcome {
    let (a, b) = (key(prefix, "a"), key(prefix, "b"));
    let status = |what: &'static str| async move {
        store
            .status()
            .await
            .map(|s| s.revision)
            .map_err(|e| format!("status ({what}): {e}"))
    };
    let r0 = status("start").await?;
    ensure_eq!(
        put(store, &a, "1").await?,
        r0 + 1,
        "revision of a first put"
    );
    let multi = store
        .txn(Txn::new().and_then([TxnOp::put(&a, "2"), TxnOp::put(&b, "2")]))
        .await
        .ctx("two-put txn")?;
    ensure_eq!(multi.revision, r0 + 2, "revision of a two-put txn");
    let read_only = store
        .txn(Txn::new().and_then([
            TxnOp::Get { key: a.clone() },
            TxnOp::GetPrefix {
                prefix: prefix.to_owned(),
            },
        ]))
        .await
        .ctx("read-only txn")?;
    ensure_eq!(read_only.revision, r0 + 2, "revision after a read-only txn");
    let failed = store
        .txn(
            Txn::new()
                .when([Compare::absent(&a)])
                .and_then([TxnOp::put(&a, "3")]),
        )
        .await
        .ctx("failed txn")?;
    ensure!(
        !failed.succeeded,
        "compare on an existing key as absent held"
    );
    ensure_eq!(failed.revision, r0 + 2, "revision after a failed txn");
    let existed = store
        .delete(&key(prefix, "missing"))
        .await
        .ctx("delete missing")?;
    ensure!(!existed, "delete of a missing key reported it existed");
    let no_op = store
        .txn(Txn::new().and_then([TxnOp::DeletePrefix {
            prefix: key(prefix, "nothing/"),
        }]))
        .await
        .ctx("delete of an empty prefix")?;
    ensure_eq!(no_op.revision, r0 + 2, "revision after deleting nothing");
    let lease = store
        .lease_grant(Duration::from_secs(10))
        .await
        .ctx("lease grant")?;
    ensure_eq!(
        status("after lease grant").await?,
        r0 + 2,
        "revision after a lease grant"
    );
    store
        .lease_revoke(lease.id)
        .await
        .ctx("revoke a lease without keys")?;
    ensure_eq!(
        status("after revoking an unused lease").await?,
        r0 + 2,
        "revision after revoking a lease without keys"
    );
    ensure!(
        store.delete(&a).await.ctx("delete a")?,
        "delete of a existing key reported it missing"
    );
    ensure_eq!(
        status("after delete").await?,
        r0 + 3,
        "revision after a delete"
    );
    Ok(())
}

/// create_revision, mod_revision and version, and their reset by a delete.
pub async fn key_create_mod_revision_and_version(store: &dyn Store, prefix: &str) -> Outcome {
    let a = key(prefix, "a");
    ensure!(
        get(store, &a).await?.is_none(),
        "{a} exists before the test"
    );
    let r1 = put(store, &a, "v1").await?;
    let kv = must_get(store, &a).await?;
    ensure_eq!(
        kv,
        KeyValue {
            key: a.clone(),
            value: b"v1".to_vec(),
            create_revision: r1,
            mod_revision: r1,
            version: 1,
            lease: None,
        },
        "key after its first put"
    );
    let resp = store
        .txn(Txn::new().and_then([TxnOp::put(&a, "v2")]))
        .await
        .ctx("second put")?;
    let r2 = resp.revision;
    ensure_eq!(
        resp.responses,
        vec![OpResponse::Put { prev: Some(kv) }],
        "response of a put over an existing key"
    );
    let kv = must_get(store, &a).await?;
    ensure_eq!(
        (kv.create_revision, kv.mod_revision, kv.version, kv.value),
        (r1, r2, 2, b"v2".to_vec()),
        "(create, mod, version, value) after the second put"
    );
    let r3 = put(store, &a, "v3").await?;
    let kv = must_get(store, &a).await?;
    ensure_eq!(
        (kv.create_revision, kv.mod_revision, kv.version),
        (r1, r3, 3),
        "(create, mod, version) after the third put"
    );
    ensure!(
        store.delete(&a).await.ctx("delete")?,
        "delete of an existing key reported it missing"
    );
    ensure!(
        get(store, &a).await?.is_none(),
        "{a} still exists after its delete"
    );
    let r4 = put(store, &a, "v4").await?;
    ensure!(r4 > r3, "revision {r4} after delete is not above {r3}");
    let kv = must_get(store, &a).await?;
    ensure_eq!(
        (kv.create_revision, kv.mod_revision, kv.version),
        (r4, r4, 1),
        "(create, mod, version) after re-creating a deleted key"
    );
    let fresh = store
        .txn(Txn::new().and_then([TxnOp::put(key(prefix, "b"), "x")]))
        .await
        .ctx("put of a new key")?;
    ensure_eq!(
        fresh.responses,
        vec![OpResponse::Put { prev: None }],
        "response of a put of a new key"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Compares and transactions.

/// Compares on a key's version, existing and missing (version 0).
pub async fn compare_on_version(store: &dyn Store, prefix: &str) -> Outcome {
    let a = key(prefix, "a");
    let missing = key(prefix, "missing");
    put(store, &a, "1").await?;
    put(store, &a, "2").await?;
    use CompareOp::*;
    let v = CompareTarget::Version;
    for (op, target, expected) in [
        (Equal, 2, true),
        (Equal, 1, false),
        (NotEqual, 1, true),
        (NotEqual, 2, false),
        (Greater, 1, true),
        (Greater, 2, false),
        (Less, 3, true),
        (Less, 2, false),
    ] {
        check_compare(store, cmp(&a, op, v(target)), expected).await?;
    }
    for (op, target, expected) in [
        (Equal, 0, true),
        (NotEqual, 0, false),
        (Greater, 0, false),
        (Less, 1, true),
    ] {
        check_compare(store, cmp(&missing, op, v(target)), expected).await?;
    }
    check_compare(store, Compare::absent(&missing), true).await?;
    check_compare(store, Compare::absent(&a), false).await?;
    Ok(())
}

/// Compares on a key's create revision, existing and missing (0).
pub async fn compare_on_create_revision(store: &dyn Store, prefix: &str) -> Outcome {
    let a = key(prefix, "a");
    let missing = key(prefix, "missing");
    let created = put(store, &a, "1").await?;
    put(store, &a, "2").await?;
    use CompareOp::*;
    let c = CompareTarget::CreateRevision;
    for (op, target, expected) in [
        (Equal, created, true),
        (Equal, created + 1, false),
        (NotEqual, created + 1, true),
        (NotEqual, created, false),
        (Greater, created - 1, true),
        (Greater, created, false),
        (Less, created + 1, true),
        (Less, created, false),
    ] {
        check_compare(store, cmp(&a, op, c(target)), expected).await?;
    }
    for (op, target, expected) in [(Equal, 0, true), (Greater, 0, false), (Less, 1, true)] {
        check_compare(store, cmp(&missing, op, c(target)), expected).await?;
    }
    Ok(())
}

/// Compares on a key's mod revision, existing and missing (0).
pub async fn compare_on_mod_revision(store: &dyn Store, prefix: &str) -> Outcome {
    let a = key(prefix, "a");
    let missing = key(prefix, "missing");
    let created = put(store, &a, "1").await?;
    let modified = put(store, &a, "2").await?;
    use CompareOp::*;
    let m = CompareTarget::ModRevision;
    for (op, target, expected) in [
        (Equal, modified, true),
        (Equal, created, false),
        (NotEqual, created, true),
        (NotEqual, modified, false),
        (Greater, created, true),
        (Greater, modified, false),
        (Less, modified + 1, true),
        (Less, modified, false),
    ] {
        check_compare(store, cmp(&a, op, m(target)), expected).await?;
    }
    for (op, target, expected) in [(Equal, 0, true), (NotEqual, 0, false), (Less, 1, true)] {
        check_compare(store, cmp(&missing, op, m(target)), expected).await?;
    }
    check_compare(store, Compare::mod_revision(&a, modified), true).await?;
    check_compare(store, Compare::mod_revision(&missing, 0), true).await?;
    Ok(())
}

/// Compares on a key's value (byte order); a missing key never compares true.
pub async fn compare_on_value(store: &dyn Store, prefix: &str) -> Outcome {
    let a = key(prefix, "a");
    let missing = key(prefix, "missing");
    put(store, &a, "m").await?;
    use CompareOp::*;
    let val = |s: &str| CompareTarget::Value(s.as_bytes().to_vec());
    for (op, target, expected) in [
        (Equal, "m", true),
        (Equal, "n", false),
        (NotEqual, "n", true),
        (NotEqual, "m", false),
        (Greater, "a", true),
        (Greater, "m", false),
        (Less, "z", true),
        (Less, "m", false),
        (Less, "mm", true),
    ] {
        check_compare(store, cmp(&a, op, val(target)), expected).await?;
    }
    for (op, target) in [(Equal, ""), (NotEqual, "x"), (Greater, ""), (Less, "zz")] {
        check_compare(store, cmp(&missing, op, val(target)), false).await?;
    }
    check_compare(store, Compare::value(&a, "m"), true).await?;
    Ok(())
}

/// Compare-and-swap: the success branch applies when every compare holds,
/// the failure branch otherwise.
pub async fn compare_and_swap(store: &dyn Store, prefix: &str) -> Outcome {
    let a = key(prefix, "a");
    let create = |value: &'static str| {
        Txn::new()
            .when([Compare::absent(&a)])
            .and_then([TxnOp::put(&a, value)])
            .or_else([TxnOp::Get { key: a.clone() }])
    };
    let first = store.txn(create("1")).await.ctx("create if absent")?;
    ensure!(first.succeeded, "create-if-absent of a missing key failed");
    let r1 = first.revision;
    ensure_eq!(
        must_get(store, &a).await?.mod_revision,
        r1,
        "mod_revision after create"
    );
    let second = store
        .txn(create("2"))
        .await
        .ctx("create if absent, again")?;
    ensure!(
        !second.succeeded,
        "create-if-absent of an existing key succeeded"
    );
    let current = must_get(store, &a).await?;
    ensure_eq!(
        second.responses,
        vec![OpResponse::Get {
            kvs: vec![current.clone()]
        }],
        "failure branch of create-if-absent"
    );
    ensure_eq!(
        (current.value, current.mod_revision),
        (b"1".to_vec(), r1),
        "(value, mod_revision) after a failed create-if-absent"
    );

    let swap = |rev: Revision, value: &'static str| {
        Txn::new()
            .when([Compare::mod_revision(&a, rev)])
            .and_then([TxnOp::put(&a, value)])
    };
    let third = store.txn(swap(r1, "3")).await.ctx("swap at r1")?;
    ensure!(third.succeeded, "swap at the current mod_revision failed");
    let stale = store
        .txn(swap(r1, "4"))
        .await
        .ctx("swap at a stale revision")?;
    ensure!(!stale.succeeded, "swap at a stale mod_revision succeeded");
    let kv = must_get(store, &a).await?;
    ensure_eq!(
        (kv.value, kv.mod_revision),
        (b"3".to_vec(), third.revision),
        "(value, mod_revision) after a stale swap"
    );
    let by_value = store
        .txn(
            Txn::new()
                .when([
                    Compare::value(&a, "3"),
                    Compare::mod_revision(&a, third.revision),
                ])
                .and_then([TxnOp::put(&a, "5")]),
        )
        .await
        .ctx("swap on value and revision")?;
    ensure!(by_value.succeeded, "swap with two holding compares failed");
    ensure_eq!(
        must_get(store, &a).await?.value,
        b"5".to_vec(),
        "value after the last swap"
    );
    Ok(())
}

/// A failed compare applies nothing of the success branch; every compare
/// must hold (AND); the failure branch is applied instead.
pub async fn failed_compare_changes_nothing(store: &dyn Store, prefix: &str) -> Outcome {
    let (a, b, c) = (key(prefix, "a"), key(prefix, "b"), key(prefix, "c"));
    let d1 = key(prefix, "d/1");
    put(store, &a, "orig").await?;
    put(store, &c, "keep").await?;
    put(store, &d1, "keep").await?;
    let before_a = must_get(store, &a).await?;
    let before_c = must_get(store, &c).await?;
    let before_d1 = must_get(store, &d1).await?;
    let resp = store
        .txn(Txn::new().when([Compare::value(&a, "other")]).and_then([
            TxnOp::put(&a, "new"),
            TxnOp::put(&b, "new"),
            TxnOp::delete(&c),
            TxnOp::DeletePrefix {
                prefix: key(prefix, "d/"),
            },
        ]))
        .await
        .ctx("txn with a failing compare")?;
    ensure!(!resp.succeeded, "a compare on a different value held");
    ensure!(
        resp.responses.is_empty(),
        "an empty failure branch returned {:?}",
        resp.responses
    );
    ensure_eq!(
        must_get(store, &a).await?,
        before_a,
        "{a} after a failed txn"
    );
    ensure_eq!(get(store, &b).await?, None, "{b} after a failed txn");
    ensure_eq!(
        must_get(store, &c).await?,
        before_c,
        "{c} after a failed txn"
    );
    ensure_eq!(
        must_get(store, &d1).await?,
        before_d1,
        "{d1} after a failed txn"
    );

    let both = store
        .txn(
            Txn::new()
                .when([Compare::value(&a, "orig"), Compare::absent(&a)])
                .and_then([TxnOp::put(&b, "new")])
                .or_else([TxnOp::put(&b, "from failure branch")]),
        )
        .await
        .ctx("txn with one holding and one failing compare")?;
    ensure!(!both.succeeded, "a txn with one failing compare succeeded");
    let kv = must_get(store, &b).await?;
    ensure_eq!(
        (kv.value, kv.mod_revision),
        (b"from failure branch".to_vec(), both.revision),
        "(value, mod_revision) of the failure branch's put"
    );
    ensure_eq!(
        must_get(store, &a).await?,
        before_a,
        "{a} after the failure branch"
    );
    Ok(())
}

/// Reads inside a branch see the writes made earlier in the same branch.
pub async fn txn_reads_see_earlier_writes(store: &dyn Store, prefix: &str) -> Outcome {
    let (a, x) = (key(prefix, "a"), key(prefix, "x"));
    put(store, &x, "old").await?;
    let old_x = must_get(store, &x).await?;
    let resp = store
        .txn(Txn::new().and_then([
            TxnOp::Get { key: a.clone() },
            TxnOp::put(&a, "1"),
            TxnOp::Get { key: a.clone() },
            TxnOp::delete(&x),
            TxnOp::Get { key: x.clone() },
            TxnOp::GetPrefix {
                prefix: prefix.to_owned(),
            },
        ]))
        .await
        .ctx("txn mixing reads and writes")?;
    let rev = resp.revision;
    let new_a = KeyValue {
        key: a.clone(),
        value: b"1".to_vec(),
        create_revision: rev,
        mod_revision: rev,
        version: 1,
        lease: None,
    };
    ensure_eq!(
        resp.responses,
        vec![
            OpResponse::Get { kvs: vec![] },
            OpResponse::Put { prev: None },
            OpResponse::Get {
                kvs: vec![new_a.clone()]
            },
            OpResponse::Delete {
                deleted: vec![old_x]
            },
            OpResponse::Get { kvs: vec![] },
            OpResponse::Get {
                kvs: vec![new_a.clone()]
            },
        ],
        "responses of a branch reading its own writes"
    );
    ensure_eq!(must_get(store, &a).await?, new_a, "{a} after the txn");
    Ok(())
}

// ---------------------------------------------------------------------------
// Prefix reads and deletes.

/// Prefix reads return keys sorted; a prefix is a plain byte prefix (`p/a`
/// matches `p/ab` as well as `p/a/b`).
pub async fn prefix_reads_are_sorted_byte_prefixes(store: &dyn Store, prefix: &str) -> Outcome {
    let names = ["b", "ab", "a/b", "a", "a0", "B"];
    for name in names {
        put(store, &key(prefix, name), name).await?;
    }
    let keys = |kvs: &[KeyValue]| kvs.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>();
    let expect = |names: &[&str]| names.iter().map(|n| key(prefix, n)).collect::<Vec<_>>();

    let all = store.get_prefix(prefix).await.ctx("get the whole prefix")?;
    ensure_eq!(
        keys(&all.kvs),
        expect(&["B", "a", "a/b", "a0", "ab", "b"]),
        "keys under {prefix}, in byte order"
    );
    for kv in &all.kvs {
        ensure!(
            kv.value == kv.key.as_bytes()[prefix.len()..],
            "value of {} is {:?}",
            kv.key,
            kv.value
        );
    }
    let under_a = store
        .get_prefix(&key(prefix, "a"))
        .await
        .ctx("get prefix a")?;
    ensure_eq!(
        keys(&under_a.kvs),
        expect(&["a", "a/b", "a0", "ab"]),
        "keys under the byte prefix {prefix}a"
    );
    let under_a_slash = store
        .get_prefix(&key(prefix, "a/"))
        .await
        .ctx("get prefix a/")?;
    ensure_eq!(
        keys(&under_a_slash.kvs),
        expect(&["a/b"]),
        "keys under {prefix}a/"
    );
    let none = store
        .get_prefix(&key(prefix, "zzz"))
        .await
        .ctx("get prefix zzz")?;
    ensure!(
        none.kvs.is_empty(),
        "a prefix without keys returned {:?}",
        keys(&none.kvs)
    );

    let one = store.get(&key(prefix, "a")).await.ctx("get a")?;
    ensure_eq!(
        keys(&one.kvs),
        expect(&["a"]),
        "get of one key returns only it"
    );
    ensure!(
        get(store, &key(prefix, "c")).await?.is_none(),
        "a missing key was found"
    );

    let in_txn = store
        .txn(Txn::new().and_then([TxnOp::GetPrefix {
            prefix: key(prefix, "a"),
        }]))
        .await
        .ctx("GetPrefix in a txn")?;
    ensure_eq!(
        in_txn.responses,
        vec![OpResponse::Get { kvs: under_a.kvs }],
        "GetPrefix in a txn"
    );
    Ok(())
}

/// DeletePrefix deletes every key under the prefix in one revision and
/// returns them; keys beside the prefix stay.
pub async fn delete_prefix_deletes_in_one_revision(store: &dyn Store, prefix: &str) -> Outcome {
    for name in ["d/1", "d/2", "d/3", "d0", "e"] {
        put(store, &key(prefix, name), name).await?;
    }
    let before = store
        .get_prefix(&key(prefix, "d/"))
        .await
        .ctx("get d/")?
        .kvs;
    let resp = store
        .txn(Txn::new().and_then([TxnOp::DeletePrefix {
            prefix: key(prefix, "d/"),
        }]))
        .await
        .ctx("delete prefix d/")?;
    ensure_eq!(
        resp.responses,
        vec![OpResponse::Delete { deleted: before }],
        "keys returned by DeletePrefix"
    );
    let left = store.get_prefix(prefix).await.ctx("get prefix")?;
    let left: Vec<String> = left.kvs.into_iter().map(|kv| kv.key).collect();
    ensure_eq!(
        left,
        vec![key(prefix, "d0"), key(prefix, "e")],
        "keys left after DeletePrefix"
    );
    let none = store
        .txn(Txn::new().and_then([TxnOp::DeletePrefix {
            prefix: key(prefix, "d/"),
        }]))
        .await
        .ctx("delete an empty prefix")?;
    ensure_eq!(
        none.responses,
        vec![OpResponse::Delete { deleted: vec![] }],
        "DeletePrefix of nothing"
    );
    Ok(())
}

/// Empty keys are rejected with InvalidArgument.
pub async fn empty_keys_are_rejected(store: &dyn Store, prefix: &str) -> Outcome {
    let invalid = |r: Result<(), StoreError>, what: &str| match r {
        Err(StoreError::InvalidArgument(_)) => Ok(()),
        other => Err(format!("{what}: expected InvalidArgument, got {other:?}")),
    };
    invalid(
        store.put("", b"x".to_vec()).await.map(|_| ()),
        "put of an empty key",
    )?;
    invalid(store.get("").await.map(|_| ()), "get of an empty key")?;
    invalid(
        store
            .txn(
                Txn::new()
                    .when([Compare::absent("")])
                    .and_then([TxnOp::put(key(prefix, "a"), "x")]),
            )
            .await
            .map(|_| ()),
        "compare on an empty key",
    )?;
    ensure!(
        get(store, &key(prefix, "a")).await?.is_none(),
        "a rejected txn wrote"
    );
    Ok(())
}

/// As in etcd, a branch may not write a key twice (put twice, or put and
/// delete); such a transaction is rejected and writes nothing.
pub async fn duplicate_keys_in_txn_are_rejected(store: &dyn Store, prefix: &str) -> Outcome {
    let a = key(prefix, "a");
    let other = key(prefix, "other");
    for (what, ops) in [
        (
            "two puts of one key",
            vec![TxnOp::put(&a, "1"), TxnOp::put(&a, "2")],
        ),
        (
            "a delete then a put of one key",
            vec![TxnOp::delete(&a), TxnOp::put(&a, "2")],
        ),
        (
            "a DeletePrefix and a put under it",
            vec![
                TxnOp::put(&other, "x"),
                TxnOp::put(&a, "1"),
                TxnOp::DeletePrefix {
                    prefix: prefix.to_owned(),
                },
            ],
        ),
    ] {
        match store.txn(Txn::new().and_then(ops)).await {
            Err(StoreError::InvalidArgument(_)) => {}
            other => return Err(format!("{what}: expected InvalidArgument, got {other:?}")),
        }
    }
    let left = store.get_prefix(prefix).await.ctx("get prefix")?;
    ensure!(left.kvs.is_empty(), "rejected txns wrote {:?}", left.kvs);
    Ok(())
}

// ---------------------------------------------------------------------------
// Watches.

/// A watch from a past revision replays the history from there, then goes
/// on with live events.
pub async fn watch_replays_history_then_live(store: &dyn Store, prefix: &str) -> Outcome {
    let w = key(prefix, "w/");
    let (w1, w2, w3) = (key(&w, "1"), key(&w, "2"), key(&w, "3"));
    let r1 = put(store, &w1, "a").await?;
    put(store, &key(prefix, "outside"), "x").await?;
    let r2 = put(store, &w2, "b").await?;
    let r3 = store
        .txn(Txn::new().and_then([TxnOp::delete(&w1)]))
        .await
        .ctx("delete w1")?
        .revision;
    let mut stream = store.watch(&w, r1).await.ctx("watch from r1")?;
    for (rev, expected) in [
        (r1, vec![(EventKind::Put, w1.clone())]),
        (r2, vec![(EventKind::Put, w2.clone())]),
        (r3, vec![(EventKind::Delete, w1.clone())]),
    ] {
        let batch = next_batch(&mut stream, &format!("replayed revision {rev}")).await?;
        ensure_eq!(batch.revision, rev, "revision of a replayed batch");
        ensure_eq!(
            events_summary(&batch),
            expected,
            "events of replayed revision {rev}"
        );
    }
    let r4 = put(store, &w3, "c").await?;
    let batch = next_batch(&mut stream, "the live put").await?;
    ensure_eq!(
        (batch.revision, events_summary(&batch)),
        (r4, vec![(EventKind::Put, w3.clone())]),
        "the first live batch"
    );
    ensure_eq!(
        batch.events[0].kv.value,
        b"c".to_vec(),
        "value of the live put"
    );

    // A watch from the middle of the history starts exactly there.
    let mut from_r2 = store.watch(&w, r2).await.ctx("watch from r2")?;
    let first = next_batch(&mut from_r2, "revision r2").await?;
    ensure_eq!(first.revision, r2, "first batch of a watch from r2");
    Ok(())
}

/// A watch opened from a past revision while writes keep coming sees every
/// revision once, in order: no gap between the replay and the live events,
/// and no duplicate.
pub async fn watch_has_no_gap_or_duplicate_under_writes(
    store: &dyn Store,
    prefix: &str,
) -> Outcome {
    const WRITES: usize = 60;
    let w = key(prefix, "w/");
    let start = put(store, &key(&w, "start"), "0").await?;
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let writer = {
        let w = w.clone();
        async move {
            let mut revisions = Vec::with_capacity(WRITES);
            let mut started = Some(started_tx);
            for i in 0..WRITES {
                if i == WRITES / 3 {
                    if let Some(tx) = started.take() {
                        let _ = tx.send(());
                    }
                }
                let rev = put(store, &key(&w, &format!("k{i:03}")), &i.to_string()).await?;
                revisions.push(rev);
                tokio::task::yield_now().await;
            }
            Ok::<_, String>(revisions)
        }
    };
    let watcher = async {
        // Open the watch while the writer is a third of the way through.
        let _ = started_rx.await;
        store.watch(&w, start).await.ctx("watch from start")
    };
    let (written, stream) = tokio::join!(writer, watcher);
    let written = written?;
    let mut stream = stream?;
    let last = *written.last().ok_or("no writes")?;
    let mut seen: Vec<Revision> = Vec::new();
    while seen.last().is_none_or(|&r| r < last) {
        let batch = next_batch(&mut stream, &format!("revision {last}")).await?;
        if let Some(&prev) = seen.last() {
            ensure!(
                batch.revision > prev,
                "batch of revision {} came after revision {prev}",
                batch.revision
            );
        }
        for event in &batch.events {
            ensure_eq!(
                event.kv.mod_revision,
                batch.revision,
                "mod_revision of an event of batch {}",
                batch.revision
            );
        }
        seen.push(batch.revision);
    }
    let mut expected = vec![start];
    expected.extend(&written);
    ensure_eq!(seen, expected, "revisions seen by the watch");
    Ok(())
}

/// A watch from revision 0 starts at the next revision.
pub async fn watch_from_zero_sees_only_new_revisions(store: &dyn Store, prefix: &str) -> Outcome {
    let w = key(prefix, "w/");
    put(store, &key(&w, "old"), "1").await?;
    let mut stream = store.watch(&w, 0).await.ctx("watch from 0")?;
    expect_quiet(&mut stream, "a watch from 0 before any new write").await?;
    let rev = put(store, &key(&w, "new"), "2").await?;
    let batch = next_batch(&mut stream, "the new put").await?;
    ensure_eq!(
        (batch.revision, events_summary(&batch)),
        (rev, vec![(EventKind::Put, key(&w, "new"))]),
        "the first batch of a watch from 0"
    );
    Ok(())
}

/// The events of one revision come as one batch, in the order written, and
/// only those under the watched prefix.
pub async fn watch_groups_events_per_revision(store: &dyn Store, prefix: &str) -> Outcome {
    let w = key(prefix, "w/");
    let mut stream = store.watch(&w, 0).await.ctx("watch")?;
    let resp = store
        .txn(Txn::new().and_then([
            TxnOp::put(key(&w, "b"), "1"),
            TxnOp::put(key(prefix, "outside"), "1"),
            TxnOp::put(key(&w, "a"), "1"),
        ]))
        .await
        .ctx("txn of three puts")?;
    let batch = next_batch(&mut stream, "the txn's batch").await?;
    ensure_eq!(batch.revision, resp.revision, "batch revision");
    ensure_eq!(
        events_summary(&batch),
        vec![
            (EventKind::Put, key(&w, "b")),
            (EventKind::Put, key(&w, "a"))
        ],
        "events of a txn, in order, under the prefix only"
    );
    for event in &batch.events {
        ensure_eq!(
            event.kv.mod_revision,
            resp.revision,
            "mod_revision of {}",
            event.kv.key
        );
        ensure_eq!(
            event.kv.create_revision,
            resp.revision,
            "create_revision of {}",
            event.kv.key
        );
        ensure_eq!(event.kv.version, 1, "version of {}", event.kv.key);
    }
    let r2 = put(store, &key(prefix, "outside"), "2").await?;
    let r3 = put(store, &key(&w, "c"), "1").await?;
    let next = next_batch(&mut stream, "the next put under the prefix").await?;
    ensure!(r3 > r2, "revisions did not grow");
    ensure_eq!(
        next.revision,
        r3,
        "a write outside the prefix produced a batch"
    );
    Ok(())
}

/// Delete events (of Delete and DeletePrefix) carry the deleted key's last
/// value; put events carry the previous value when the key existed.
pub async fn watch_delete_events_carry_prev_kv(store: &dyn Store, prefix: &str) -> Outcome {
    let w = key(prefix, "w/");
    let a = key(&w, "a");
    let mut stream = store.watch(&w, 0).await.ctx("watch")?;

    let r1 = put(store, &a, "1").await?;
    let batch = next_batch(&mut stream, "the first put").await?;
    ensure_eq!(batch.events.len(), 1, "events of a single put");
    let first = &batch.events[0];
    ensure_eq!(first.kind, EventKind::Put, "kind of a put event");
    ensure_eq!(first.prev_kv, None, "prev_kv of a put creating the key");
    let v1 = first.kv.clone();
    ensure_eq!(
        (v1.version, v1.mod_revision),
        (1, r1),
        "(version, mod_revision) of the put event"
    );

    let r2 = put(store, &a, "2").await?;
    let batch = next_batch(&mut stream, "the second put").await?;
    ensure_eq!(batch.events.len(), 1, "events of a single put");
    ensure_eq!(
        batch.events[0].prev_kv.as_ref(),
        Some(&v1),
        "prev_kv of a put over a key"
    );
    let v2 = batch.events[0].kv.clone();
    ensure_eq!(
        (v2.version, v2.mod_revision),
        (2, r2),
        "(version, mod_revision) of the second put"
    );

    let r3 = store
        .txn(Txn::new().and_then([TxnOp::delete(&a)]))
        .await
        .ctx("delete")?
        .revision;
    let batch = next_batch(&mut stream, "the delete").await?;
    ensure_eq!(batch.revision, r3, "revision of the delete batch");
    ensure_eq!(batch.events.len(), 1, "events of a single delete");
    let del = &batch.events[0];
    ensure_eq!(del.kind, EventKind::Delete, "kind of a delete event");
    ensure_eq!(
        (
            del.kv.key.as_str(),
            del.kv.value.as_slice(),
            del.kv.mod_revision,
            del.kv.version
        ),
        (a.as_str(), &b""[..], r3, 0),
        "(key, value, mod_revision, version) of a delete event"
    );
    ensure_eq!(del.prev_kv.as_ref(), Some(&v2), "prev_kv of a delete event");

    let b1 = key(&w, "b/1");
    let b2 = key(&w, "b/2");
    store
        .txn(Txn::new().and_then([TxnOp::put(&b1, "x"), TxnOp::put(&b2, "y")]))
        .await
        .ctx("put b/1 and b/2")?;
    next_batch(&mut stream, "the puts of b/1 and b/2").await?;
    let before = store.get_prefix(&key(&w, "b/")).await.ctx("get b/")?.kvs;
    let r5 = store
        .txn(Txn::new().and_then([TxnOp::DeletePrefix {
            prefix: key(&w, "b/"),
        }]))
        .await
        .ctx("delete prefix b/")?
        .revision;
    let batch = next_batch(&mut stream, "the DeletePrefix").await?;
    ensure_eq!(batch.revision, r5, "revision of the DeletePrefix batch");
    ensure_eq!(
        events_summary(&batch),
        vec![
            (EventKind::Delete, b1.clone()),
            (EventKind::Delete, b2.clone())
        ],
        "events of a DeletePrefix"
    );
    let prevs: Vec<KeyValue> = batch
        .events
        .iter()
        .filter_map(|e| e.prev_kv.clone())
        .collect();
    ensure_eq!(prevs, before, "prev_kvs of a DeletePrefix");
    Ok(())
}

// ---------------------------------------------------------------------------
// Leases.

/// TTLs are rounded up to whole seconds, at least 1 s; zero is invalid.
///
/// A store may grant more than asked (etcd raises TTLs to its minimum, 1.5 ×
/// the election timeout), so this checks whole seconds and at least the
/// request rounded up; the exact rounding of a store is its own test's job.
pub async fn lease_grant_rounds_ttl(store: &dyn Store, _prefix: &str) -> Outcome {
    let a = store
        .lease_grant(Duration::from_millis(1500))
        .await
        .ctx("grant 1.5 s")?;
    let b = store
        .lease_grant(Duration::from_millis(200))
        .await
        .ctx("grant 0.2 s")?;
    ensure!(a.id != 0 && b.id != 0, "a lease id is 0");
    ensure!(a.id != b.id, "two leases got the same id {}", a.id);
    for (lease, asked, at_least) in [(a, "1.5 s", 2), (b, "0.2 s", 1)] {
        ensure!(
            lease.ttl.subsec_nanos() == 0 && lease.ttl >= Duration::from_secs(at_least),
            "TTL granted for {asked} is {:?}, not whole seconds of at least {at_least} s",
            lease.ttl
        );
    }
    match store.lease_grant(Duration::ZERO).await {
        Err(StoreError::InvalidArgument(_)) => {}
        other => {
            return Err(format!(
                "grant of a zero TTL: expected InvalidArgument, got {other:?}"
            ))
        }
    }
    store.lease_revoke(a.id).await.ctx("revoke a")?;
    store.lease_revoke(b.id).await.ctx("revoke b")?;
    Ok(())
}

/// When a lease expires its keys are deleted, in one revision, with delete
/// events; the lease is gone.
pub async fn lease_expiry_deletes_keys_with_events(store: &dyn Store, prefix: &str) -> Outcome {
    let (a, b, c) = (key(prefix, "a"), key(prefix, "b"), key(prefix, "c"));
    let granted_at = Instant::now();
    let lease = store
        .lease_grant(Duration::from_secs(1))
        .await
        .ctx("grant")?;
    let resp = store
        .txn(Txn::new().and_then([
            put_leased(&a, "1", lease.id),
            put_leased(&b, "1", lease.id),
            TxnOp::put(&c, "1"),
        ]))
        .await
        .ctx("put with the lease")?;
    ensure_eq!(
        must_get(store, &a).await?.lease,
        Some(lease.id),
        "lease of {a}"
    );
    ensure_eq!(must_get(store, &c).await?.lease, None, "lease of {c}");
    let mut stream = store.watch(prefix, resp.revision + 1).await.ctx("watch")?;
    let wait = lease.ttl + WAIT;
    let batch = match tokio::time::timeout(wait, stream.next()).await {
        Ok(Some(Ok(batch))) => batch,
        Ok(other) => {
            return Err(format!(
                "watch ended waiting for the lease's expiry: {other:?}"
            ))
        }
        Err(_) => {
            return Err(format!(
                "the keys of a lease of {:?} were not deleted within {wait:?}",
                lease.ttl
            ))
        }
    };
    let elapsed = granted_at.elapsed();
    ensure!(
        elapsed + Duration::from_millis(100) >= lease.ttl,
        "the lease's keys were deleted after {elapsed:?}, before its TTL of {:?}",
        lease.ttl
    );
    let mut deleted: Vec<(EventKind, String)> = events_summary(&batch);
    deleted.sort_by(|x, y| x.1.cmp(&y.1));
    ensure_eq!(
        deleted,
        vec![
            (EventKind::Delete, a.clone()),
            (EventKind::Delete, b.clone())
        ],
        "events of the lease's expiry (one revision)"
    );
    for event in &batch.events {
        ensure!(
            event.prev_kv.is_some(),
            "delete event of {} has no prev_kv",
            event.kv.key
        );
    }
    ensure!(get(store, &a).await?.is_none(), "{a} survived its lease");
    ensure!(get(store, &b).await?.is_none(), "{b} survived its lease");
    ensure!(
        get(store, &c).await?.is_some(),
        "{c}, without a lease, was deleted"
    );
    match store.lease_keep_alive(lease.id).await {
        Err(StoreError::LeaseNotFound(id)) if id == lease.id => Ok(()),
        other => Err(format!(
            "keep-alive of an expired lease: expected LeaseNotFound, got {other:?}"
        )),
    }
}

/// Keep-alives keep a lease (and its keys) alive past its TTL.
pub async fn lease_keep_alive_keeps_keys(store: &dyn Store, prefix: &str) -> Outcome {
    let a = key(prefix, "a");
    let lease = store
        .lease_grant(Duration::from_secs(1))
        .await
        .ctx("grant")?;
    store
        .txn(Txn::new().and_then([put_leased(&a, "1", lease.id)]))
        .await
        .ctx("put with the lease")?;
    // Keep it alive for more than twice its TTL.
    let until = Instant::now() + lease.ttl * 2 + Duration::from_millis(500);
    while Instant::now() < until {
        tokio::time::sleep(lease.ttl / 4).await;
        let ttl = store.lease_keep_alive(lease.id).await.ctx("keep-alive")?;
        ensure_eq!(ttl, lease.ttl, "TTL returned by keep-alive");
    }
    ensure!(
        get(store, &a).await?.is_some(),
        "{a} expired although its lease was kept alive"
    );
    store.lease_revoke(lease.id).await.ctx("revoke")?;
    ensure!(
        get(store, &a).await?.is_none(),
        "{a} survived the revoke of its lease"
    );
    Ok(())
}

/// Revoking a lease deletes its keys in one revision, with delete events.
pub async fn lease_revoke_deletes_keys(store: &dyn Store, prefix: &str) -> Outcome {
    let (a, b, c) = (key(prefix, "a"), key(prefix, "b"), key(prefix, "c"));
    let lease = store
        .lease_grant(Duration::from_secs(30))
        .await
        .ctx("grant")?;
    store
        .txn(Txn::new().and_then([put_leased(&a, "1", lease.id), TxnOp::put(&c, "1")]))
        .await
        .ctx("put a")?;
    store
        .txn(Txn::new().and_then([put_leased(&b, "1", lease.id)]))
        .await
        .ctx("put b")?;
    let mut stream = store.watch(prefix, 0).await.ctx("watch")?;
    store.lease_revoke(lease.id).await.ctx("revoke")?;
    let batch = next_batch(&mut stream, "the deletes of the revoked lease").await?;
    let mut deleted = events_summary(&batch);
    deleted.sort_by(|x, y| x.1.cmp(&y.1));
    ensure_eq!(
        deleted,
        vec![
            (EventKind::Delete, a.clone()),
            (EventKind::Delete, b.clone())
        ],
        "events of the revoke (one revision)"
    );
    ensure!(get(store, &a).await?.is_none(), "{a} survived the revoke");
    ensure!(get(store, &b).await?.is_none(), "{b} survived the revoke");
    ensure!(
        get(store, &c).await?.is_some(),
        "{c}, without a lease, was deleted"
    );
    match store.lease_keep_alive(lease.id).await {
        Err(StoreError::LeaseNotFound(_)) => {}
        other => {
            return Err(format!(
                "keep-alive of a revoked lease: expected LeaseNotFound, got {other:?}"
            ))
        }
    }
    match store.lease_revoke(lease.id).await {
        Err(StoreError::LeaseNotFound(_)) => Ok(()),
        other => Err(format!(
            "second revoke: expected LeaseNotFound, got {other:?}"
        )),
    }
}

/// A put with a lease that does not exist fails with LeaseNotFound, and the
/// whole transaction writes nothing.
pub async fn put_with_unknown_lease_writes_nothing(store: &dyn Store, prefix: &str) -> Outcome {
    let (a, b, c) = (key(prefix, "a"), key(prefix, "b"), key(prefix, "c"));
    let lease = store
        .lease_grant(Duration::from_secs(30))
        .await
        .ctx("grant")?;
    store.lease_revoke(lease.id).await.ctx("revoke")?;
    put(store, &c, "orig").await?;
    let before_c = must_get(store, &c).await?;
    match store
        .txn(Txn::new().and_then([TxnOp::put(&b, "x"), put_leased(&a, "x", lease.id)]))
        .await
    {
        Err(StoreError::LeaseNotFound(id)) if id == lease.id => {}
        other => {
            return Err(format!(
                "put with a revoked lease: expected LeaseNotFound, got {other:?}"
            ))
        }
    }
    ensure!(
        get(store, &a).await?.is_none(),
        "{a} was written with a dead lease"
    );
    ensure!(
        get(store, &b).await?.is_none(),
        "{b} was written by a txn that failed"
    );
    match store
        .txn(Txn::new().and_then([put_leased(&c, "new", lease.id)]))
        .await
    {
        Err(StoreError::LeaseNotFound(_)) => {}
        other => {
            return Err(format!(
                "put over a key with a revoked lease: expected LeaseNotFound, got {other:?}"
            ))
        }
    }
    ensure_eq!(
        must_get(store, &c).await?,
        before_c,
        "{c} after a failed leased put"
    );
    Ok(())
}

/// A put without a lease detaches the key from its lease (as in etcd).
pub async fn put_without_lease_detaches_key(store: &dyn Store, prefix: &str) -> Outcome {
    let a = key(prefix, "a");
    let lease = store
        .lease_grant(Duration::from_secs(30))
        .await
        .ctx("grant")?;
    store
        .txn(Txn::new().and_then([put_leased(&a, "1", lease.id)]))
        .await
        .ctx("leased put")?;
    ensure_eq!(
        must_get(store, &a).await?.lease,
        Some(lease.id),
        "lease of {a}"
    );
    put(store, &a, "2").await?;
    ensure_eq!(
        must_get(store, &a).await?.lease,
        None,
        "lease of {a} after a put without lease"
    );
    store.lease_revoke(lease.id).await.ctx("revoke")?;
    ensure_eq!(
        must_get(store, &a).await?.value,
        b"2".to_vec(),
        "{a}, detached from the lease, after its revoke"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Compaction and status.

/// Compacting to a revision the store has not reached fails.
pub async fn compact_to_future_revision_fails(store: &dyn Store, prefix: &str) -> Outcome {
    put(store, &key(prefix, "a"), "1").await?;
    let current = store.status().await.ctx("status")?.revision;
    let requested = current + 1_000_000;
    match store.compact(requested).await {
        Err(StoreError::FutureRevision { requested: r, .. }) if r == requested => Ok(()),
        other => Err(format!(
            "compact to {requested} at revision {current}: expected FutureRevision, got {other:?}"
        )),
    }
}

/// A watch from a compacted revision fails with Compacted; from just after
/// the compaction it works. Compaction is global: needs an exclusive store.
pub async fn watch_from_compacted_revision_fails(store: &dyn Store, prefix: &str) -> Outcome {
    let a = key(prefix, "a");
    let r1 = put(store, &a, "1").await?;
    let r2 = put(store, &a, "2").await?;
    store.compact(r2).await.ctx("compact to r2")?;
    let status = store.status().await.ctx("status")?;
    ensure!(
        status.compact_revision >= r2,
        "compact_revision {} after compacting to {r2}",
        status.compact_revision
    );
    for start in [r1, r2] {
        match store.watch(prefix, start).await {
            Err(StoreError::Compacted {
                requested,
                compact_revision,
            }) => {
                ensure_eq!(requested, start, "requested revision in Compacted");
                ensure!(
                    compact_revision >= r2,
                    "Compacted says compact_revision {compact_revision}, below {r2}"
                );
            }
            Err(other) => {
                return Err(format!(
                    "watch from compacted {start}: expected Compacted, got {other}"
                ))
            }
            Ok(_) => return Err(format!("watch from compacted revision {start} succeeded")),
        }
    }
    let mut stream = store.watch(prefix, r2 + 1).await.ctx("watch from r2 + 1")?;
    let r3 = put(store, &a, "3").await?;
    let batch = next_batch(&mut stream, "the put after compaction").await?;
    ensure_eq!(batch.revision, r3, "first batch after compaction");
    Ok(())
}

/// Status reports where the store is.
pub async fn status_reports_position(store: &dyn Store, prefix: &str) -> Outcome {
    let rev = put(store, &key(prefix, "a"), "1").await?;
    let status = store.status().await.ctx("status")?;
    ensure!(
        status.revision >= rev,
        "status revision {} below a write at {rev}",
        status.revision
    );
    ensure!(
        status.compact_revision <= status.revision,
        "compact revision {} above revision {}",
        status.compact_revision,
        status.revision
    );
    ensure!(!status.kind.is_empty(), "status kind is empty");
    ensure!(!status.location.is_empty(), "status location is empty");
    Ok(())
}
