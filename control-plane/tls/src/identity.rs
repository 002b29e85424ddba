//! Who a peer is: the SAN URI `spiffe://sextant/<kind>/<id>` of its certificate.
//!
//! Nothing else in a certificate (CN, DNS names) names a Sextant identity: a
//! certificate without exactly one such URI has no identity, and the caller
//! refuses it.

use std::fmt;
use std::str::FromStr;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::TlsError;

/// The trust domain and scheme every identity URI starts with.
pub const URI_PREFIX: &str = "spiffe://sextant/";

/// The longest identity id accepted.
pub const MAX_ID_LEN: usize = 128;

/// What kind of party a certificate was issued to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// An edge proxy agent (`sextant-edge`).
    Edge,
    /// A GeoDNS server (`sextant-dns`).
    Dns,
    /// A prober reporting probe results.
    Probe,
    /// A human or a script using `sextantctl`.
    Operator,
    /// A control-plane replica (`sextant-cp`), as server and as peer client.
    Replica,
}

impl Kind {
    /// Every kind, in a stable order.
    pub const ALL: [Kind; 5] = [
        Kind::Edge,
        Kind::Dns,
        Kind::Probe,
        Kind::Operator,
        Kind::Replica,
    ];

    /// The name used in the URI and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Edge => "edge",
            Kind::Dns => "dns",
            Kind::Probe => "probe",
            Kind::Operator => "operator",
            Kind::Replica => "replica",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kind name is not one of `edge`, `dns`, `probe`, `operator`, `replica`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown kind {0:?} (expected edge, dns, probe, operator or replica)")]
pub struct UnknownKind(pub String);

impl FromStr for Kind {
    type Err = UnknownKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownKind(s.to_owned()))
    }
}

/// A peer's identity: `spiffe://sextant/<kind>/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub kind: Kind,
    pub id: String,
}

impl Identity {
    /// An identity from its parts, checking the id.
    pub fn new(kind: Kind, id: impl Into<String>) -> Result<Self, TlsError> {
        let id = id.into();
        check_id(&id).map_err(|reason| TlsError::BadIdentity {
            uri: format!("{URI_PREFIX}{kind}/{id}"),
            reason,
        })?;
        Ok(Identity { kind, id })
    }

    /// The URI written in the certificate's SAN.
    pub fn uri(&self) -> String {
        format!("{URI_PREFIX}{}/{}", self.kind, self.id)
    }

    /// Parses `spiffe://sextant/<kind>/<id>`.
    pub fn from_uri(uri: &str) -> Result<Self, TlsError> {
        let bad = |reason: &str| TlsError::BadIdentity {
            uri: uri.to_owned(),
            reason: reason.to_owned(),
        };
        let Some(rest) = uri.strip_prefix(URI_PREFIX) else {
            return Err(bad("must start with spiffe://sextant/"));
        };
        let Some((kind, id)) = rest.split_once('/') else {
            return Err(bad("must be spiffe://sextant/<kind>/<id>"));
        };
        let kind: Kind = kind.parse().map_err(|e: UnknownKind| bad(&e.to_string()))?;
        check_id(id).map_err(|reason| bad(&reason))?;
        Ok(Identity {
            kind,
            id: id.to_owned(),
        })
    }

    /// The identity in a DER certificate: its one SAN URI under
    /// `spiffe://sextant/`. Other URIs are ignored; none, several, or a
    /// malformed one is an error.
    pub fn from_cert_der(der: &[u8]) -> Result<Self, TlsError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| TlsError::CertParse(e.to_string()))?;
        from_parsed(&cert)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{URI_PREFIX}{}/{}", self.kind, self.id)
    }
}

impl FromStr for Identity {
    type Err = TlsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Identity::from_uri(s)
    }
}

/// What a peer certificate says, for [`crate::PeerInfo`] and for metrics.
#[derive(Debug)]
pub(crate) struct CertFacts {
    pub identity: Result<Identity, TlsError>,
    pub not_after_unix: i64,
    pub serial_hex: String,
}

pub(crate) fn cert_facts(der: &[u8]) -> Result<CertFacts, TlsError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| TlsError::CertParse(e.to_string()))?;
    Ok(CertFacts {
        identity: from_parsed(&cert),
        not_after_unix: cert.validity().not_after.timestamp(),
        serial_hex: cert.raw_serial_as_string(),
    })
}

fn from_parsed(cert: &X509Certificate<'_>) -> Result<Identity, TlsError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| TlsError::CertParse(format!("subjectAltName: {e}")))?;
    let mut found: Option<(Identity, &str)> = None;
    for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
        let GeneralName::URI(uri) = name else {
            continue;
        };
        // Case-insensitive scheme and host, as URIs are; the path is exact.
        let is_ours = uri.len() >= URI_PREFIX.len()
            && uri.is_char_boundary(URI_PREFIX.len())
            && uri[..URI_PREFIX.len()].eq_ignore_ascii_case(URI_PREFIX);
        if !is_ours {
            continue;
        }
        let normalized = format!("{URI_PREFIX}{}", &uri[URI_PREFIX.len()..]);
        let identity = Identity::from_uri(&normalized).map_err(|e| match e {
            TlsError::BadIdentity { reason, .. } => TlsError::BadIdentity {
                uri: (*uri).to_owned(),
                reason,
            },
            other => other,
        })?;
        if let Some((_, first)) = &found {
            return Err(TlsError::SeveralIdentities(
                (*first).to_owned(),
                (*uri).to_owned(),
            ));
        }
        found = Some((identity, uri));
    }
    found.map(|(i, _)| i).ok_or(TlsError::NoIdentity)
}

fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("the id is empty".into());
    }
    if id.len() > MAX_ID_LEN {
        return Err(format!(
            "the id is {} characters long (at most {MAX_ID_LEN})",
            id.len()
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "the id has the character {c:?} (allowed: A-Z a-z 0-9 . _ -)"
        ));
    }
    if id == "." || id == ".." {
        return Err("the id cannot be . or ..".into());
    }
    Ok(())
}
