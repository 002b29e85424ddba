//! Two runs side by side.

use serde::Serialize;

use crate::results::Results;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub metric: String,
    pub a: f64,
    pub b: f64,
    pub delta: f64,
}

/// The summary metrics of both runs.
pub fn rows(a: &Results, b: &Results) -> Vec<Row> {
    let pick = |r: &Results| -> Vec<(&'static str, f64)> {
        let s = &r.summary;
        let worst_ttm = r
            .events
            .iter()
            .filter_map(|e| e.mitigated_after_s)
            .fold(0.0, f64::max);
        let worst_ttd = r
            .events
            .iter()
            .filter_map(|e| e.detected_after_s)
            .fold(0.0, f64::max);
        vec![
            ("demand_avg_rps", s.demand_avg_rps),
            ("served_avg_rps", s.served_avg_rps),
            ("unserved_share", s.unserved_share),
            ("availability", s.availability),
            ("peak_utilization", s.peak_utilization),
            ("overloaded_edge_steps", s.overloaded_edge_steps as f64),
            ("worst_p50_ms", s.worst_p50_ms),
            ("worst_p95_ms", s.worst_p95_ms),
            ("worst_p99_ms", s.worst_p99_ms),
            ("cost_total", s.cost.total),
            ("cost_overage", s.cost.overage),
            ("budget_consumed", s.budget_consumed),
            ("alerts_fired", f64::from(s.alerts_fired)),
            ("routing_versions", s.routing_versions as f64),
            ("failovers", s.failovers as f64),
            ("worst_time_to_detect_s", worst_ttd),
            ("worst_time_to_mitigate_s", worst_ttm),
            (
                "expectations_failed",
                r.expectations.iter().filter(|e| !e.pass).count() as f64,
            ),
        ]
    };
    pick(a)
        .into_iter()
        .zip(pick(b))
        .map(|((m, x), (_, y))| Row {
            metric: m.to_owned(),
            a: x,
            b: y,
            delta: y - x,
        })
        .collect()
}

/// A human table.
pub fn table(a: &Results, b: &Results, rows: &[Row]) -> String {
    let mut out = format!(
        "A: {} (seed {})\nB: {} (seed {})\n\n",
        a.scenario.name, a.scenario.seed, b.scenario.name, b.scenario.seed
    );
    out.push_str(&format!(
        "{:<26} {:>16} {:>16} {:>16}\n",
        "metric", "A", "B", "B - A"
    ));
    for r in rows {
        out.push_str(&format!(
            "{:<26} {:>16} {:>16} {:>16}\n",
            r.metric,
            fmt(r.a),
            fmt(r.b),
            fmt(r.delta)
        ));
    }
    out
}

fn fmt(x: f64) -> String {
    if x == x.trunc() && x.abs() < 1e12 {
        format!("{x:.0}")
    } else if x.abs() < 0.01 {
        format!("{x:.6}")
    } else {
        format!("{x:.3}")
    }
}
