//! Drains: an operator's intent that a fault domain carries less traffic.
//!
//! A drain of domain D with fraction f withdraws f of the capacity of
//! everything below D. Drains that cover the same edge compose as a product:
//! an edge keeps `Π (1 − fᵢ)` of its capacity over every drain `i` covering
//! it. A fraction of 1 empties the domain: its edges get no weight at all.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::domain::DomainPath;
use crate::fleet::Fleet;

/// One drain, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Drain {
    pub domain: DomainPath,
    /// Fraction of capacity withdrawn, in (0, 1].
    pub fraction: f64,
    pub reason: String,
    /// Team or person responsible.
    pub owner: String,
    /// Who asked for it.
    pub created_by: String,
    pub created_at_ms: i64,
    /// Its step schedule and expiry; `None` for a drain that took effect
    /// in one step and never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<crate::schedule::Progress>,
    /// Why its guardrails were overridden (`--force`), if they were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forced: Option<String>,
    /// The drill it belongs to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drill: Option<String>,
}

/// Why a drain request cannot be accepted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DrainError {
    #[error("unknown fault domain {0}: the fleet has no edge or origin below it")]
    UnknownDomain(String),
    #[error("bad fault domain: {0}")]
    BadDomain(#[from] crate::domain::DomainPathError),
    #[error("fraction must be in (0, 1], got {0}")]
    BadFraction(f64),
    #[error("a reason is required")]
    MissingReason,
}

impl Drain {
    /// The fraction it moves towards (its last step).
    pub fn target(&self) -> f64 {
        self.progress
            .as_ref()
            .map_or(self.fraction, |p| p.schedule.target())
    }

    /// Whether it is on its way out (undraining).
    pub fn undraining(&self) -> bool {
        self.progress
            .as_ref()
            .is_some_and(|p| matches!(p.phase, crate::schedule::Phase::Undraining { .. }))
    }

    /// Checks a drain request against the fleet.
    pub fn check(
        fleet: &Fleet,
        domain: &str,
        fraction: f64,
        reason: &str,
    ) -> Result<DomainPath, DrainError> {
        let path = DomainPath::parse(domain)?;
        if !fleet.domains.contains_key(&path) {
            return Err(DrainError::UnknownDomain(domain.to_owned()));
        }
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(DrainError::BadFraction(fraction));
        }
        if reason.trim().is_empty() {
            return Err(DrainError::MissingReason);
        }
        Ok(path)
    }
}

/// The active drains, by domain.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DrainSet {
    drains: BTreeMap<DomainPath, Drain>,
}

impl DrainSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces the drain of its domain.
    pub fn insert(&mut self, drain: Drain) -> Option<Drain> {
        self.drains.insert(drain.domain.clone(), drain)
    }

    pub fn remove(&mut self, domain: &DomainPath) -> Option<Drain> {
        self.drains.remove(domain)
    }

    pub fn get(&self, domain: &DomainPath) -> Option<&Drain> {
        self.drains.get(domain)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Drain> {
        self.drains.values()
    }

    pub fn len(&self) -> usize {
        self.drains.len()
    }

    pub fn is_empty(&self) -> bool {
        self.drains.is_empty()
    }

    /// Share of capacity kept by something in `domains` (every domain it is
    /// in): the product of (1 − f) over the drains of those domains.
    pub fn factor<I>(&self, domains: I) -> f64
    where
        I: IntoIterator<Item = DomainPath>,
    {
        if self.drains.is_empty() {
            return 1.0;
        }
        domains
            .into_iter()
            .filter_map(|d| self.drains.get(&d))
            .fold(1.0, |acc, d| acc * (1.0 - d.fraction))
    }

    /// The drains that cover something in `domains`.
    pub fn covering<I>(&self, domains: I) -> Vec<&Drain>
    where
        I: IntoIterator<Item = DomainPath>,
    {
        domains
            .into_iter()
            .filter_map(|d| self.drains.get(&d))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(domain: &str, fraction: f64) -> Drain {
        Drain {
            domain: DomainPath::parse(domain).expect(domain),
            fraction,
            reason: "test".into(),
            owner: "sre".into(),
            created_by: "alice".into(),
            created_at_ms: 0,
            progress: None,
            forced: None,
            drill: None,
        }
    }

    fn site_domains() -> Vec<DomainPath> {
        let site = DomainPath::parse("region/eu/metro/ams/site/ams1").expect("site");
        site.ancestors()
            .chain([DomainPath::parse("provider/cdn-a").expect("provider")])
            .collect()
    }

    #[test]
    fn no_drain_keeps_everything() {
        assert_eq!(DrainSet::new().factor(site_domains()), 1.0);
    }

    #[test]
    fn drains_compose_as_a_product() {
        let mut set = DrainSet::new();
        set.insert(drain("region/eu", 0.5));
        set.insert(drain("region/eu/metro/ams", 0.5));
        set.insert(drain("provider/cdn-a", 0.2));
        let f = set.factor(site_domains());
        assert!((f - 0.5 * 0.5 * 0.8).abs() < 1e-12, "{f}");
        assert_eq!(set.covering(site_domains()).len(), 3);
    }

    #[test]
    fn a_full_drain_anywhere_above_empties() {
        let mut set = DrainSet::new();
        set.insert(drain("region/eu", 1.0));
        set.insert(drain("provider/cdn-a", 0.3));
        assert_eq!(set.factor(site_domains()), 0.0);
    }

    #[test]
    fn drains_elsewhere_do_not_apply() {
        let mut set = DrainSet::new();
        set.insert(drain("region/eu-west", 1.0));
        set.insert(drain("region/eu/metro/par", 1.0));
        assert_eq!(set.factor(site_domains()), 1.0);
    }

    #[test]
    fn replacing_a_drain_keeps_one_per_domain() {
        let mut set = DrainSet::new();
        set.insert(drain("region/eu", 0.5));
        let old = set.insert(drain("region/eu", 0.25));
        assert_eq!(old.map(|d| d.fraction), Some(0.5));
        assert_eq!(set.len(), 1);
        assert!((set.factor(site_domains()) - 0.75).abs() < 1e-12);
    }
}
