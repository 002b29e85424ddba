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
#![forbid(unsafe_code)]

pub mod ca;
mod client;
mod error;
mod identity;
mod metrics;
mod pem;
mod server;

pub use client::{probe_server, ClientTls, PeerCert};
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
