//! The server side: a rustls config read from files and swapped when they
//! change, and a stream of accepted TLS connections for tonic.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use futures::Stream;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn, Instrument};

use crate::identity::cert_facts;
use crate::{pem, provider, Identity, TlsError, TlsMetrics};

/// The three files a TLS server is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// The server's certificate chain, leaf first (`--tls-cert`).
    pub cert: PathBuf,
    /// The server's private key (`--tls-key`).
    pub key: PathBuf,
    /// The CA(s) that client certificates must chain to (`--tls-client-ca`).
    pub client_ca: PathBuf,
}

/// What a server handler knows of the connection a request came on:
/// `request.extensions().get::<PeerInfo>()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    /// The client certificate's identity: `None` if the client sent no
    /// certificate, or one (valid for the CA) without a sextant identity.
    pub identity: Option<Identity>,
    /// The client certificate's not-after time, if it sent one.
    pub cert_not_after_unix: Option<i64>,
}

/// One loaded file set.
#[derive(Debug)]
struct Loaded {
    config: Arc<ServerConfig>,
    not_after_unix: i64,
    serial: String,
}

/// When the files last changed, as far as the poll can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    #[cfg(unix)]
    ino: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        #[cfg(unix)]
        ino: std::os::unix::fs::MetadataExt::ino(&meta),
    })
}

#[derive(Debug)]
struct Inner {
    files: ServerTlsFiles,
    current: ArcSwap<Loaded>,
    /// The stamps of the file set last tried, loaded or refused.
    tried: Mutex<[Option<Stamp>; 3]>,
    reloads: AtomicU64,
    reload_failures: AtomicU64,
    metrics: OnceLock<TlsMetrics>,
}

/// A TLS server config that follows its files. Cheap to clone.
///
/// Client certificates are requested and, when sent, verified against the
/// client CA; a client without one is still let in with
/// `PeerInfo::identity == None`, and the caller decides per request (an
/// operator may come with a bearer token instead).
#[derive(Debug, Clone)]
pub struct ServerTls {
    inner: Arc<Inner>,
}

impl ServerTls {
    /// Reads the files; fails, naming the file, if any is bad.
    pub fn load(files: ServerTlsFiles) -> Result<Self, TlsError> {
        let stamps = stamps(&files);
        let loaded = load_files(&files)?;
        Ok(ServerTls {
            inner: Arc::new(Inner {
                files,
                current: ArcSwap::from_pointee(loaded),
                tried: Mutex::new(stamps),
                reloads: AtomicU64::new(0),
                reload_failures: AtomicU64::new(0),
                metrics: OnceLock::new(),
            }),
        })
    }

    /// Keeps `metrics` up to date from now on (the first call wins).
    pub fn set_metrics(&self, metrics: TlsMetrics) {
        metrics.cert_expiry.set(self.cert_not_after_unix());
        let _ = self.inner.metrics.set(metrics);
    }

    /// The files this config follows.
    pub fn files(&self) -> &ServerTlsFiles {
        &self.inner.files
    }

    /// Re-reads the files now. New handshakes use the new certificate;
    /// established connections keep theirs. A bad file set is refused with a
    /// warning, and the previous config stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamps = stamps(&self.inner.files);
        self.reload_with(stamps)
    }

    /// Reloads if a file's mtime, size or inode changed since the last try.
    /// Returns whether it tried.
    pub fn reload_if_changed(&self) -> bool {
        let stamps = stamps(&self.inner.files);
        if *lock(&self.inner.tried) == stamps {
            return false;
        }
        let _ = self.reload_with(stamps);
        true
    }

    fn reload_with(&self, stamps: [Option<Stamp>; 3]) -> Result<(), TlsError> {
        let mut tried = lock(&self.inner.tried);
        *tried = stamps;
        match load_files(&self.inner.files) {
            Ok(loaded) => {
                info!(
                    serial = %loaded.serial,
                    not_after = loaded.not_after_unix,
                    "tls certificate reloaded"
                );
                let not_after = loaded.not_after_unix;
                self.inner.current.store(Arc::new(loaded));
                self.inner.reloads.fetch_add(1, Ordering::Relaxed);
                if let Some(m) = self.inner.metrics.get() {
                    m.cert_expiry.set(not_after);
                    m.reloads.inc();
                }
                Ok(())
            }
            Err(e) => {
                let file = e.path().map(|p| p.display().to_string());
                warn!(
                    file = file.as_deref().unwrap_or("-"),
                    error = %e,
                    "tls reload refused; keeping the previous certificate"
                );
                self.inner.reload_failures.fetch_add(1, Ordering::Relaxed);
                if let Some(m) = self.inner.metrics.get() {
                    m.reload_failures.inc();
                }
                Err(e)
            }
        }
    }

    /// Polls the files every `every` in a background task and reloads when
    /// they change. The task ends when the last `ServerTls` clone is dropped.
    /// Needs a tokio runtime.
    pub fn spawn_watch(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let span = tracing::info_span!("tls_watch", cert = %self.inner.files.cert.display());
        tokio::spawn(
            async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let Some(inner) = weak.upgrade() else { return };
                    let tls = ServerTls { inner };
                    // Small files, but still file I/O: off the async threads.
                    if tokio::task::spawn_blocking(move || tls.reload_if_changed())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
            .instrument(span),
        )
    }

    /// The config new handshakes use now.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.inner.current.load().config.clone()
    }

    /// The current server certificate's not-after time, Unix seconds (for
    /// the gauge `sextant_tls_cert_expiry_seconds`).
    pub fn cert_not_after_unix(&self) -> i64 {
        self.inner.current.load().not_after_unix
    }

    /// The current server certificate's serial number, hex with colons.
    pub fn cert_serial(&self) -> String {
        self.inner.current.load().serial.clone()
    }

    /// File sets loaded by a reload since start (not counting the first load).
    pub fn reload_count(&self) -> u64 {
        self.inner.reloads.load(Ordering::Relaxed)
    }

    /// File sets refused by a reload since start.
    pub fn reload_failure_count(&self) -> u64 {
        self.inner.reload_failures.load(Ordering::Relaxed)
    }

    /// Accepted, handshaken connections for `tonic::transport::Server::
    /// serve_with_incoming`, with the default [`IncomingOptions`].
    pub fn incoming(
        &self,
        listener: TcpListener,
    ) -> impl Stream<Item = Result<TlsConn, io::Error>> + Send + 'static {
        self.incoming_with(listener, IncomingOptions::default())
    }

    /// As [`ServerTls::incoming`]. Handshakes run concurrently in their own
    /// tasks, at most `max_handshakes` at once (then accepting waits), each
    /// within `handshake_timeout`; a failed one is logged at debug and
    /// skipped, and never ends the stream. Accepting stops when the stream is
    /// dropped. Needs a tokio runtime.
    pub fn incoming_with(
        &self,
        listener: TcpListener,
        options: IncomingOptions,
    ) -> impl Stream<Item = Result<TlsConn, io::Error>> + Send + 'static {
        let (tx, rx) = mpsc::channel(options.max_handshakes.clamp(1, 1024));
        let local = listener.local_addr().ok();
        let span = tracing::debug_span!("tls_accept", local = ?local);
        tokio::spawn(accept_loop(self.clone(), listener, options, tx).instrument(span));
        ReceiverStream::new(rx)
    }
}

/// Limits of [`ServerTls::incoming_with`].
#[derive(Debug, Clone)]
pub struct IncomingOptions {
    /// A client that has not finished its handshake by then is dropped.
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once; accepting waits beyond.
    pub max_handshakes: usize,
    /// TCP_NODELAY on accepted sockets.
    pub nodelay: bool,
}

impl Default for IncomingOptions {
    fn default() -> Self {
        IncomingOptions {
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 256,
            nodelay: true,
        }
    }
}

async fn accept_loop(
    tls: ServerTls,
    listener: TcpListener,
    options: IncomingOptions,
    tx: mpsc::Sender<Result<TlsConn, io::Error>>,
) {
    let permits = Arc::new(Semaphore::new(options.max_handshakes.max(1)));
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = tx.closed() => return,
        };
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    debug!(error = %e, "accept failed");
                    // Out of file descriptors and the like: do not spin.
                    if !matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
                    ) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    continue;
                }
            },
            _ = tx.closed() => return,
        };
        if options.nodelay {
            let _ = stream.set_nodelay(true);
        }
        let acceptor = TlsAcceptor::from(tls.config());
        let tx = tx.clone();
        let timeout = options.handshake_timeout;
        tokio::spawn(
            async move {
                let result = tokio::time::timeout(timeout, acceptor.accept(stream)).await;
                drop(permit);
                let stream = match result {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        debug!(%remote, error = %e, "tls handshake failed");
                        return;
                    }
                    Err(_) => {
                        debug!(%remote, ?timeout, "tls handshake timed out");
                        return;
                    }
                };
                let peer = peer_info(&stream, remote);
                let _ = tx.send(Ok(TlsConn { stream, peer })).await;
            }
            .in_current_span(),
        );
    }
}

fn peer_info(stream: &TlsStream<TcpStream>, remote: SocketAddr) -> PeerInfo {
    let mut info = PeerInfo {
        remote: Some(remote),
        identity: None,
        cert_not_after_unix: None,
    };
    let Some(leaf) = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
    else {
        return info;
    };
    match cert_facts(leaf) {
        Ok(facts) => {
            info.cert_not_after_unix = Some(facts.not_after_unix);
            match facts.identity {
                Ok(identity) => info.identity = Some(identity),
                Err(e) => debug!(%remote, error = %e, "client certificate without identity"),
            }
        }
        Err(e) => debug!(%remote, error = %e, "client certificate unreadable"),
    }
    info
}

/// An accepted TLS connection and what is known of its peer.
#[derive(Debug)]
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    peer: PeerInfo,
}

impl TlsConn {
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }

    /// The rustls connection, e.g. for the negotiated ALPN protocol.
    pub fn get_ref(&self) -> (&TcpStream, &rustls::ServerConnection) {
        self.stream.get_ref()
    }
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn stamps(files: &ServerTlsFiles) -> [Option<Stamp>; 3] {
    [
        stamp(&files.cert),
        stamp(&files.key),
        stamp(&files.client_ca),
    ]
}

fn load_files(files: &ServerTlsFiles) -> Result<Loaded, TlsError> {
    let provider = provider();

    let cert_bytes = pem::read(&files.cert)?;
    let chain = pem::certs(&files.cert, &cert_bytes)?;
    let facts = cert_facts(&chain[0]).map_err(|e| TlsError::Pem {
        path: files.cert.clone(),
        reason: e.to_string(),
    })?;

    let key_bytes = pem::read(&files.key)?;
    let key = pem::key(&files.key, &key_bytes)?;
    let signing_key = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| TlsError::BadPrivateKey {
            path: files.key.clone(),
            reason: e.to_string(),
        })?;
    CertifiedKey::new(chain.clone(), signing_key)
        .keys_match()
        .map_err(|_| TlsError::KeyMismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
        })?;

    let ca_bytes = pem::read(&files.client_ca)?;
    let mut roots = RootCertStore::empty();
    for cert in pem::certs(&files.client_ca, &ca_bytes)? {
        roots.add(cert).map_err(|e| TlsError::BadCa {
            path: files.client_ca.clone(),
            reason: e.to_string(),
        })?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::BadCa {
            path: files.client_ca.clone(),
            reason: e.to_string(),
        })?;

    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(format!("{}: {e}", files.cert.display())))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Loaded {
        config: Arc::new(config),
        not_after_unix: facts.not_after_unix,
        serial: facts.serial_hex,
    })
}
