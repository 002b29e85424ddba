//! Errors of this crate: each names the file or the certificate field at fault.

use std::path::PathBuf;

/// What went wrong loading TLS material or reading an identity.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: bad PEM: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("{path}: no CERTIFICATE block in the file")]
    NoCertificate { path: PathBuf },
    #[error(
        "{path}: no private key (PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY block) in the file"
    )]
    NoPrivateKey { path: PathBuf },
    #[error("{path}: unusable private key: {reason}")]
    BadPrivateKey { path: PathBuf, reason: String },
    #[error("key {key} does not match the certificate {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{path}: not a usable CA certificate: {reason}")]
    BadCa { path: PathBuf, reason: String },
    #[error("cannot build the TLS config: {0}")]
    Config(String),
    #[error("certificate is not valid X.509: {0}")]
    CertParse(String),
    #[error("certificate has no SAN URI of the form spiffe://sextant/<kind>/<id>")]
    NoIdentity,
    #[error("certificate has several sextant identities ({0} and {1})")]
    SeveralIdentities(String, String),
    #[error("bad identity URI {uri:?}: {reason}")]
    BadIdentity { uri: String, reason: String },
    #[error("--tls-cert and --tls-key go together: {0}")]
    CertWithoutKey(String),
    #[error("tls connection to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("peer identity {found} is not of kind {expected}")]
    WrongKind { expected: String, found: String },
}

impl TlsError {
    /// The file at fault, if the error is about one.
    pub fn path(&self) -> Option<&std::path::Path> {
        match self {
            TlsError::Read { path, .. }
            | TlsError::Pem { path, .. }
            | TlsError::NoCertificate { path }
            | TlsError::NoPrivateKey { path }
            | TlsError::BadPrivateKey { path, .. }
            | TlsError::BadCa { path, .. } => Some(path),
            TlsError::KeyMismatch { key, .. } => Some(key),
            _ => None,
        }
    }
}
