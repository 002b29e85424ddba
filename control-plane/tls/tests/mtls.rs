//! Real TLS on loopback: a tonic health server behind `ServerTls::incoming`,
//! clients with and without certificates, rotation, and bad clients.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sextant_tls::ca::{write_file, Ca, IssueRequest, Issued};
use sextant_tls::{
    probe_server, ClientTls, Identity, IncomingOptions, Kind, PeerInfo, ServerTls, ServerTlsFiles,
    TlsError,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

struct Harness {
    dir: tempfile::TempDir,
    ca: Ca,
    tls: ServerTls,
    addr: std::net::SocketAddr,
    /// The PeerInfo of every request, as the server saw it.
    seen: Arc<Mutex<Vec<PeerInfo>>>,
}

fn write(path: &Path, contents: &str) {
    write_file(path, contents.as_bytes(), false).unwrap();
}

fn issue(ca: &Ca, kind: Kind, id: &str, days: u32) -> Issued {
    let mut req = IssueRequest::new(Identity::new(kind, id).unwrap());
    req.days = days;
    ca.issue(&req).unwrap()
}

impl Harness {
    async fn start() -> Harness {
        Self::start_with(IncomingOptions::default()).await
    }

    async fn start_with(options: IncomingOptions) -> Harness {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("sextant_tls=debug")
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("test CA", 1).unwrap();
        write(&dir.path().join("ca.crt"), &ca.cert_pem);
        // What clients trust: a copy, so that tests may break the server's.
        write(&dir.path().join("trust.crt"), &ca.cert_pem);
        let server = issue(&ca, Kind::Replica, "cp-1", 90);
        write(&dir.path().join("server.crt"), &server.cert_pem);
        write(&dir.path().join("server.key"), &server.key_pem);
        let tls = ServerTls::load(ServerTlsFiles {
            cert: dir.path().join("server.crt"),
            key: dir.path().join("server.key"),
            client_ca: dir.path().join("ca.crt"),
        })
        .unwrap();

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let (_reporter, health) = tonic_health::server::health_reporter();
        let incoming = tls.incoming_with(listener, options);
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .layer(tonic::service::InterceptorLayer::new(
                    move |req: tonic::Request<()>| {
                        let peer = req.extensions().get::<PeerInfo>().cloned();
                        record
                            .lock()
                            .unwrap()
                            .push(peer.expect("PeerInfo in extensions"));
                        Ok(req)
                    },
                ))
                .add_service(health)
                .serve_with_incoming(incoming)
                .await
                .unwrap();
        });
        Harness {
            dir,
            ca,
            tls,
            addr,
            seen,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Client files for a certificate of `ca` (or none).
    fn client(&self, issued: Option<(&str, &Issued)>) -> ClientTls {
        let (cert, key) = match issued {
            Some((name, issued)) => {
                let cert = self.path(&format!("{name}.crt"));
                let key = self.path(&format!("{name}.key"));
                write(&cert, &issued.cert_pem);
                write(&key, &issued.key_pem);
                (Some(cert), Some(key))
            }
            None => (None, None),
        };
        ClientTls {
            ca: self.path("trust.crt"),
            cert,
            key,
        }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    async fn channel(&self, client: &ClientTls) -> Result<Channel, tonic::transport::Error> {
        client.endpoint(&self.url()).unwrap().connect().await
    }

    fn last_seen(&self) -> PeerInfo {
        self.seen.lock().unwrap().last().cloned().unwrap()
    }

    fn seen_count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    async fn probe(&self) -> sextant_tls::PeerCert {
        let client = self.client(None);
        probe_server(&self.addr.to_string(), "localhost", &client)
            .await
            .unwrap()
    }
}

async fn check(channel: &Channel) -> Result<(), tonic::Status> {
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|_| ())
}

/// Polls `cond` until it holds or `within` passes.
async fn eventually<F, Fut>(within: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_client_with_a_certificate_is_known_by_its_identity() {
    let h = Harness::start().await;
    let edge = issue(&h.ca, Kind::Edge, "ams1-edge-3", 7);
    let client = h.client(Some(("edge", &edge)));
    let channel = h.channel(&client).await.unwrap();
    check(&channel).await.unwrap();
    let peer = h.last_seen();
    assert_eq!(
        peer.identity,
        Some(Identity::new(Kind::Edge, "ams1-edge-3").unwrap())
    );
    assert!(peer.remote.unwrap().ip().is_loopback());
    let not_after = peer.cert_not_after_unix.unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((not_after - now - 7 * 86400).abs() < 120, "{not_after}");
}

#[tokio::test]
async fn a_client_without_a_certificate_gets_in_without_identity() {
    let h = Harness::start().await;
    let channel = h.channel(&h.client(None)).await.unwrap();
    check(&channel).await.unwrap();
    let peer = h.last_seen();
    assert_eq!(peer.identity, None);
    assert_eq!(peer.cert_not_after_unix, None);
    assert!(peer.remote.is_some());
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_at_handshake() {
    let h = Harness::start().await;
    let other = Ca::generate("other CA", 1).unwrap();
    let stranger = issue(&other, Kind::Edge, "e1", 7);
    let client = h.client(Some(("stranger", &stranger)));
    let result = match h.channel(&client).await {
        Ok(channel) => check(&channel).await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    assert!(result.is_err(), "a stranger got in");
    assert_eq!(h.seen_count(), 0, "the handler saw the stranger");

    // And a good client still gets in afterwards.
    let channel = h.channel(&h.client(None)).await.unwrap();
    check(&channel).await.unwrap();
}

#[tokio::test]
async fn a_client_refuses_a_server_from_another_ca() {
    let h = Harness::start().await;
    let other = Ca::generate("other CA", 1).unwrap();
    let path = h.path("other-ca.crt");
    write(&path, &other.cert_pem);
    let client = ClientTls {
        ca: path,
        cert: None,
        key: None,
    };
    let result = match h.channel(&client).await {
        Ok(channel) => check(&channel).await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    assert!(result.is_err());
}

#[tokio::test]
async fn rotation_serves_the_new_certificate_and_keeps_established_connections() {
    let h = Harness::start().await;
    let before = h.probe().await;
    assert_eq!(before.serial, h.tls.cert_serial());
    assert_eq!(
        before.identity,
        Ok(Identity::new(Kind::Replica, "cp-1").unwrap())
    );

    // An established connection.
    let edge = issue(&h.ca, Kind::Edge, "e1", 7);
    let channel = h.channel(&h.client(Some(("edge", &edge)))).await.unwrap();
    check(&channel).await.unwrap();
    let first_remote = h.last_seen().remote;

    // New files on disk, then reload().
    let new = issue(&h.ca, Kind::Replica, "cp-1", 30);
    write(&h.path("server.crt"), &new.cert_pem);
    write(&h.path("server.key"), &new.key_pem);
    h.tls.reload().unwrap();
    assert_eq!(h.tls.reload_count(), 1);
    let after = h.probe().await;
    assert_ne!(after.serial, before.serial);
    assert_eq!(after.serial, h.tls.cert_serial());
    assert!(after.not_after_unix < before.not_after_unix - 50 * 86400);
    assert_eq!(h.tls.cert_not_after_unix(), after.not_after_unix);

    // The established connection works, on the same TCP connection.
    check(&channel).await.unwrap();
    assert_eq!(h.last_seen().remote, first_remote);
    assert_eq!(
        h.last_seen().identity,
        Some(Identity::new(Kind::Edge, "e1").unwrap())
    );

    // The metrics follow.
    let mut registry = prometheus_client::registry::Registry::default();
    h.tls
        .set_metrics(sextant_tls::TlsMetrics::register(&mut registry));

    // The poll picks up the next change by itself.
    let _watch = h.tls.spawn_watch(Duration::from_millis(100));
    let newer = issue(&h.ca, Kind::Replica, "cp-1", 10);
    write(&h.path("server.crt"), &newer.cert_pem);
    write(&h.path("server.key"), &newer.key_pem);
    let seen_new = eventually(Duration::from_secs(10), || async {
        h.probe().await.serial != after.serial
    })
    .await;
    assert!(seen_new, "the poll did not reload");
    assert_eq!(h.tls.reload_count(), 2);
    let last = h.probe().await;
    assert!(last.not_after_unix < after.not_after_unix - 15 * 86400);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(&format!(
            "sextant_tls_cert_expiry_seconds {}\n",
            last.not_after_unix
        )),
        "{text}"
    );
    assert!(text.contains("sextant_tls_reloads_total 1\n"), "{text}");
    check(&channel).await.unwrap();
}

#[tokio::test]
async fn a_bad_new_file_set_is_refused_and_the_old_one_stays() {
    let h = Harness::start().await;
    let before = h.probe().await;

    // Garbage certificate.
    write(&h.path("server.crt"), "not a certificate\n");
    let err = h.tls.reload().unwrap_err();
    assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
    assert!(err.to_string().contains("server.crt"), "{err}");

    // A certificate with another key.
    let a = issue(&h.ca, Kind::Replica, "cp-1", 30);
    let b = issue(&h.ca, Kind::Replica, "cp-1", 30);
    write(&h.path("server.crt"), &a.cert_pem);
    write(&h.path("server.key"), &b.key_pem);
    let err = h.tls.reload().unwrap_err();
    assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
    assert!(err.to_string().contains("server.key"), "{err}");

    // A broken CA file.
    write(&h.path("server.key"), &a.key_pem);
    let ca = std::fs::read_to_string(h.path("ca.crt")).unwrap();
    write(&h.path("ca.crt"), &ca.replace("MII", "MIX"));
    let err = h.tls.reload().unwrap_err();
    assert!(err.to_string().contains("ca.crt"), "{err}");

    assert_eq!(h.tls.reload_count(), 0);
    assert_eq!(h.tls.reload_failure_count(), 3);
    assert_eq!(h.probe().await.serial, before.serial);
    let channel = h.channel(&h.client(None)).await.unwrap();
    check(&channel).await.unwrap();

    // Once the CA file is fixed the new pair loads.
    write(&h.path("ca.crt"), &ca);
    h.tls.reload().unwrap();
    assert_ne!(h.probe().await.serial, before.serial);
}

#[tokio::test]
async fn slow_and_garbage_clients_do_not_block_a_good_one() {
    let h = Harness::start_with(IncomingOptions {
        handshake_timeout: Duration::from_secs(2),
        max_handshakes: 16,
        nodelay: true,
    })
    .await;
    // Five clients that connect and say nothing, one that sends garbage,
    // one that stops half-way through a ClientHello.
    let mut idle = Vec::new();
    for _ in 0..5 {
        idle.push(TcpStream::connect(h.addr).await.unwrap());
    }
    let mut garbage = TcpStream::connect(h.addr).await.unwrap();
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut partial = TcpStream::connect(h.addr).await.unwrap();
    partial
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();

    let good = tokio::time::timeout(Duration::from_secs(1), async {
        let channel = h.channel(&h.client(None)).await.unwrap();
        check(&channel).await.unwrap();
    })
    .await;
    assert!(good.is_ok(), "a good client waited behind bad ones");

    // The garbage client is dropped at once, the idle ones at the timeout.
    let mut buf = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_secs(1), garbage.read(&mut buf))
        .await
        .expect("the garbage client was not dropped");
    for mut conn in idle {
        let read = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
            .await
            .expect("an idle client was not dropped after the handshake timeout");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    // And the server still serves.
    let channel = h.channel(&h.client(None)).await.unwrap();
    check(&channel).await.unwrap();
}

#[tokio::test]
async fn a_client_can_insist_on_a_replica() {
    let h = Harness::start().await;
    let client = h.client(None);
    let channel = client
        .endpoint_expecting(&h.url(), Kind::Replica)
        .unwrap()
        .connect()
        .await
        .unwrap();
    check(&channel).await.unwrap();

    let wrong = match client
        .endpoint_expecting(&h.url(), Kind::Dns)
        .unwrap()
        .connect()
        .await
    {
        Ok(channel) => check(&channel).await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    assert!(wrong.is_err(), "a replica passed for a dns server");
}

#[tokio::test]
async fn client_files_are_checked_up_front() {
    let h = Harness::start().await;
    let a = issue(&h.ca, Kind::Operator, "alice", 7);
    let b = issue(&h.ca, Kind::Operator, "bob", 7);
    let mut client = h.client(Some(("alice", &a)));
    write(client.key.as_ref().unwrap(), &b.key_pem);
    let err = client.tonic_config().unwrap_err();
    assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
    client.key = None;
    assert!(matches!(
        client.tonic_config().unwrap_err(),
        TlsError::CertWithoutKey(_)
    ));
    let err = client.endpoint("http://127.0.0.1:1").unwrap_err();
    assert!(err.to_string().contains("https://"), "{err}");
}

#[tokio::test]
async fn a_certificate_from_the_ca_without_a_sextant_uri_has_no_identity() {
    let h = Harness::start().await;
    let issuer = rcgen::Issuer::from_ca_cert_pem(
        &h.ca.cert_pem,
        rcgen::KeyPair::from_pem(&h.ca.key_pem).unwrap(),
    )
    .unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["edge.example".to_owned()]).unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let issued = Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    };
    let channel = h
        .channel(&h.client(Some(("anonymous", &issued))))
        .await
        .unwrap();
    check(&channel).await.unwrap();
    let peer = h.last_seen();
    assert_eq!(peer.identity, None);
    assert!(peer.cert_not_after_unix.is_some());
}
