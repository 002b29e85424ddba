//! The routing table: the decision that is pushed to GeoDNS and edge proxies.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::{ConfigVersion, EdgeId, GroupId, OriginId, ServiceId};

/// Tolerance for "weights sum to 1".
pub const WEIGHT_EPSILON: f64 = 1e-9;

/// One edge and its share of a group's demand.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EdgeWeight {
    pub edge: EdgeId,
    /// In (0, 1].
    pub weight: f64,
}

/// One origin and its share of an edge's upstream traffic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OriginWeight {
    pub origin: OriginId,
    pub weight: f64,
}

/// Routing of one (service, client group).
///
/// Fields added after the first release carry `#[serde(default)]`, so that
/// tables stored before them still load.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupRouting {
    /// Demand of the group for the service, rps.
    pub demand_rps: f64,
    /// Edges with non-zero weight, sorted by edge id.
    pub weights: Vec<EdgeWeight>,
    /// Share of demand that no edge takes; weights + unserved = 1.
    pub unserved: f64,
    /// Every candidate was unhealthy, so they were all treated as healthy.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub failed_open: bool,
    /// Notes about this row, for operators.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// The row moved as far as the service's `max_shift` allows and is not
    /// yet where the solver wants it: a later solve moves it further.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shift_limited: bool,
}

impl GroupRouting {
    pub fn weight_of(&self, edge: &EdgeId) -> f64 {
        self.weights
            .iter()
            .find(|w| &w.edge == edge)
            .map_or(0.0, |w| w.weight)
    }

    /// Sum of the weights plus the unserved share (1 for a valid row).
    pub fn total(&self) -> f64 {
        self.weights.iter().map(|w| w.weight).sum::<f64>() + self.unserved
    }
}

/// Predicted state of one edge under a routing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EdgeLoad {
    pub predicted_load_rps: f64,
    /// Capacity left after drains, rps.
    pub effective_capacity_rps: f64,
    /// Predicted load over declared capacity.
    pub utilization: f64,
    /// Upstream split across origins.
    pub origins: Vec<OriginWeight>,
    /// Load the solver plans for at most: effective capacity × target
    /// utilization, rps. Above it the edge runs hot (only when the
    /// alternative is unserved demand).
    #[serde(default)]
    pub limit_rps: f64,
    /// Marginal cost of one more rps on this edge after the solve, in
    /// objective units: 0 with spare capacity, positive when capacity binds
    /// (what more capacity here would save).
    #[serde(default)]
    pub price: f64,
}

/// Predicted state of one origin under a routing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OriginLoad {
    pub predicted_load_rps: f64,
    /// Capacity left after drains, rps.
    pub effective_capacity_rps: f64,
    /// Predicted load over effective capacity.
    pub utilization: f64,
}

/// Facts about a solve as a whole.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SolveSummary {
    /// The policies' objective: latency and money weighted, plus penalties
    /// for running hot and for unserved demand (stability terms excluded).
    pub objective: f64,
    /// Demand no edge takes, rps.
    pub unserved_rps: f64,
    /// Share of demand that changed edge compared with the previous table.
    pub churn: f64,
    /// Rows held back by `max_shift`.
    pub shift_limited_rows: u64,
    /// Rows that failed open.
    pub failed_open_rows: u64,
    /// Some rows are held back by `max_shift`: solve again after the step
    /// interval to move further.
    pub pending_shift: bool,
    /// Fleet-wide notes (edges running hot, origins short of capacity).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// The content of a routing decision.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Routing {
    pub services: BTreeMap<ServiceId, BTreeMap<GroupId, GroupRouting>>,
    pub edges: BTreeMap<EdgeId, EdgeLoad>,
    /// Predicted load per origin.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub origins: BTreeMap<OriginId, OriginLoad>,
    #[serde(default)]
    pub summary: SolveSummary,
}

impl Routing {
    pub fn row(&self, service: &ServiceId, group: &GroupId) -> Option<&GroupRouting> {
        self.services.get(service)?.get(group)
    }

    /// Every (service, group, row), in order.
    pub fn rows(&self) -> impl Iterator<Item = (&ServiceId, &GroupId, &GroupRouting)> {
        self.services
            .iter()
            .flat_map(|(s, groups)| groups.iter().map(move |(g, r)| (s, g, r)))
    }
}

/// Facts about one routing version.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoutingMeta {
    pub version: ConfigVersion,
    pub computed_at_ms: i64,
    pub fleet_generation: u64,
    /// What caused this version.
    pub cause: String,
    /// Share of demand that changed edge compared with the previous version.
    pub churn: f64,
}

/// A versioned routing table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoutingTable {
    pub meta: RoutingMeta,
    pub routing: Routing,
}
