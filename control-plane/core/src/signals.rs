//! Health and capacity signals, as the decision logic sees them.
//!
//! For now the control plane has no signal sources, so every edge is
//! [`Health::Unknown`], which routing treats as usable. The health issue
//! fills this with verdicts computed from edge reports and probes.

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
}
