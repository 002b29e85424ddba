//! The audit log: an append-only record of every action that changes
//! routing, with who, when, why, and the routing versions before and after.

use serde::{Deserialize, Serialize};

/// One audit record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Grows by one per record.
    pub seq: u64,
    pub at_ms: i64,
    /// Who: an operator name, or `sextant-cp` for start-up actions.
    pub actor: String,
    /// `fleet.apply`, `drain`, `undrain`, ...
    pub action: String,
    /// The object acted on: a domain path, a fleet generation.
    pub target: String,
    pub reason: String,
    pub routing_version_before: u64,
    pub routing_version_after: u64,
    /// Extra facts, `key=value`.
    #[serde(default)]
    pub details: Vec<String>,
}
