//! What a run produces: `results.json`, columnar per step so that a day at
//! 10 s steps stays a few MB, and deterministic (same scenario and seed,
//! same bytes).

use serde::{Deserialize, Serialize};

/// Format version of `results.json`.
pub const FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Results {
    pub format: u32,
    pub scenario: ScenarioInfo,
    pub summary: Summary,
    pub steps: Steps,
    /// Served traffic per region (edge region; `provider/…` edges count in
    /// their site's region), rps per step.
    pub regions: Vec<Series>,
    pub groups: Vec<GroupResult>,
    pub edges: Vec<EdgeResult>,
    pub heatmap: Heatmap,
    pub events: Vec<EventResult>,
    pub drills: Vec<DrillResult>,
    pub audit: Vec<AuditEntry>,
    pub expectations: Vec<ExpectResult>,
    pub passed: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScenarioInfo {
    pub name: String,
    pub description: String,
    pub seed: u64,
    pub start: String,
    pub duration_s: f64,
    pub step_s: f64,
    pub fleet: String,
    pub edges: usize,
    pub groups: usize,
    pub services: usize,
    pub objective: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Mean demand, rps.
    pub demand_avg_rps: f64,
    pub served_avg_rps: f64,
    pub unserved_share: f64,
    pub availability: f64,
    pub peak_utilization: f64,
    pub peak_utilization_edge: String,
    pub peak_utilization_s: f64,
    /// Edge × steps above 100% of their capacity.
    pub overloaded_edge_steps: u64,
    /// Worst per-step latency percentiles of all traffic, ms.
    pub worst_p50_ms: f64,
    pub worst_p95_ms: f64,
    pub worst_p99_ms: f64,
    /// Mean cost rate, money per unit of time as the fleet counts it.
    pub cost: Cost,
    /// Share of the 30-day error budget the run consumed.
    pub budget_consumed: f64,
    pub alerts: Vec<AlertSummary>,
    /// Alerts that fired (rising edges), all window pairs.
    pub alerts_fired: u32,
    /// Routing versions committed by the control plane (after the first).
    pub routing_versions: u64,
    /// Routing versions applied by DNS and edges while it was down.
    pub config_changes_while_down: u32,
    pub failovers: u64,
    pub restores: u64,
    pub held: u64,
    /// Largest |served + unserved − demand| over steps and groups, rps.
    pub max_conservation_error: f64,
    /// Solves run (the loop re-solves only when it would).
    pub solves: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Cost {
    pub self_built: f64,
    pub commit: f64,
    pub overage: f64,
    pub total: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertSummary {
    /// e.g. `14.4x 1h/5m`.
    pub name: String,
    pub factor: f64,
    pub long_s: f64,
    pub short_s: f64,
    /// Rising edges.
    pub fired: u32,
    pub first_s: Option<f64>,
    pub firing_steps: u64,
}

/// Per step (index k is `start + k × step`), columns.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Steps {
    pub t_s: Vec<f64>,
    pub demand: Vec<f64>,
    pub served: Vec<f64>,
    pub unserved: Vec<f64>,
    pub p50_ms: Vec<f64>,
    pub p95_ms: Vec<f64>,
    pub p99_ms: Vec<f64>,
    pub max_utilization: Vec<f64>,
    pub overloaded_edges: Vec<u32>,
    pub cost: Vec<f64>,
    /// Burn rates over 5 minutes and 1 hour.
    pub burn_5m: Vec<f64>,
    pub burn_1h: Vec<f64>,
    /// Bit i: alert i of `summary.alerts` fires.
    pub alerts: Vec<u8>,
    /// Routing version DNS and edges apply.
    pub config_version: Vec<u64>,
    pub control_plane_up: Vec<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Series {
    pub name: String,
    pub values: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupResult {
    pub id: String,
    pub demand_avg_rps: f64,
    pub unserved_share: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    /// Per step, when groups × steps is small enough.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub series: Option<GroupSeries>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupSeries {
    pub demand: Vec<f64>,
    pub served: Vec<f64>,
    pub unserved: Vec<f64>,
    pub p50_ms: Vec<f64>,
    pub p99_ms: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EdgeResult {
    pub id: String,
    pub site: String,
    pub capacity_rps: f64,
    pub served_avg_rps: f64,
    pub peak_utilization: f64,
    pub overload_s: f64,
    pub down_s: f64,
}

/// Utilization per fault domain (sites, or metros or regions when there
/// are many) and time bucket: the highest of the bucket.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Heatmap {
    pub level: String,
    pub bucket_s: f64,
    pub domains: Vec<String>,
    pub max_utilization: Vec<Vec<f64>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventResult {
    pub index: usize,
    pub at_s: f64,
    pub kind: String,
    pub label: String,
    pub failure: bool,
    pub detected_after_s: Option<f64>,
    pub mitigated_after_s: Option<f64>,
    pub note: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrillResult {
    pub id: String,
    pub domain: String,
    pub outcome: String,
    pub started_s: f64,
    pub drained_after_s: Option<f64>,
    pub restored_after_s: Option<f64>,
    pub peak_utilization: f64,
    pub timeline: Vec<(f64, String)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub t_s: f64,
    pub action: String,
    pub target: String,
    pub reason: String,
    pub version: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpectResult {
    pub check: String,
    pub expected: String,
    pub actual: String,
    pub pass: bool,
}

/// Rounds to 3 decimals (results carry no false precision, and stay small).
pub fn r3(x: f64) -> f64 {
    if x.is_finite() {
        (x * 1000.0).round() / 1000.0
    } else {
        0.0
    }
}
