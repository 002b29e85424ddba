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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, SanType};

    fn cert_with(sans: Vec<SanType>) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn a_good_uri_parses_and_round_trips() {
        let id = Identity::from_uri("spiffe://sextant/edge/ams1-edge_3.v2").unwrap();
        assert_eq!(id.kind, Kind::Edge);
        assert_eq!(id.id, "ams1-edge_3.v2");
        assert_eq!(id.to_string(), "spiffe://sextant/edge/ams1-edge_3.v2");
        assert_eq!(id.uri().parse::<Identity>().unwrap(), id);
        for kind in Kind::ALL {
            let id = Identity::new(kind, "x").unwrap();
            assert_eq!(Identity::from_uri(&id.uri()).unwrap(), id);
        }
    }

    #[test]
    fn bad_uris_say_what_is_wrong() {
        let reason = |s: &str| match Identity::from_uri(s).unwrap_err() {
            TlsError::BadIdentity { reason, .. } => reason,
            e => panic!("{e}"),
        };
        assert!(reason("https://sextant/edge/e1").contains("spiffe://sextant/"));
        assert!(reason("spiffe://other/edge/e1").contains("spiffe://sextant/"));
        assert!(reason("spiffe://sextant/edge").contains("<kind>/<id>"));
        assert!(reason("spiffe://sextant/admin/e1").contains("unknown kind \"admin\""));
        assert!(reason("spiffe://sextant/Edge/e1").contains("unknown kind"));
        assert!(reason("spiffe://sextant/edge/").contains("empty"));
        assert!(reason("spiffe://sextant/edge/a/b").contains("'/'"));
        assert!(reason("spiffe://sextant/edge/a?b").contains("'?'"));
        assert!(reason("spiffe://sextant/edge/é").contains("'é'"));
        assert!(reason("spiffe://sextant/edge/..").contains(".."));
        let long = "x".repeat(MAX_ID_LEN + 1);
        assert!(reason(&format!("spiffe://sextant/edge/{long}")).contains("at most 128"));
        assert!(
            Identity::from_uri(&format!("spiffe://sextant/edge/{}", "x".repeat(MAX_ID_LEN)))
                .is_ok()
        );
    }

    #[test]
    fn kinds_parse_by_name() {
        assert_eq!("replica".parse::<Kind>().unwrap(), Kind::Replica);
        assert_eq!(
            "admin".parse::<Kind>().unwrap_err().to_string(),
            "unknown kind \"admin\" (expected edge, dns, probe, operator or replica)"
        );
    }

    #[test]
    fn the_identity_is_the_one_sextant_uri_of_the_certificate() {
        let der = cert_with(vec![
            SanType::DnsName("localhost".try_into().unwrap()),
            uri("https://example.com/x"),
            uri("spiffe://sextant/replica/cp-1"),
        ]);
        assert_eq!(
            Identity::from_cert_der(&der).unwrap(),
            Identity::new(Kind::Replica, "cp-1").unwrap()
        );
        // Scheme and host are case-insensitive, as in any URI.
        let der = cert_with(vec![uri("SPIFFE://Sextant/dns/ns1")]);
        assert_eq!(
            Identity::from_cert_der(&der).unwrap(),
            Identity::new(Kind::Dns, "ns1").unwrap()
        );
    }

    #[test]
    fn no_wrong_or_several_uris_give_no_identity() {
        // Nothing else counts: not the DNS name, not another trust domain.
        let der = cert_with(vec![
            SanType::DnsName("edge.sextant".try_into().unwrap()),
            uri("spiffe://other/edge/e1"),
        ]);
        assert!(matches!(
            Identity::from_cert_der(&der),
            Err(TlsError::NoIdentity)
        ));
        let der = cert_with(vec![]);
        assert!(matches!(
            Identity::from_cert_der(&der),
            Err(TlsError::NoIdentity)
        ));
        let der = cert_with(vec![uri("spiffe://sextant/admin/root")]);
        let err = Identity::from_cert_der(&der).unwrap_err();
        assert!(err.to_string().contains("unknown kind"), "{err}");
        let der = cert_with(vec![uri("spiffe://sextant/edge/a%2Fb")]);
        assert!(matches!(
            Identity::from_cert_der(&der),
            Err(TlsError::BadIdentity { .. })
        ));
        let der = cert_with(vec![
            uri("spiffe://sextant/edge/e1"),
            uri("spiffe://sextant/replica/cp-1"),
        ]);
        assert!(matches!(
            Identity::from_cert_der(&der),
            Err(TlsError::SeveralIdentities(..))
        ));
        assert!(matches!(
            Identity::from_cert_der(b"not der"),
            Err(TlsError::CertParse(_))
        ));
    }
}
