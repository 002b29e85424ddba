//! The conformance suite against [`EtcdStore`] on a real etcd that this test
//! binary starts itself (see [`sextant_store::etcd_server`]), plus what only
//! the etcd store promises: namespaces, failures when etcd is unreachable and
//! recovery when it returns, compaction seen by another client, etcd's
//! limits.
//!
//! The shared tests use one etcd, each in its own key namespace; the tests
//! that need a store of their own (exact revision deltas, compaction) get a
//! fresh etcd each. Without an `etcd` binary every test fails, saying to run
//! `scripts/setup-test-deps`.

use std::net::{Ipv4Addr, TcpListener};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use sextant_store::conformance::{Fixture, TestSpec};
use sextant_store::etcd::{EtcdOptions, EtcdStore};
use sextant_store::etcd_server::EtcdServer;
use sextant_store::{EventKind, Store, StoreError, Txn, TxnOp, WatchBatch, WatchStream};

/// The etcd shared by the tests of this binary. Never dropped: its watchdog
/// stops it when the test process exits.
static SHARED: OnceLock<Result<EtcdServer, String>> = OnceLock::new();

fn shared_server() -> &'static EtcdServer {
    match SHARED.get_or_init(EtcdServer::start) {
        Ok(server) => server,
        Err(e) => panic!("the etcd store tests need a real etcd, and it could not start: {e}"),
    }
}

fn own_server() -> EtcdServer {
    EtcdServer::start().unwrap_or_else(|e| {
        panic!("the etcd store tests need a real etcd, and it could not start: {e}")
    })
}

fn options(namespace: &str) -> EtcdOptions {
    EtcdOptions {
        namespace: namespace.to_owned(),
        ..EtcdOptions::default()
    }
}

async fn connect(server: &EtcdServer, namespace: &str) -> EtcdStore {
    EtcdStore::connect(&[server.endpoint()], options(namespace))
        .await
        .unwrap_or_else(|e| panic!("connect to the test etcd at {}: {e}", server.endpoint()))
}

async fn fixture(spec: TestSpec) -> Fixture {
    if spec.needs_exclusive {
        // A fresh etcd, used without a namespace.
        let server = own_server();
        let store = connect(&server, "").await;
        Fixture::exclusive(Arc::new(store), format!("/conformance/{}/", spec.name))
            .with_guard(server)
    } else {
        let server = shared_server();
        let store = connect(server, &format!("/sextant-test/{}", spec.name)).await;
        Fixture::shared(Arc::new(store), "/conformance/")
    }
}

sextant_store::store_conformance_tests!(fixture);

// ---------------------------------------------------------------------------
// etcd-only properties.

const WAIT: Duration = Duration::from_secs(5);

async fn next(stream: &mut WatchStream) -> Result<WatchBatch, StoreError> {
    tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("a watch batch within the deadline")
        .expect("the watch stream to go on")
}

fn unavailable_naming(result: Result<impl std::fmt::Debug, StoreError>, endpoint: &str) {
    match result {
        Err(StoreError::Unavailable(message)) => assert!(
            message.contains(endpoint),
            "the message does not name the endpoint {endpoint}: {message}"
        ),
        other => panic!("expected Unavailable naming {endpoint}, got {other:?}"),
    }
}

/// A loopback port where nothing listens (free a moment ago).
fn closed_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a free port");
    listener.local_addr().expect("local address").port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_etcd_fails_promptly_with_unavailable() {
    let endpoint = format!("http://127.0.0.1:{}", closed_port());
    let opts = EtcdOptions {
        request_timeout: Duration::from_secs(1),
        connect_timeout: Duration::from_millis(500),
        ..EtcdOptions::default()
    };
    let limit = Duration::from_secs(3);

    let started = Instant::now();
    unavailable_naming(
        EtcdStore::connect(std::slice::from_ref(&endpoint), opts.clone()).await,
        &endpoint,
    );
    assert!(
        started.elapsed() < limit,
        "connect took {:?}",
        started.elapsed()
    );

    let store = EtcdStore::connect_lazy(std::slice::from_ref(&endpoint), opts)
        .await
        .expect("a lazy connect does not need etcd");
    let started = Instant::now();
    unavailable_naming(store.get("/a").await, &endpoint);
    unavailable_naming(store.put("/a", b"1".to_vec()).await, &endpoint);
    unavailable_naming(store.watch("/", 0).await.map(|_| ()), &endpoint);
    unavailable_naming(store.lease_grant(Duration::from_secs(5)).await, &endpoint);
    unavailable_naming(store.status().await, &endpoint);
    assert!(
        started.elapsed() < limit * 5,
        "five calls took {:?}",
        started.elapsed()
    );

    let none: [String; 0] = [];
    assert!(matches!(
        EtcdStore::connect_lazy(&none, EtcdOptions::default()).await,
        Err(StoreError::InvalidArgument(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_fail_while_etcd_is_down_and_recover_when_it_returns() {
    let mut server = own_server();
    let endpoint = server.endpoint();
    let opts = EtcdOptions {
        request_timeout: Duration::from_secs(1),
        connect_timeout: Duration::from_millis(500),
        ..EtcdOptions::default()
    };
    let store = EtcdStore::connect(std::slice::from_ref(&endpoint), opts)
        .await
        .expect("connect");
    let written = store.put("/k/a", b"1".to_vec()).await.expect("put");
    let mut stream = store.watch("/k/", 0).await.expect("watch");

    server.kill();
    let started = Instant::now();
    match tokio::time::timeout(WAIT, stream.next()).await {
        Ok(Some(Err(StoreError::Unavailable(message)))) => {
            assert!(message.contains(&endpoint), "{message}");
            assert!(
                message.contains(&format!("re-watch from revision {}", written + 1)),
                "{message}"
            );
        }
        other => panic!("watch while etcd is down: expected Unavailable, got {other:?}"),
    }
    assert!(
        stream.next().await.is_none(),
        "the stream ends after its error"
    );
    unavailable_naming(store.get("/k/a").await, &endpoint);
    unavailable_naming(store.put("/k/b", b"2".to_vec()).await, &endpoint);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "failing took {:?}",
        started.elapsed()
    );

    server.restart().expect("restart etcd");
    let deadline = Instant::now() + Duration::from_secs(10);
    let kv = loop {
        match store.get("/k/a").await {
            Ok(resp) => break resp.kvs,
            Err(StoreError::Unavailable(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the store did not recover after etcd returned: {e}"),
        }
    };
    assert_eq!(kv.len(), 1, "the data survived the restart");
    assert_eq!(kv[0].value, b"1".to_vec());
    let mut resumed = store.watch("/k/", written + 1).await.expect("re-watch");
    let rev = store
        .put("/k/b", b"2".to_vec())
        .await
        .expect("put after recovery");
    let batch = next(&mut resumed).await.expect("batch");
    assert_eq!(batch.revision, rev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_etcd_makes_calls_time_out_not_hang() {
    let server = own_server();
    let endpoint = server.endpoint();
    let timeout = Duration::from_secs(1);
    let opts = EtcdOptions {
        request_timeout: timeout,
        ..EtcdOptions::default()
    };
    let store = EtcdStore::connect(std::slice::from_ref(&endpoint), opts.clone())
        .await
        .expect("connect");
    store.put("/a", b"1".to_vec()).await.expect("put");

    server.freeze().expect("freeze etcd");
    let limit = timeout + Duration::from_secs(2);
    let started = Instant::now();
    unavailable_naming(store.get("/a").await, &endpoint);
    assert!(
        started.elapsed() < limit,
        "get took {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    unavailable_naming(store.put("/a", b"2".to_vec()).await, &endpoint);
    assert!(
        started.elapsed() < limit,
        "put took {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    unavailable_naming(store.watch("/", 0).await.map(|_| ()), &endpoint);
    assert!(
        started.elapsed() < limit,
        "watch took {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    unavailable_naming(
        EtcdStore::connect(std::slice::from_ref(&endpoint), opts).await,
        &endpoint,
    );
    assert!(
        started.elapsed() < limit,
        "connect took {:?}",
        started.elapsed()
    );

    server.thaw().expect("thaw etcd");
    let got = store.get("/a").await.expect("get after thaw");
    // A write that timed out may still apply once etcd reads it (as with
    // any etcd client): callers that retry use compare-and-swap.
    assert!(
        got.kvs[0].value == b"1" || got.kvs[0].value == b"2",
        "value after thaw: {:?}",
        got.kvs[0].value
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_isolate_stores_sharing_one_etcd() {
    let server = shared_server();
    let a = connect(server, "/sextant-test/ns/a").await;
    let b = connect(server, "/sextant-test/ns/b").await;
    let bare = connect(server, "").await;

    let mut watch_a = a.watch("", 0).await.expect("watch all of a");
    let ra = a.put("/k", b"a".to_vec()).await.expect("put in a");
    b.put("/k", b"b".to_vec()).await.expect("put in b");
    b.put("/other", b"b".to_vec()).await.expect("put in b");

    let got = a.get("/k").await.expect("get in a");
    assert_eq!(got.kvs.len(), 1);
    assert_eq!(
        (got.kvs[0].key.as_str(), got.kvs[0].value.as_slice()),
        ("/k", &b"a"[..])
    );
    let all_a = a.get_prefix("").await.expect("get all of a");
    assert_eq!(
        all_a
            .kvs
            .iter()
            .map(|kv| kv.key.as_str())
            .collect::<Vec<_>>(),
        vec!["/k"]
    );
    let seen_bare = bare
        .get("/sextant-test/ns/b/other")
        .await
        .expect("get without namespace");
    assert_eq!(
        seen_bare.kvs.len(),
        1,
        "keys are stored under the namespace"
    );

    let batch = next(&mut watch_a).await.expect("a's batch");
    assert_eq!(batch.revision, ra);
    assert_eq!(
        batch
            .events
            .iter()
            .map(|e| (e.kind, e.kv.key.as_str()))
            .collect::<Vec<_>>(),
        vec![(EventKind::Put, "/k")]
    );
    let deleted = b
        .txn(Txn::new().and_then([TxnOp::DeletePrefix {
            prefix: String::new(),
        }]))
        .await
        .expect("delete all of b");
    assert_eq!(deleted.responses.len(), 1);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), watch_a.next())
            .await
            .is_err(),
        "a saw b's deletes"
    );
    assert_eq!(
        a.get("/k").await.expect("get").kvs.len(),
        1,
        "b's delete-all reached a"
    );
    assert!(b.get_prefix("").await.expect("get b").kvs.is_empty());
    a.delete("/k").await.expect("clean up");

    let status = a.status().await.expect("status");
    assert_eq!(status.kind, "etcd");
    assert!(
        status.location.contains(&server.endpoint()) && status.location.contains("/ns/a"),
        "location {:?}",
        status.location
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_by_another_client_is_seen() {
    let server = own_server();
    let writer = connect(&server, "").await;
    let r1 = writer.put("/c/a", b"1".to_vec()).await.expect("put");
    let r2 = writer.put("/c/a", b"2".to_vec()).await.expect("put");
    let r3 = writer.put("/c/b", b"1".to_vec()).await.expect("put");
    // A delete at exactly the compact revision: etcd drops its tombstone,
    // so a watch from there must not be allowed.
    let r4 = writer
        .txn(Txn::new().and_then([TxnOp::delete("/c/b")]))
        .await
        .expect("delete")
        .revision;
    assert!(r1 < r2 && r2 < r3 && r3 < r4);
    writer.compact(r4).await.expect("compact");
    writer
        .compact(r2)
        .await
        .expect("compacting below is a no-op");
    writer.compact(0).await.expect("compacting to 0 is a no-op");

    // A new client knows nothing of the compaction.
    let reader = connect(&server, "").await;
    let status = reader.status().await.expect("status");
    assert_eq!(status.compact_revision, r4);
    for start in [r1, r4] {
        match reader.watch("/c/", start).await {
            Err(StoreError::Compacted {
                requested,
                compact_revision,
            }) => assert_eq!((requested, compact_revision), (start, r4)),
            other => panic!(
                "watch from {start} after compacting to {r4}: got {:?}",
                other.map(|_| ())
            ),
        }
    }
    let mut stream = reader.watch("/c/", r4 + 1).await.expect("watch after");
    let r5 = writer.put("/c/a", b"3".to_vec()).await.expect("put");
    assert_eq!(next(&mut stream).await.expect("batch").revision, r5);
    match writer.compact(r5 + 10).await {
        Err(StoreError::FutureRevision { requested, current }) => {
            assert_eq!((requested, current), (r5 + 10, r5));
        }
        other => panic!("compact to a future revision: got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_limits_are_invalid_arguments() {
    let server = shared_server();
    let store = connect(server, "/sextant-test/limits").await;
    // etcd's --max-txn-ops defaults to 128.
    let ops: Vec<TxnOp> = (0..129)
        .map(|i| TxnOp::put(format!("/k/{i:03}"), "v"))
        .collect();
    match store.txn(Txn::new().and_then(ops)).await {
        Err(StoreError::InvalidArgument(message)) => {
            assert!(message.contains("too many operations"), "{message}");
        }
        other => panic!("a txn of 129 puts: expected InvalidArgument, got {other:?}"),
    }
    // etcd's --max-request-bytes defaults to 1.5 MiB; gRPC's own limit is
    // a bit higher.
    for size in [1_600_000, 4_000_000] {
        match store.put("/big", vec![b'x'; size]).await {
            Err(StoreError::InvalidArgument(_)) => {}
            other => panic!("a put of {size} bytes: expected InvalidArgument, got {other:?}"),
        }
    }
    assert!(store.get_prefix("").await.expect("get").kvs.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_with_two_ids_in_a_txn_name_the_missing_one() {
    let server = shared_server();
    let store = connect(server, "/sextant-test/two-leases").await;
    let alive = store
        .lease_grant(Duration::from_secs(30))
        .await
        .expect("grant");
    let dead = store
        .lease_grant(Duration::from_secs(30))
        .await
        .expect("grant");
    store.lease_revoke(dead.id).await.expect("revoke");
    let leased = |key: &str, lease: i64| TxnOp::Put {
        key: key.into(),
        value: b"v".to_vec(),
        lease: Some(lease),
    };
    match store
        .txn(Txn::new().and_then([leased("/a", alive.id), leased("/b", dead.id)]))
        .await
    {
        Err(StoreError::LeaseNotFound(id)) => assert_eq!(id, dead.id),
        other => panic!("expected LeaseNotFound({}), got {other:?}", dead.id),
    }
    assert_eq!(
        store.lease_keep_alive(alive.id).await.expect("keep-alive"),
        alive.ttl
    );
    store.lease_revoke(alive.id).await.expect("revoke");
    assert!(store.get_prefix("").await.expect("get").kvs.is_empty());
}
