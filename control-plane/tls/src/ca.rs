//! A small certificate authority for Sextant clusters, behind `sextant-ca`.
//!
//! One ECDSA P-256 CA signs leaf certificates whose identity is the SAN URI
//! `spiffe://sextant/<kind>/<id>`. Replicas also get DNS/IP SANs so that
//! clients verify them by name as usual.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

use crate::{Identity, Kind};

/// File names of the CA inside its directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// The CA's private key, written with mode 0600.
pub const CA_KEY_FILE: &str = "ca.key";

/// Errors of the CA tool.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path} already exists: refusing to overwrite a CA")]
    Exists { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("cannot make the certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// A CA in memory: its certificate and key, PEM.
#[derive(Clone)]
pub struct Ca {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

/// What to put in a leaf certificate.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    pub identity: Identity,
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
    /// Validity from now (backdated by an hour for clock skew).
    pub days: u32,
}

impl IssueRequest {
    /// A request with the defaults of `sextant-ca issue`: 90 days, and for a
    /// `replica` the names `localhost`, `127.0.0.1` and `::1`.
    pub fn new(identity: Identity) -> Self {
        let (dns_names, ips) = if identity.kind == Kind::Replica {
            (
                vec!["localhost".to_owned()],
                vec![
                    IpAddr::from([127, 0, 0, 1]),
                    IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
                ],
            )
        } else {
            (Vec::new(), Vec::new())
        };
        IssueRequest {
            identity,
            dns_names,
            ips,
            days: 90,
        }
    }
}

/// A leaf certificate and its key, PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").finish_non_exhaustive()
    }
}

impl Ca {
    /// A new CA valid for `days`, named `name` (its subject CN).
    pub fn generate(name: &str, days: u32) -> Result<Self, CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Sextant");
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, days)?;
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Reads `ca.crt` and `ca.key` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let read = |name: &str| {
            let path = dir.join(name);
            fs::read_to_string(&path).map_err(|source| CaError::Read { path, source })
        };
        let ca = Ca {
            cert_pem: read(CA_CERT_FILE)?,
            key_pem: read(CA_KEY_FILE)?,
        };
        // Fail here, naming the file, rather than at the first issue.
        ca.issuer().map_err(|(file, reason)| CaError::BadFile {
            path: dir.join(file),
            reason,
        })?;
        Ok(ca)
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, (&'static str, String)> {
        let key = KeyPair::from_pem(&self.key_pem).map_err(|e| (CA_KEY_FILE, e.to_string()))?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, key)
            .map_err(|e| (CA_CERT_FILE, e.to_string()))?;
        Ok(issuer)
    }

    /// Signs a new leaf certificate with a fresh key.
    pub fn issue(&self, req: &IssueRequest) -> Result<Issued, CaError> {
        let issuer = self
            .issuer()
            .map_err(|(file, reason)| CaError::BadRequest(format!("the CA's {file}: {reason}")))?;
        if req.days == 0 {
            return Err(CaError::BadRequest("--days must be at least 1".into()));
        }
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Sextant");
        dn.push(
            DnType::CommonName,
            format!("{}/{}", req.identity.kind, req.identity.id),
        );
        params.distinguished_name = dn;
        let uri = req.identity.uri();
        let mut sans =
            vec![SanType::URI(uri.as_str().try_into().map_err(|e| {
                CaError::BadRequest(format!("URI {uri}: {e}"))
            })?)];
        for name in &req.dns_names {
            let ia5 = name
                .as_str()
                .try_into()
                .map_err(|e| CaError::BadRequest(format!("DNS name {name:?}: {e}")))?;
            sans.push(SanType::DnsName(ia5));
        }
        sans.extend(req.ips.iter().copied().map(SanType::IpAddress));
        params.subject_alt_names = sans;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if !req.dns_names.is_empty() || !req.ips.is_empty() {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, req.days)?;
        params.serial_number = Some(random_serial()?);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn set_validity(params: &mut CertificateParams, days: u32) -> Result<(), CaError> {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now
        .checked_add(Duration::days(i64::from(days)))
        .filter(|t| t.year() <= 9999)
        .ok_or_else(|| CaError::BadRequest(format!("{days} days is too long")))?;
    Ok(())
}

fn random_serial() -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    crate::provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| CaError::BadRequest("no secure random source".into()))?;
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // and no leading zero byte to strip
    Ok(SerialNumber::from_slice(&bytes))
}

/// `sextant-ca init DIR`: a new CA in `DIR/ca.crt` and `DIR/ca.key` (0600).
pub fn init(dir: &Path, name: &str, days: u32) -> Result<Ca, CaError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    for path in [&cert_path, &key_path] {
        if path.exists() {
            return Err(CaError::Exists { path: path.clone() });
        }
    }
    fs::create_dir_all(dir).map_err(|source| CaError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let ca = Ca::generate(name, days)?;
    write_file(&key_path, ca.key_pem.as_bytes(), true)?;
    write_file(&cert_path, ca.cert_pem.as_bytes(), false)?;
    Ok(ca)
}

/// `sextant-ca issue`: signs `req` with the CA in `dir` and writes
/// `PREFIX.crt` and `PREFIX.key` (0600). Returns the two paths.
pub fn issue_to_files(
    dir: &Path,
    req: &IssueRequest,
    prefix: &Path,
) -> Result<(PathBuf, PathBuf), CaError> {
    let ca = Ca::load(dir)?;
    let issued = ca.issue(req)?;
    let cert_path = with_suffix(prefix, "crt");
    let key_path = with_suffix(prefix, "key");
    if let Some(parent) = prefix.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(|source| CaError::Write {
            path: parent.to_owned(),
            source,
        })?;
    }
    write_file(&key_path, issued.key_pem.as_bytes(), true)?;
    write_file(&cert_path, issued.cert_pem.as_bytes(), false)?;
    Ok((cert_path, key_path))
}

fn with_suffix(prefix: &Path, ext: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

/// Writes through a temporary file and a rename, so that a server polling
/// the path never reads half a file; keys get mode 0600 from the start.
pub fn write_file(path: &Path, contents: &[u8], secret: bool) -> Result<(), CaError> {
    let err = |source| CaError::Write {
        path: path.to_owned(),
        source,
    };
    let tmp = with_suffix(path, "tmp");
    // A stale temporary file would keep its old mode.
    let _ = fs::remove_file(&tmp);
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(&tmp).map_err(err)?;
    file.write_all(contents).map_err(err)?;
    file.sync_all().map_err(err)?;
    drop(file);
    fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;

    #[test]
    fn init_and_issue_write_files_with_the_identity() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        init(&ca_dir, "test", 10).unwrap();
        assert!(matches!(
            init(&ca_dir, "test", 10),
            Err(CaError::Exists { .. })
        ));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(ca_dir.join(CA_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let req = IssueRequest::new(Identity::new(Kind::Replica, "cp-1").unwrap());
        let (cert, key) = issue_to_files(&ca_dir, &req, &dir.path().join("out/cp-1")).unwrap();
        assert!(cert.ends_with("out/cp-1.crt") && key.ends_with("out/cp-1.key"));
        let pem = fs::read_to_string(&cert).unwrap();
        let der = rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let facts = crate::identity::cert_facts(&der).unwrap();
        assert_eq!(facts.identity.unwrap(), req.identity);
        assert!(req.dns_names == ["localhost"] && req.ips.len() == 2);
        assert!(IssueRequest::new(Identity::new(Kind::Edge, "e").unwrap())
            .dns_names
            .is_empty());
    }

    #[test]
    fn a_missing_or_broken_ca_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let req = IssueRequest::new(Identity::new(Kind::Edge, "e1").unwrap());
        let err = issue_to_files(dir.path(), &req, &dir.path().join("e1")).unwrap_err();
        assert!(err.to_string().contains("ca.crt"), "{err}");
        init(dir.path(), "test", 10).unwrap();
        fs::write(dir.path().join(CA_KEY_FILE), "junk").unwrap();
        let err = issue_to_files(dir.path(), &req, &dir.path().join("e1")).unwrap_err();
        assert!(err.to_string().contains("ca.key"), "{err}");
    }
}
