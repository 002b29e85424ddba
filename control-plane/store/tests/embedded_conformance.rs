//! The conformance suite against [`EmbeddedStore`], plus what only the
//! embedded store promises: persistence across restarts, exclusive opening,
//! history retention and the cancellation of lagging watchers.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use sextant_store::conformance::{Fixture, TestSpec};
use sextant_store::embedded::{EmbeddedOptions, EmbeddedStore};
use sextant_store::{EventKind, KeyValue, Store, StoreError, Txn, TxnOp, WatchBatch, WatchStream};

async fn fixture(spec: TestSpec) -> Fixture {
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let store = EmbeddedStore::open(dir.path()).expect("open the embedded store");
    Fixture::exclusive(Arc::new(store), format!("/conformance/{}/", spec.name)).with_guard(dir)
}

sextant_store::store_conformance_tests!(fixture);

// ---------------------------------------------------------------------------
// Embedded-only properties.

const WAIT: Duration = Duration::from_secs(5);

fn open(dir: &Path) -> EmbeddedStore {
    EmbeddedStore::open(dir).expect("open the embedded store")
}

async fn next(stream: &mut WatchStream) -> Result<WatchBatch, StoreError> {
    tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("a watch event within the deadline")
        .expect("the watch stream to go on")
}

async fn get(store: &dyn Store, key: &str) -> Option<KeyValue> {
    store.get(key).await.expect("get").kvs.into_iter().next()
}

fn leased_put(key: &str, value: &str, lease: i64) -> TxnOp {
    TxnOp::Put {
        key: key.into(),
        value: value.as_bytes().to_vec(),
        lease: Some(lease),
    }
}

#[tokio::test]
async fn a_new_store_is_at_revision_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let status = store.status().await.expect("status");
    assert_eq!(status.kind, "embedded");
    assert_eq!(
        status.revision, 1,
        "an empty store is at revision 1, as etcd"
    );
    assert_eq!(status.compact_revision, 0);
    assert_eq!(status.location, dir.path().display().to_string());
    assert_eq!(store.put("/a", b"1".to_vec()).await.expect("put"), 2);
    assert!(dir
        .path()
        .join(sextant_store::embedded::DB_FILE_NAME)
        .exists());
}

#[tokio::test]
async fn open_creates_a_missing_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nested = dir.path().join("a/b/data");
    let store = open(&nested);
    store.put("/a", b"1".to_vec()).await.expect("put");
    assert!(nested.join(sextant_store::embedded::DB_FILE_NAME).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_survives_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (first, a_before, lease_id, revision, compact) = {
        let store = open(dir.path());
        let first = store.put("/p/a", b"1".to_vec()).await.expect("put a");
        store.put("/p/a", b"2".to_vec()).await.expect("put a again");
        store.put("/p/b", b"1".to_vec()).await.expect("put b");
        store.delete("/p/b").await.expect("delete b");
        let lease = store
            .lease_grant(Duration::from_secs(60))
            .await
            .expect("grant");
        store
            .txn(Txn::new().and_then([leased_put("/p/leased", "x", lease.id)]))
            .await
            .expect("leased put");
        store.compact(first).await.expect("compact");
        let status = store.status().await.expect("status");
        let a = get(&store, "/p/a").await.expect("a exists");
        (first, a, lease.id, status.revision, status.compact_revision)
    };

    let store = open(dir.path());
    let status = store.status().await.expect("status after reopen");
    assert_eq!(status.revision, revision, "revision after reopen");
    assert_eq!(
        status.compact_revision, compact,
        "compact revision after reopen"
    );
    assert_eq!(
        get(&store, "/p/a").await,
        Some(a_before),
        "key after reopen"
    );
    assert_eq!(get(&store, "/p/b").await, None, "deleted key after reopen");
    let leased = get(&store, "/p/leased")
        .await
        .expect("leased key after reopen");
    assert_eq!(leased.lease, Some(lease_id));

    // The history after the compaction is still watchable.
    let mut stream = store.watch("/p/", first + 1).await.expect("watch history");
    let mut replayed = Vec::new();
    while replayed.last().is_none_or(|&(rev, _, _)| rev < revision) {
        let batch = next(&mut stream).await.expect("replayed batch");
        for event in batch.events {
            replayed.push((batch.revision, event.kind, event.kv.key));
        }
    }
    assert_eq!(
        replayed,
        vec![
            (first + 1, EventKind::Put, "/p/a".to_string()),
            (first + 2, EventKind::Put, "/p/b".to_string()),
            (first + 3, EventKind::Delete, "/p/b".to_string()),
            (first + 4, EventKind::Put, "/p/leased".to_string()),
        ]
    );
    assert!(matches!(
        store.watch("/p/", first).await,
        Err(StoreError::Compacted { .. })
    ));

    // The lease is still there, new leases do not reuse its id, and revisions
    // go on from where they were.
    assert_eq!(
        store.lease_keep_alive(lease_id).await.expect("keep-alive"),
        Duration::from_secs(60)
    );
    let other = store
        .lease_grant(Duration::from_secs(5))
        .await
        .expect("grant");
    assert_ne!(other.id, lease_id, "a lease id was reused after a restart");
    store.lease_revoke(lease_id).await.expect("revoke");
    assert_eq!(get(&store, "/p/leased").await, None);
    assert_eq!(
        store.status().await.expect("status").revision,
        revision + 1,
        "the revoke's revision follows the persisted one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_deadline_restarts_on_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = open(dir.path());
        let lease = store
            .lease_grant(Duration::from_secs(1))
            .await
            .expect("grant");
        store
            .txn(Txn::new().and_then([leased_put("/k", "v", lease.id)]))
            .await
            .expect("leased put");
    }
    // Closed past the lease's deadline: etcd restarts lease deadlines on a
    // new leader, and so does a reopen.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let reopened_at = Instant::now();
    let store = open(dir.path());
    assert!(
        get(&store, "/k").await.is_some(),
        "lease expired while closed"
    );
    let mut stream = store.watch("/", 0).await.expect("watch");
    let batch = next(&mut stream).await.expect("expiry batch");
    let elapsed = reopened_at.elapsed();
    assert_eq!(batch.events.len(), 1);
    assert_eq!(batch.events[0].kind, EventKind::Delete);
    assert!(
        elapsed >= Duration::from_millis(900),
        "expired {elapsed:?} after reopen, before the restarted 1 s deadline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_expires_promptly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let mut stream = store.watch("/", 0).await.expect("watch");
    let granted = Instant::now();
    let lease = store
        .lease_grant(Duration::from_secs(1))
        .await
        .expect("grant");
    store
        .txn(Txn::new().and_then([leased_put("/k", "v", lease.id)]))
        .await
        .expect("leased put");
    next(&mut stream).await.expect("the put");
    let batch = next(&mut stream).await.expect("the expiry");
    let elapsed = granted.elapsed();
    assert_eq!(batch.events[0].kind, EventKind::Delete);
    assert!(
        (Duration::from_millis(1000)..Duration::from_millis(1500)).contains(&elapsed),
        "a 1 s lease expired after {elapsed:?}"
    );
}

#[tokio::test]
async fn a_second_open_of_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    store.put("/a", b"1".to_vec()).await.expect("put");
    match EmbeddedStore::open(dir.path()) {
        Err(StoreError::Unavailable(message)) => {
            assert!(
                message.contains("already in use"),
                "unclear message: {message}"
            );
        }
        other => panic!("second open: expected Unavailable, got {other:?}"),
    }
    // The refused open did not disturb the first one.
    assert_eq!(store.put("/a", b"2".to_vec()).await.expect("put"), 3);
    drop(store);
    let store = open(dir.path());
    assert_eq!(
        get(&store, "/a").await.map(|kv| kv.value),
        Some(b"2".to_vec())
    );
}

#[tokio::test]
async fn history_beyond_the_retention_is_compacted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = EmbeddedOptions {
        history_retention: 5,
        ..EmbeddedOptions::default()
    };
    let store = EmbeddedStore::open_with(dir.path(), options).expect("open");
    let mut last = 0;
    for i in 0..12 {
        last = store
            .put(&format!("/k/{i}"), b"v".to_vec())
            .await
            .expect("put");
    }
    assert_eq!(last, 13);
    let status = store.status().await.expect("status");
    assert_eq!(
        status.compact_revision,
        last - 5,
        "compacted beyond 5 revisions"
    );
    match store.watch("/k/", last - 5).await {
        Err(StoreError::Compacted {
            requested,
            compact_revision,
        }) => assert_eq!((requested, compact_revision), (last - 5, last - 5)),
        other => panic!(
            "watch from a compacted revision: got {:?}",
            other.map(|_| ())
        ),
    }
    let mut stream = store.watch("/k/", last - 4).await.expect("watch");
    for rev in (last - 4)..=last {
        assert_eq!(next(&mut stream).await.expect("batch").revision, rev);
    }
    // Still compacted to the same place after a restart.
    drop(stream);
    drop(store);
    let store = open(dir.path());
    assert_eq!(
        store.status().await.expect("status").compact_revision,
        last - 5
    );
}

#[tokio::test]
async fn a_lagging_watcher_is_cancelled_with_watch_lagged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = EmbeddedOptions {
        watch_buffer: 4,
        ..EmbeddedOptions::default()
    };
    let store = EmbeddedStore::open_with(dir.path(), options).expect("open");
    let mut slow = store.watch("/k/", 0).await.expect("watch");
    let mut revisions = Vec::new();
    for i in 0..10 {
        // Writers are never blocked by the slow watcher.
        let rev = tokio::time::timeout(WAIT, store.put(&format!("/k/{i}"), b"v".to_vec()))
            .await
            .expect("a put is not blocked by a slow watcher")
            .expect("put");
        revisions.push(rev);
    }
    for &rev in &revisions[..4] {
        assert_eq!(next(&mut slow).await.expect("buffered batch").revision, rev);
    }
    match next(&mut slow).await {
        Err(StoreError::WatchLagged { resume_from }) => assert_eq!(resume_from, revisions[4]),
        other => panic!("expected WatchLagged, got {other:?}"),
    }
    assert!(
        slow.next().await.is_none(),
        "the stream ends after its error"
    );

    // Resuming from where it says gives the rest.
    let mut resumed = store.watch("/k/", revisions[4]).await.expect("re-watch");
    for &rev in &revisions[4..] {
        assert_eq!(next(&mut resumed).await.expect("batch").revision, rev);
    }
}

#[tokio::test]
async fn dropping_the_store_ends_its_watches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let mut stream = store.watch("/", 0).await.expect("watch");
    drop(store);
    match next(&mut stream).await {
        Err(StoreError::Unavailable(_)) => {}
        other => panic!("expected Unavailable after the store closed, got {other:?}"),
    }
    // And the directory can be opened again at once.
    let _store = open(dir.path());
}

#[tokio::test]
async fn lease_ttls_are_rounded_up_to_whole_seconds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    for (asked, granted) in [(200, 1), (1000, 1), (1001, 2), (1500, 2)] {
        let lease = store
            .lease_grant(Duration::from_millis(asked))
            .await
            .expect("grant");
        assert_eq!(
            lease.ttl,
            Duration::from_secs(granted),
            "TTL for {asked} ms"
        );
        assert_eq!(
            store.lease_keep_alive(lease.id).await.expect("keep-alive"),
            lease.ttl
        );
    }
    assert!(matches!(
        store.lease_grant(Duration::ZERO).await,
        Err(StoreError::InvalidArgument(_))
    ));
}
