//! The client side: CA, certificate and key files for a tonic `Endpoint`.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::net::TcpStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use crate::identity::cert_facts;
use crate::{pem, provider, Identity, Kind, TlsError};

/// A client's TLS files (`--tls-ca`, `--tls-cert`, `--tls-key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    /// The CA that the server's certificate must chain to.
    pub ca: PathBuf,
    /// The client certificate chain, leaf first; with `key`, or neither
    /// (an operator with a bearer token only).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// The client's material, read and checked.
struct Material {
    ca: Vec<u8>,
    roots: RootCertStore,
    identity: Option<(Vec<u8>, Vec<u8>, CertifiedParts)>,
}

type CertifiedParts = (
    Vec<CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
);

impl ClientTls {
    fn material(&self) -> Result<Material, TlsError> {
        let ca = pem::read(&self.ca)?;
        let mut roots = RootCertStore::empty();
        for cert in pem::certs(&self.ca, &ca)? {
            roots.add(cert).map_err(|e| TlsError::BadCa {
                path: self.ca.clone(),
                reason: e.to_string(),
            })?;
        }
        let identity = match (&self.cert, &self.key) {
            (None, None) => None,
            (Some(c), None) => {
                return Err(TlsError::CertWithoutKey(format!(
                    "{} has no key",
                    c.display()
                )))
            }
            (None, Some(k)) => {
                return Err(TlsError::CertWithoutKey(format!(
                    "{} has no certificate",
                    k.display()
                )))
            }
            (Some(cert_path), Some(key_path)) => {
                let cert_bytes = pem::read(cert_path)?;
                let chain = pem::certs(cert_path, &cert_bytes)?;
                let key_bytes = pem::read(key_path)?;
                let key = pem::key(key_path, &key_bytes)?;
                let signing_key = provider()
                    .key_provider
                    .load_private_key(key.clone_key())
                    .map_err(|e| TlsError::BadPrivateKey {
                        path: key_path.clone(),
                        reason: e.to_string(),
                    })?;
                CertifiedKey::new(chain.clone(), signing_key)
                    .keys_match()
                    .map_err(|_| TlsError::KeyMismatch {
                        cert: cert_path.clone(),
                        key: key_path.clone(),
                    })?;
                Some((cert_bytes, key_bytes, (chain, key)))
            }
        };
        Ok(Material {
            ca,
            roots,
            identity,
        })
    }

    /// tonic's client TLS config: verify the server against the CA by name
    /// (the URL's host), and present the client certificate if there is one.
    /// Reads the files now, failing with the file at fault.
    pub fn tonic_config(&self) -> Result<ClientTlsConfig, TlsError> {
        let m = self.material()?;
        let config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&m.ca));
        Ok(with_identity(config, &m))
    }

    /// An endpoint for an `https://` URL with this TLS config.
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, TlsError> {
        let endpoint = https_endpoint(url)?;
        endpoint
            .tls_config(self.tonic_config()?)
            .map_err(|e| TlsError::Config(format!("{url}: {e}")))
    }

    /// As [`ClientTls::endpoint`], and the server must also present an
    /// identity of kind `kind` (e.g. [`Kind::Replica`]), or the handshake fails.
    pub fn endpoint_expecting(&self, url: &str, kind: Kind) -> Result<Endpoint, TlsError> {
        let endpoint = https_endpoint(url)?;
        let m = self.material()?;
        let verifier = KindVerifier::new(m.roots.clone(), kind)?;
        endpoint
            .tls_config_with_verifier(
                with_identity(ClientTlsConfig::new(), &m),
                Arc::new(verifier),
            )
            .map_err(|e| TlsError::Config(format!("{url}: {e}")))
    }

    /// A plain rustls client config (ring provider, TLS 1.2 and 1.3, ALPN h2).
    pub fn rustls_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let m = self.material()?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(m.roots);
        let mut config = match m.identity {
            Some((_, _, (chain, key))) => builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsError::Config(e.to_string()))?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

fn https_endpoint(url: &str) -> Result<Endpoint, TlsError> {
    if !url.starts_with("https://") {
        return Err(TlsError::Config(format!(
            "{url}: a TLS endpoint needs an https:// URL (plaintext is --insecure)"
        )));
    }
    Endpoint::from_shared(url.to_owned()).map_err(|e| TlsError::Config(format!("{url}: {e}")))
}

fn with_identity(config: ClientTlsConfig, m: &Material) -> ClientTlsConfig {
    match &m.identity {
        Some((cert, key, _)) => config.identity(tonic::transport::Identity::from_pem(cert, key)),
        None => config,
    }
}

/// What a server presented, as seen by [`probe_server`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    /// `Err` text if the certificate has no sextant identity.
    pub identity: Result<Identity, String>,
    pub not_after_unix: i64,
    /// Hex with colons, as [`crate::ServerTls::cert_serial`].
    pub serial: String,
}

/// Connects to `addr`, completes a TLS handshake verifying the server as
/// `server_name`, and returns what the server presented. For health checks
/// of certificates (expiry, rotation) and tests.
pub async fn probe_server(
    addr: &str,
    server_name: &str,
    tls: &ClientTls,
) -> Result<PeerCert, TlsError> {
    let err = |reason: String| TlsError::Connect {
        addr: addr.to_owned(),
        reason,
    };
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|e| err(format!("server name {server_name:?}: {e}")))?;
    let connector = tokio_rustls::TlsConnector::from(tls.rustls_config()?);
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| err(e.to_string()))?;
    let stream = connector
        .connect(name, tcp)
        .await
        .map_err(|e| err(format!("handshake: {e}")))?;
    let leaf = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| err("the server sent no certificate".into()))?;
    let facts = cert_facts(leaf)?;
    Ok(PeerCert {
        identity: facts.identity.map_err(|e| e.to_string()),
        not_after_unix: facts.not_after_unix,
        serial: facts.serial_hex,
    })
}

/// The WebPKI verifier (chain to the CA, name, validity), and then the
/// server's sextant identity must be of the expected kind.
#[derive(Debug)]
struct KindVerifier {
    inner: Arc<WebPkiServerVerifier>,
    kind: Kind,
}

impl KindVerifier {
    fn new(roots: RootCertStore, kind: Kind) -> Result<Self, TlsError> {
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        Ok(KindVerifier { inner, kind })
    }
}

impl ServerCertVerifier for KindVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        match Identity::from_cert_der(end_entity) {
            Ok(identity) if identity.kind == self.kind => Ok(verified),
            Ok(identity) => {
                tracing::debug!(%identity, expected = %self.kind, "server identity of the wrong kind");
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::ApplicationVerificationFailure,
                ))
            }
            Err(e) => {
                tracing::debug!(error = %e, "server certificate without identity");
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::ApplicationVerificationFailure,
                ))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// An endpoint to the control plane at `url`: with `tls`, an `https://`
/// URL whose server must present a `replica` identity from the CA; without,
/// plaintext `http://` (the control plane must run with `--insecure`).
pub fn control_plane_endpoint(url: &str, tls: Option<&ClientTls>) -> Result<Endpoint, TlsError> {
    match tls {
        Some(t) => t.endpoint_expecting(url, Kind::Replica),
        None if url.starts_with("https://") => Err(TlsError::Config(format!(
            "{url}: an https:// control plane needs --tls-ca (and --tls-cert/--tls-key for a client identity)"
        ))),
        None => Endpoint::from_shared(url.to_owned())
            .map_err(|e| TlsError::Config(format!("{url}: {e}"))),
    }
}

/// The client TLS flags every process that calls the control plane takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientTlsArgs {
    /// CA certificate (PEM) the control plane's certificate must chain to;
    /// turns TLS on (the control-plane URL must then be https://).
    #[arg(long, env = "SEXTANT_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// This client's certificate chain (PEM), whose SAN URI
    /// spiffe://sextant/KIND/ID says who it is.
    #[arg(long, env = "SEXTANT_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// This client's private key (PEM).
    #[arg(long, env = "SEXTANT_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl ClientTlsArgs {
    /// The TLS settings the flags ask for (`None`: plaintext), checked by
    /// reading the files once.
    pub fn client(&self) -> Result<Option<ClientTls>, TlsError> {
        let Some(ca) = &self.tls_ca else {
            if let Some(cert) = &self.tls_cert {
                return Err(TlsError::Config(format!(
                    "--tls-cert {} without --tls-ca: give the CA that signed the control plane's certificate",
                    cert.display()
                )));
            }
            return Ok(None);
        };
        let c = ClientTls {
            ca: ca.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
        };
        c.rustls_config()?;
        Ok(Some(c))
    }
}
