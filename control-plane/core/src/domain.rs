//! Fault-domain paths: the failure hierarchy, written as paths.
//!
//! ```text
//! region/eu-west                         a region
//! region/eu-west/metro/ams               a metro in it
//! region/eu-west/metro/ams/site/ams1     a site (where edges run)
//! region/us-east/origin/dc1              an origin datacenter in a region
//! provider/cdn-a                         a third-party CDN provider
//! ```
//!
//! Draining a domain drains everything below it: `region/eu-west` covers its
//! metros, sites and origins. A third-party edge sits below its site path and
//! also below its provider.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ids::check_id;

/// What level of the hierarchy a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DomainKind {
    Region,
    Metro,
    Site,
    Origin,
    Provider,
}

impl DomainKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Region => "region",
            Self::Metro => "metro",
            Self::Site => "site",
            Self::Origin => "origin",
            Self::Provider => "provider",
        }
    }
}

impl fmt::Display for DomainKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a string is not a fault-domain path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid fault-domain path {path:?}: {reason}")]
pub struct DomainPathError {
    pub path: String,
    pub reason: String,
}

/// A valid fault-domain path, in canonical form.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DomainPath {
    path: String,
    kind: DomainKind,
}

const SHAPES: &str = "expected region/R, region/R/metro/M, region/R/metro/M/site/S, \
                      region/R/origin/O or provider/P";

impl DomainPath {
    /// Parses and checks a path.
    pub fn parse(s: &str) -> Result<Self, DomainPathError> {
        let err = |reason: String| DomainPathError {
            path: s.to_owned(),
            reason,
        };
        let parts: Vec<&str> = s.split('/').collect();
        if !parts.len().is_multiple_of(2) || parts.is_empty() {
            return Err(err(SHAPES.into()));
        }
        let labels: Vec<&str> = parts.iter().step_by(2).copied().collect();
        let kind = match labels.as_slice() {
            ["region"] => DomainKind::Region,
            ["region", "metro"] => DomainKind::Metro,
            ["region", "metro", "site"] => DomainKind::Site,
            ["region", "origin"] => DomainKind::Origin,
            ["provider"] => DomainKind::Provider,
            _ => return Err(err(SHAPES.into())),
        };
        for (label, name) in parts.chunks(2).map(|c| (c[0], c[1])) {
            check_id(name).map_err(|e| err(format!("{label} name {e}")))?;
        }
        Ok(Self {
            path: s.to_owned(),
            kind,
        })
    }

    /// Builds `region/R/metro/M/site/S` style paths from parts; the result is
    /// checked like a parsed one.
    pub fn site(region: &str, metro: &str, site: &str) -> Result<Self, DomainPathError> {
        Self::parse(&format!("region/{region}/metro/{metro}/site/{site}"))
    }

    pub fn provider(name: &str) -> Result<Self, DomainPathError> {
        Self::parse(&format!("provider/{name}"))
    }

    pub fn as_str(&self) -> &str {
        &self.path
    }

    pub fn kind(&self) -> DomainKind {
        self.kind
    }

    /// The last name (`ams1` for `.../site/ams1`).
    pub fn name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or(&self.path)
    }

    /// The domain directly above, if any (a region and a provider have none).
    pub fn parent(&self) -> Option<DomainPath> {
        let kind = match self.kind {
            DomainKind::Region | DomainKind::Provider => return None,
            DomainKind::Metro | DomainKind::Origin => DomainKind::Region,
            DomainKind::Site => DomainKind::Metro,
        };
        let mut cut = self.path.len();
        for _ in 0..2 {
            cut = self.path[..cut].rfind('/')?;
        }
        Some(Self {
            path: self.path[..cut].to_owned(),
            kind,
        })
    }

    /// This path and every domain above it, from this one up.
    pub fn ancestors(&self) -> impl Iterator<Item = DomainPath> {
        std::iter::successors(Some(self.clone()), |p| p.parent())
    }

    /// The region this domain is in (itself for a region), none for a provider.
    pub fn region(&self) -> Option<DomainPath> {
        self.ancestors().find(|p| p.kind == DomainKind::Region)
    }

    /// Whether `other` is this domain or below it.
    pub fn covers(&self, other: &DomainPath) -> bool {
        other.path == self.path
            || (other.path.starts_with(&self.path)
                && other.path.as_bytes().get(self.path.len()) == Some(&b'/'))
    }
}

impl FromStr for DomainPath {
    type Err = DomainPathError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for DomainPath {
    type Error = DomainPathError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<DomainPath> for String {
    fn from(p: DomainPath) -> Self {
        p.path
    }
}

impl fmt::Display for DomainPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> DomainPath {
        DomainPath::parse(s).expect(s)
    }

    #[test]
    fn parses_every_shape() {
        assert_eq!(p("region/eu-west").kind(), DomainKind::Region);
        assert_eq!(p("region/eu-west/metro/ams").kind(), DomainKind::Metro);
        assert_eq!(
            p("region/eu-west/metro/ams/site/ams1").kind(),
            DomainKind::Site
        );
        assert_eq!(p("region/us-east/origin/dc1").kind(), DomainKind::Origin);
        assert_eq!(p("provider/cdn-a").kind(), DomainKind::Provider);
        assert_eq!(p("region/eu-west/metro/ams/site/ams1").name(), "ams1");
    }

    #[test]
    fn rejects_bad_paths_with_a_reason() {
        for bad in [
            "",
            "region",
            "region/",
            "region/EU",
            "region/eu/site/ams1",
            "metro/ams",
            "region/eu/metro/ams/site/ams1/rack/r1",
            "provider/cdn-a/site/x",
            "region/eu//metro",
            "/region/eu",
            "region/eu/",
        ] {
            let e = DomainPath::parse(bad).expect_err(bad);
            assert_eq!(e.path, bad);
            assert!(!e.reason.is_empty());
        }
    }

    #[test]
    fn hierarchy() {
        let site = p("region/eu-west/metro/ams/site/ams1");
        let chain: Vec<String> = site.ancestors().map(|a| a.to_string()).collect();
        assert_eq!(
            chain,
            [
                "region/eu-west/metro/ams/site/ams1",
                "region/eu-west/metro/ams",
                "region/eu-west"
            ]
        );
        assert_eq!(
            p("region/us-east/origin/dc1").parent(),
            Some(p("region/us-east"))
        );
        assert_eq!(p("provider/cdn-a").parent(), None);
        assert_eq!(site.region(), Some(p("region/eu-west")));
        assert_eq!(p("provider/cdn-a").region(), None);
    }

    #[test]
    fn covers_is_by_path_segment_not_by_string_prefix() {
        assert!(p("region/eu").covers(&p("region/eu/metro/ams")));
        assert!(p("region/eu").covers(&p("region/eu")));
        assert!(!p("region/eu").covers(&p("region/eu-west/metro/ams")));
        assert!(!p("region/eu/metro/ams").covers(&p("region/eu")));
    }

    #[test]
    fn serde_round_trip_checks() {
        let json = serde_json::to_string(&p("region/eu")).expect("serialize");
        assert_eq!(json, "\"region/eu\"");
        let back: DomainPath = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, p("region/eu"));
        assert!(serde_json::from_str::<DomainPath>("\"nope\"").is_err());
    }
}
