//! Health and capacity signals, as the decision logic sees them.
//!
//! Per edge: a health verdict, and what the edge reports about itself: its
//! measured capacity and its current load. Edges without an entry are
//! [`Health::Unknown`], which routing treats as usable, with their declared
//! capacity. The solver plans with the *effective capacity*:
//! `min(declared, measured) × drain factor`; current load is shown in
//! explanations (the solver predicts load from demand, it does not read it).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::EdgeId;

/// Health verdict of an edge.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// No signal yet: treated as usable.
    #[default]
    Unknown,
    Up,
    Down,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Up => "up",
            Self::Down => "down",
        }
    }

    /// Whether routing may send traffic to it.
    pub fn usable(self) -> bool {
        self != Self::Down
    }
}

/// What is known about one edge.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EdgeSignal {
    pub health: Health,
    /// Why the verdict is what it is.
    pub reason: String,
    /// Capacity the edge reports it can serve now, rps (e.g. fewer hosts in
    /// rotation). Routing uses the lower of this and the declared capacity;
    /// a value that is not a finite number ≥ 0 is ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured_capacity_rps: Option<f64>,
    /// Load the edge reports serving now, rps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_load_rps: Option<f64>,
    /// Since when (ms) the verdict holds (0: unknown).
    #[serde(default)]
    pub since_ms: i64,
    /// Flap-damping penalty.
    #[serde(default)]
    pub penalty: f64,
    /// Held down by flap damping.
    #[serde(default)]
    pub damped: bool,
    /// Looks down, but automation's bound keeps it in the routing (an
    /// alarm; `health` is then `up` so that routing uses it).
    #[serde(default)]
    pub held: bool,
}

/// Signals about every edge, by id; edges without an entry are unknown.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Signals {
    pub edges: BTreeMap<EdgeId, EdgeSignal>,
}

impl Signals {
    pub fn health(&self, edge: &EdgeId) -> Health {
        self.edges.get(edge).map(|s| s.health).unwrap_or_default()
    }

    /// The capacity to plan with before drains: the declared capacity, or
    /// the measured one when it is lower.
    pub fn capacity(&self, edge: &EdgeId, declared_rps: f64) -> f64 {
        match self.edges.get(edge).and_then(|s| s.measured_capacity_rps) {
            Some(m) if m.is_finite() && m >= 0.0 => m.min(declared_rps),
            _ => declared_rps,
        }
    }

    /// The load the edge reports, if any.
    pub fn current_load(&self, edge: &EdgeId) -> Option<f64> {
        self.edges
            .get(edge)
            .and_then(|s| s.current_load_rps)
            .filter(|l| l.is_finite())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measured_capacity_only_lowers_the_declared_one() {
        let mut s = Signals::default();
        let e = EdgeId::from("e");
        assert_eq!(s.capacity(&e, 100.0), 100.0);
        for (measured, want) in [
            (60.0, 60.0),
            (150.0, 100.0),
            (f64::NAN, 100.0),
            (-1.0, 100.0),
        ] {
            s.edges.insert(
                e.clone(),
                EdgeSignal {
                    measured_capacity_rps: Some(measured),
                    ..EdgeSignal::default()
                },
            );
            assert_eq!(s.capacity(&e, 100.0), want, "{measured}");
        }
        assert!(Health::Unknown.usable() && Health::Up.usable() && !Health::Down.usable());
    }

    #[test]
    fn old_signals_json_still_loads() {
        let s: Signals =
            serde_json::from_str(r#"{"edges":{"e":{"health":"down","reason":"probe"}}}"#)
                .expect("json");
        assert_eq!(s.health(&EdgeId::from("e")), Health::Down);
        assert_eq!(s.current_load(&EdgeId::from("e")), None);
    }
}
