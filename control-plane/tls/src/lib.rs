//! Mutual TLS for every Sextant link (issue 11).
//!
//! - [`Identity`]: who a peer is, from the SAN URI `spiffe://sextant/<kind>/<id>`
//!   of its certificate.
//! - [`ServerTls`]: a server config read from files and re-read when they
//!   change; [`ServerTls::incoming`] turns a `TcpListener` into a stream of
//!   [`TlsConn`] for tonic's `serve_with_incoming`, and handlers read
//!   [`PeerInfo`] from the request extensions.
//! - [`ClientTls`]: CA, certificate and key files for a tonic `Endpoint`.
//! - [`ca`]: the small CA behind the `sextant-ca` binary.
//!
//! ```no_run
//! # async fn example(health: tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>) -> anyhow::Result<()> {
//! use sextant_tls::{ClientTls, Kind, PeerInfo, ServerTls, ServerTlsFiles};
//! // Server (sextant-cp --tls-cert --tls-key --tls-client-ca):
//! let tls = ServerTls::load(ServerTlsFiles {
//!     cert: "/etc/sextant/tls/server.crt".into(),
//!     key: "/etc/sextant/tls/server.key".into(),
//!     client_ca: "/etc/sextant/tls/ca.crt".into(),
//! })?;
//! let _watch = tls.spawn_watch(std::time::Duration::from_secs(5));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:50051").await?;
//! let server = tonic::transport::Server::builder()
//!     .add_service(health)
//!     .serve_with_incoming(tls.incoming(listener));
//! // In a handler or tower layer:
//! fn who(req: &tonic::Request<()>) -> Option<&sextant_tls::Identity> {
//!     req.extensions().get::<PeerInfo>()?.identity.as_ref()
//! }
//!
//! // Client (--tls-ca --tls-cert --tls-key):
//! let client = ClientTls {
//!     ca: "/etc/sextant/tls/ca.crt".into(),
//!     cert: Some("/etc/sextant/tls/edge.crt".into()),
//!     key: Some("/etc/sextant/tls/edge.key".into()),
//! };
//! let channel = client.endpoint_expecting("https://cp-1.example:50051", Kind::Replica)?
//!     .connect()
//!     .await?;
//! # drop((server, channel)); Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod ca;
mod client;
mod error;
mod identity;
mod metrics;
mod pem;
mod server;

pub use client::{control_plane_endpoint, probe_server, ClientTls, ClientTlsArgs, PeerCert};
pub use error::TlsError;
pub use identity::{Identity, Kind, UnknownKind, MAX_ID_LEN, URI_PREFIX};
pub use metrics::TlsMetrics;
pub use server::{IncomingOptions, PeerInfo, ServerTls, ServerTlsFiles, TlsConn};

/// The one crypto provider used: ring. aws-lc-rs, the rustls default, needs
/// cmake and a C build; rustls 0.23.48 deprecates ring's provider only because
/// it has no post-quantum key exchange (X25519, P-256 and P-384 remain).
#[allow(deprecated)]
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}
