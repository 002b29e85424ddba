//! Who may do what: principals, roles, the permission each gRPC method
//! needs, operators' domain scopes, and bearer tokens.
//!
//! A request's principal comes from its client certificate (SAN URI
//! `spiffe://sextant/<kind>/<id>`) or from a bearer token; with
//! `--insecure` (plaintext, for development) every request is
//! [`Principal::Insecure`] and may do everything, as before authentication
//! existed. Operators have a role from the policy file (certificates) or
//! from their token: `viewer` reads, `operator` also drains, undrains and
//! runs drills (within its scopes, if it has any), `admin` also applies
//! fleets, loads RIBs, forces guardrails and manages tokens. Nodes may do
//! only their own work: an edge subscribes and reports as its own id, a
//! DNS server subscribes as a DNS node, a prober reports probes and lists
//! the edges it probes. Replicas may call everything: a follower forwards
//! writes to the leader on behalf of the original principal, which travels
//! in [`ON_BEHALF_OF`] and is believed only from a replica.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use sextant_core::DomainPath;

/// Metadata a replica sets on a forwarded request: the principal it acts
/// for (JSON).
pub const ON_BEHALF_OF: &str = "x-sextant-on-behalf-of";

/// An operator's role; each includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub fn parse(s: &str) -> Result<Self, AuthError> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(AuthError::BadRole(other.to_owned())),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

/// A data-plane node's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    Edge,
    Dns,
    Probe,
}

/// Who a request comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Principal {
    /// A person or a tool: by certificate (`token` empty) or by token.
    Operator {
        name: String,
        role: Role,
        /// Domains it may drain; empty: all.
        scopes: Vec<String>,
        /// The token's id when authenticated by token.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        token: String,
    },
    Node {
        kind: NodeKind,
        id: String,
    },
    Replica {
        id: String,
    },
    /// `--insecure`: nobody is authenticated.
    Insecure,
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Operator { name, token, .. } if token.is_empty() => {
                write!(f, "operator/{name}")
            }
            Principal::Operator { name, token, .. } => write!(f, "token/{name} ({token})"),
            Principal::Node { kind, id } => write!(f, "{}/{id}", kind_str(*kind)),
            Principal::Replica { id } => write!(f, "replica/{id}"),
            Principal::Insecure => f.write_str("unauthenticated (--insecure)"),
        }
    }
}

fn kind_str(k: NodeKind) -> &'static str {
    match k {
        NodeKind::Edge => "edge",
        NodeKind::Dns => "dns",
        NodeKind::Probe => "probe",
    }
}

/// What a method needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Anyone connected (the standard health service).
    Open,
    /// A viewer.
    Read,
    /// A viewer, or a prober (it lists the edges it probes).
    ReadOrProbe,
    Operate,
    Admin,
    /// A node of this kind (or, for `Subscribe`, edge or DNS).
    Node(&'static [NodeKind]),
}

/// The need of a gRPC method by its path (`/package.Service/Method`);
/// `None` for a method this server does not know (refused).
pub fn need(path: &str) -> Option<Need> {
    let (service, method) = path.trim_start_matches('/').split_once('/')?;
    let service = service.strip_prefix("sextant.v1.").unwrap_or(service);
    Some(match (service, method) {
        ("grpc.health.v1.Health", _) => Need::Open,
        (s, _) if s.starts_with("grpc.reflection.") => Need::Read,
        ("FleetService", "Apply") => Need::Admin,
        ("FleetService", "ListEdges") => Need::ReadOrProbe,
        ("FleetService", "Get" | "Diff" | "ListDomains" | "ListServices" | "ListGroups") => {
            Need::Read
        }
        ("OperationsService", "Drain" | "Undrain" | "StartDrill" | "AbortDrill") => Need::Operate,
        (
            "OperationsService",
            "ListDrains" | "WatchDrains" | "ListDrills" | "GetDrillReport" | "ListAudit",
        ) => Need::Read,
        ("SteeringService", "GetRoutingTable" | "Explain" | "ListVersions" | "NMinusOne") => {
            Need::Read
        }
        ("ClusterService", "Status") => Need::Read,
        ("BgpService", "LoadRib") => Need::Admin,
        ("BgpService", "GetRib" | "Lookup" | "ListBmpSessions") => Need::Read,
        ("TokenService", "Create" | "List" | "Revoke") => Need::Admin,
        ("DistributionService", "Subscribe") => Need::Node(&[NodeKind::Edge, NodeKind::Dns]),
        ("SignalsService", "ReportEdge") => Need::Node(&[NodeKind::Edge]),
        ("SignalsService", "ReportProbes") => Need::Node(&[NodeKind::Probe]),
        _ => return None,
    })
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no credentials: present a client certificate or a bearer token (sextantctl --token or SEXTANT_TOKEN)")]
    Unauthenticated,
    #[error("{0}")]
    Denied(String),
    #[error("unknown role {0:?}: one of viewer, operator, admin")]
    BadRole(String),
    #[error("the token is not valid: {0}")]
    BadToken(String),
}

/// Whether `who` may call a method that needs `need`.
pub fn allows(who: &Principal, need: Need, method: &str) -> Result<(), AuthError> {
    let denied = |why: String| {
        Err(AuthError::Denied(format!(
            "{who} may not call {method}: {why}"
        )))
    };
    match (who, need) {
        (_, Need::Open) | (Principal::Insecure | Principal::Replica { .. }, _) => Ok(()),
        (Principal::Operator { role, .. }, Need::Read | Need::ReadOrProbe) => {
            let _ = role;
            Ok(())
        }
        (Principal::Operator { role, .. }, Need::Operate) if *role >= Role::Operator => Ok(()),
        (Principal::Operator { role, .. }, Need::Admin) if *role >= Role::Admin => Ok(()),
        (Principal::Operator { role, .. }, Need::Operate | Need::Admin) => denied(format!(
            "role {} is not enough (needs {})",
            role.as_str(),
            if need == Need::Operate {
                "operator"
            } else {
                "admin"
            }
        )),
        (Principal::Operator { .. }, Need::Node(_)) => denied("only data-plane nodes may".into()),
        (
            Principal::Node {
                kind: NodeKind::Probe,
                ..
            },
            Need::ReadOrProbe,
        ) => Ok(()),
        (Principal::Node { kind, .. }, Need::Node(kinds)) if kinds.contains(kind) => Ok(()),
        (Principal::Node { kind, .. }, _) => denied(format!(
            "{} nodes may only do their own work",
            kind_str(*kind)
        )),
    }
}

/// Whether `who` may drain, undrain or drill `domain` (its scopes).
pub fn may_touch(who: &Principal, domain: &str) -> Result<(), AuthError> {
    let Principal::Operator { scopes, .. } = who else {
        return Ok(());
    };
    if scopes.is_empty() {
        return Ok(());
    }
    let Ok(target) = domain.parse::<DomainPath>() else {
        // Unparsable domains are refused by the drain's own checks.
        return Ok(());
    };
    let inside = scopes.iter().any(|s| {
        s.parse::<DomainPath>()
            .is_ok_and(|scope| scope.covers(&target))
    });
    if inside {
        Ok(())
    } else {
        Err(AuthError::Denied(format!(
            "{who} may act only within {}, not on {domain}",
            scopes.join(", ")
        )))
    }
}

/// Whether `who` may speak as the data-plane node `id` of `kind`: a node
/// only as itself; replicas (forwarding) and `--insecure` as anyone.
pub fn may_act_as(who: &Principal, kind: NodeKind, id: &str) -> Result<(), AuthError> {
    match who {
        Principal::Insecure | Principal::Replica { .. } => Ok(()),
        Principal::Node { kind: k, id: i } if *k == kind && i == id => Ok(()),
        Principal::Node { .. } => Err(AuthError::Denied(format!(
            "{who} may not act as {}/{id}: a node speaks only as itself",
            kind_str(kind)
        ))),
        Principal::Operator { .. } => Err(AuthError::Denied(format!(
            "{who} may not act as {}/{id}: only data-plane nodes may",
            kind_str(kind)
        ))),
    }
}

/// Whether `who` may override guardrails (`--force`): admins only.
pub fn may_force(who: &Principal) -> Result<(), AuthError> {
    match who {
        Principal::Operator { role, .. } if *role < Role::Admin => Err(AuthError::Denied(format!(
            "{who} may not force past guardrails: role {} is not enough (needs admin)",
            role.as_str()
        ))),
        _ => Ok(()),
    }
}

/// The policy file: operators known by certificate, with their role and
/// scopes.
///
/// ```toml
/// [[operators]]
/// name = "alice"                 # spiffe://sextant/operator/alice
/// role = "operator"
/// scopes = ["region/eu-west"]    # optional: where they may drain
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default)]
    pub operators: Vec<OperatorSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorSpec {
    pub name: String,
    pub role: Role,
    #[serde(default)]
    pub scopes: Vec<String>,
}

/// Why a policy file is refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy: {0}")]
    Parse(String),
    #[error("policy: operators[{index}] {name:?}: {problem}")]
    Entry {
        index: usize,
        name: String,
        problem: String,
    },
}

impl Policy {
    pub fn from_toml(text: &str) -> Result<Self, PolicyError> {
        let p: Policy = toml::from_str(text).map_err(|e| PolicyError::Parse(e.to_string()))?;
        let mut seen = BTreeMap::new();
        for (index, o) in p.operators.iter().enumerate() {
            let bad = |problem: String| PolicyError::Entry {
                index,
                name: o.name.clone(),
                problem,
            };
            if !valid_name(&o.name) {
                return Err(bad("names are 1 to 128 of A-Z a-z 0-9 . _ -".into()));
            }
            if let Some(first) = seen.insert(o.name.clone(), index) {
                return Err(bad(format!("also listed as operators[{first}]")));
            }
            for s in &o.scopes {
                s.parse::<DomainPath>()
                    .map_err(|e| bad(format!("scope {s:?}: {e}")))?;
            }
        }
        Ok(p)
    }

    /// The principal of an operator certificate named `name`.
    pub fn operator(&self, name: &str) -> Result<Principal, AuthError> {
        self.operators
            .iter()
            .find(|o| o.name == name)
            .map(|o| Principal::Operator {
                name: o.name.clone(),
                role: o.role,
                scopes: o.scopes.clone(),
                token: String::new(),
            })
            .ok_or_else(|| {
                AuthError::Denied(format!(
                    "operator/{name} has a valid certificate but is not in the policy file"
                ))
            })
    }
}

/// Names of operators and tokens.
pub fn valid_name(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A bearer token as stored: never the secret, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredToken {
    pub id: String,
    pub name: String,
    pub role: Role,
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Hex SHA-256 of the secret.
    pub hash: String,
    pub created_at_ms: i64,
    pub created_by: String,
    pub expires_at_ms: i64,
    #[serde(default)]
    pub revoked: bool,
}

/// Token text: `sxt_<id>_<secret>`, id 12 hex digits, secret 64.
pub const TOKEN_PREFIX: &str = "sxt_";

/// A new token's id and secret, from the OS's random source.
pub fn new_token() -> Result<(String, String), AuthError> {
    use ring::rand::SecureRandom;
    let rng = ring::rand::SystemRandom::new();
    let mut bytes = [0u8; 38];
    rng.fill(&mut bytes)
        .map_err(|_| AuthError::BadToken("the system random source failed".into()))?;
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    Ok((hex(&bytes[..6]), hex(&bytes[6..])))
}

/// The text a client presents.
pub fn token_text(id: &str, secret: &str) -> String {
    format!("{TOKEN_PREFIX}{id}_{secret}")
}

/// Hex SHA-256 of a secret.
pub fn hash_secret(secret: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, secret.as_bytes())
        .as_ref()
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// Splits presented token text into (id, secret).
pub fn parse_token(text: &str) -> Result<(&str, &str), AuthError> {
    let rest = text
        .strip_prefix(TOKEN_PREFIX)
        .ok_or_else(|| AuthError::BadToken("it does not start with sxt_".into()))?;
    let (id, secret) = rest
        .split_once('_')
        .ok_or_else(|| AuthError::BadToken("malformed".into()))?;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex(id, 12) || !hex(secret, 64) {
        return Err(AuthError::BadToken("malformed".into()));
    }
    Ok((id, secret))
}

/// Checks a presented secret against a stored token at `now_ms`.
pub fn check_token(t: &StoredToken, secret: &str, now_ms: i64) -> Result<Principal, AuthError> {
    // Compare the hashes in constant time.
    let presented = hash_secret(secret);
    let same = presented.len() == t.hash.len()
        && presented
            .bytes()
            .zip(t.hash.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if !same {
        return Err(AuthError::BadToken(format!(
            "token {} does not match",
            t.id
        )));
    }
    if t.revoked {
        return Err(AuthError::BadToken(format!("token {} was revoked", t.id)));
    }
    if now_ms >= t.expires_at_ms {
        return Err(AuthError::BadToken(format!("token {} expired", t.id)));
    }
    Ok(Principal::Operator {
        name: t.name.clone(),
        role: t.role,
        scopes: t.scopes.clone(),
        token: t.id.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(role: Role, scopes: &[&str]) -> Principal {
        Principal::Operator {
            name: "alice".into(),
            role,
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            token: String::new(),
        }
    }

    #[test]
    fn every_method_has_a_need_and_unknown_ones_none() {
        assert_eq!(need("/sextant.v1.FleetService/Apply"), Some(Need::Admin));
        assert_eq!(
            need("/sextant.v1.OperationsService/Drain"),
            Some(Need::Operate)
        );
        assert_eq!(
            need("/sextant.v1.SteeringService/Explain"),
            Some(Need::Read)
        );
        assert_eq!(need("/grpc.health.v1.Health/Check"), Some(Need::Open));
        assert_eq!(need("/sextant.v1.FleetService/Nope"), None);
        assert_eq!(need("garbage"), None);
    }

    /// A new RPC without a need would be refused to everyone: every RPC of
    /// the wire contract has one.
    #[test]
    fn every_rpc_in_the_protos_has_a_need() {
        let protos = [
            include_str!("../../proto/sextant/v1/bgp.proto"),
            include_str!("../../proto/sextant/v1/cluster.proto"),
            include_str!("../../proto/sextant/v1/distribution.proto"),
            include_str!("../../proto/sextant/v1/fleet.proto"),
            include_str!("../../proto/sextant/v1/operations.proto"),
            include_str!("../../proto/sextant/v1/signals.proto"),
            include_str!("../../proto/sextant/v1/steering.proto"),
            include_str!("../../proto/sextant/v1/tokens.proto"),
        ];
        let mut seen = 0;
        for text in protos {
            let mut service = "";
            for line in text.lines().map(str::trim) {
                if let Some(rest) = line.strip_prefix("service ") {
                    service = rest.split_whitespace().next().unwrap_or_default();
                } else if let Some(rest) = line.strip_prefix("rpc ") {
                    let method = rest.split('(').next().unwrap_or_default().trim();
                    let path = format!("/sextant.v1.{service}/{method}");
                    assert!(need(&path).is_some(), "{path} has no need");
                    seen += 1;
                }
            }
        }
        assert!(seen >= 31, "only {seen} RPCs found");
    }

    #[test]
    fn roles_nest_and_nodes_do_only_their_own_work() {
        let m = "X";
        assert!(allows(&op(Role::Viewer, &[]), Need::Read, m).is_ok());
        let e = allows(&op(Role::Viewer, &[]), Need::Operate, m).expect_err("viewer drains");
        assert!(
            e.to_string()
                .contains("role viewer is not enough (needs operator)"),
            "{e}"
        );
        assert!(allows(&op(Role::Operator, &[]), Need::Operate, m).is_ok());
        assert!(allows(&op(Role::Operator, &[]), Need::Admin, m).is_err());
        assert!(allows(&op(Role::Admin, &[]), Need::Admin, m).is_ok());
        assert!(allows(&op(Role::Admin, &[]), Need::Node(&[NodeKind::Edge]), m).is_err());
        let edge = Principal::Node {
            kind: NodeKind::Edge,
            id: "ams1".into(),
        };
        let probe = Principal::Node {
            kind: NodeKind::Probe,
            id: "p1".into(),
        };
        assert!(allows(&edge, Need::Node(&[NodeKind::Edge, NodeKind::Dns]), m).is_ok());
        assert!(allows(&edge, Need::Node(&[NodeKind::Probe]), m).is_err());
        assert!(allows(&edge, Need::Read, m).is_err());
        assert!(allows(&edge, Need::ReadOrProbe, m).is_err());
        assert!(allows(&probe, Need::ReadOrProbe, m).is_ok());
        assert!(allows(&probe, Need::Operate, m).is_err());
        assert!(allows(&Principal::Insecure, Need::Admin, m).is_ok());
    }

    #[test]
    fn scopes_limit_where_an_operator_acts() {
        let scoped = op(Role::Operator, &["region/eu-west"]);
        assert!(may_touch(&scoped, "region/eu-west").is_ok());
        assert!(may_touch(&scoped, "region/eu-west/metro/ams").is_ok());
        let e = may_touch(&scoped, "region/us-east").expect_err("outside");
        assert!(
            e.to_string()
                .contains("only within region/eu-west, not on region/us-east"),
            "{e}"
        );
        assert!(may_touch(&scoped, "provider/cdn-a").is_err());
        assert!(may_touch(&op(Role::Operator, &[]), "region/us-east").is_ok());
        assert!(may_force(&op(Role::Operator, &[])).is_err());
        let edge = Principal::Node {
            kind: NodeKind::Edge,
            id: "ams1".into(),
        };
        assert!(may_act_as(&edge, NodeKind::Edge, "ams1").is_ok());
        let e = may_act_as(&edge, NodeKind::Edge, "fra1").expect_err("another edge");
        assert!(e.to_string().contains("may not act as edge/fra1"), "{e}");
        assert!(may_act_as(&edge, NodeKind::Dns, "ams1").is_err());
        assert!(may_act_as(&Principal::Insecure, NodeKind::Dns, "x").is_ok());
        assert!(may_force(&op(Role::Admin, &[])).is_ok());
    }

    #[test]
    fn policy_files_are_checked() {
        let p = Policy::from_toml(
            "[[operators]]\nname = \"alice\"\nrole = \"operator\"\nscopes = [\"region/eu-west\"]\n",
        )
        .expect("good");
        assert!(matches!(
            p.operator("alice"),
            Ok(Principal::Operator {
                role: Role::Operator,
                ..
            })
        ));
        assert!(p.operator("bob").is_err());
        for (bad, says) in [
            ("[[operators]]\nname = \"a\"\nrole = \"root\"\n", "unknown variant"),
            ("[[operators]]\nname = \"a b\"\nrole = \"admin\"\n", "operators[0] \"a b\""),
            (
                "[[operators]]\nname = \"a\"\nrole = \"admin\"\n[[operators]]\nname = \"a\"\nrole = \"viewer\"\n",
                "also listed as operators[0]",
            ),
            (
                "[[operators]]\nname = \"a\"\nrole = \"admin\"\nscopes = [\"planet/x\"]\n",
                "scope \"planet/x\"",
            ),
        ] {
            let e = Policy::from_toml(bad).expect_err(bad).to_string();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn tokens_check_hash_expiry_and_revocation() {
        let (id, secret) = new_token().expect("random");
        let text = token_text(&id, &secret);
        let (pid, psecret) = parse_token(&text).expect("parses");
        assert_eq!((pid, psecret), (id.as_str(), secret.as_str()));
        let mut t = StoredToken {
            id: id.clone(),
            name: "ci".into(),
            role: Role::Viewer,
            scopes: vec![],
            hash: hash_secret(&secret),
            created_at_ms: 0,
            created_by: "operator/root".into(),
            expires_at_ms: 1000,
            revoked: false,
        };
        assert!(!t.hash.contains(&secret));
        assert!(matches!(
            check_token(&t, &secret, 10),
            Ok(Principal::Operator {
                role: Role::Viewer,
                ..
            })
        ));
        let (_, other) = new_token().expect("random");
        assert!(check_token(&t, &other, 10).is_err());
        assert!(check_token(&t, &secret, 1000)
            .expect_err("expired")
            .to_string()
            .contains("expired"));
        t.revoked = true;
        assert!(check_token(&t, &secret, 10)
            .expect_err("revoked")
            .to_string()
            .contains("revoked"));
        assert!(parse_token("sxt_zz_00").is_err());
        assert!(parse_token("Bearer x").is_err());
    }

    #[test]
    fn principals_round_trip_for_forwarding() {
        for p in [op(Role::Admin, &["region/a"]), Principal::Insecure] {
            let json = serde_json::to_string(&p).expect("encodes");
            assert_eq!(
                serde_json::from_str::<Principal>(&json).expect("decodes"),
                p
            );
        }
    }
}
