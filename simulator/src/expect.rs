//! Judging a run against its scenario's `[[expect]]`.

use crate::results::{ExpectResult, Results};
use crate::scenario::ExpectSpec;

fn row(check: &str, expected: String, actual: String, pass: bool) -> ExpectResult {
    ExpectResult {
        check: check.to_owned(),
        expected,
        actual,
        pass,
    }
}

fn worst(values: impl Iterator<Item = Option<f64>>) -> Option<Option<f64>> {
    // None: no failure event; Some(None): one was never resolved.
    let mut out: Option<Option<f64>> = None;
    for v in values {
        out = Some(match (out, v) {
            (Some(None), _) | (_, None) => None,
            (Some(Some(a)), Some(b)) => Some(a.max(b)),
            (None, Some(b)) => Some(b),
        });
    }
    out
}

fn secs(v: Option<Option<f64>>) -> (String, Option<f64>) {
    match v {
        None => ("no failure event".into(), Some(0.0)),
        Some(None) => ("never".into(), None),
        Some(Some(s)) => (format!("{s} s"), Some(s)),
    }
}

/// One row per field set in every `[[expect]]`.
pub fn judge(expect: &[ExpectSpec], r: &Results) -> Vec<ExpectResult> {
    let s = &r.summary;
    let failures: Vec<_> = r.events.iter().filter(|e| e.failure).collect();
    let mut out = Vec::new();
    for x in expect {
        if let Some(m) = x.max_unserved_share {
            out.push(row(
                "max_unserved_share",
                format!("≤ {m}"),
                format!("{:.6}", s.unserved_share),
                s.unserved_share <= m + 1e-12,
            ));
        }
        if let Some(m) = x.max_time_to_detect_s {
            let (text, v) = secs(worst(failures.iter().map(|e| {
                // Undetected but recovered first: it did not need detecting.
                e.detected_after_s.or(if e.note.starts_with("recovered") {
                    Some(0.0)
                } else {
                    None
                })
            })));
            out.push(row(
                "max_time_to_detect_s",
                format!("≤ {m} s"),
                text,
                v.is_some_and(|v| v <= m),
            ));
        }
        if let Some(m) = x.max_time_to_mitigate_s {
            let (text, v) = secs(worst(
                failures
                    .iter()
                    .filter(|e| !e.note.starts_with("recovered"))
                    .map(|e| e.mitigated_after_s),
            ));
            out.push(row(
                "max_time_to_mitigate_s",
                format!("≤ {m} s"),
                text,
                v.is_some_and(|v| v <= m),
            ));
        }
        if let Some(m) = x.max_utilization {
            out.push(row(
                "max_utilization",
                format!("≤ {m}"),
                format!(
                    "{} ({} at +{} s)",
                    s.peak_utilization, s.peak_utilization_edge, s.peak_utilization_s
                ),
                s.peak_utilization <= m + 1e-9,
            ));
        }
        if let Some(m) = x.min_availability {
            out.push(row(
                "min_availability",
                format!("≥ {m}"),
                format!("{:.6}", s.availability),
                s.availability + 1e-12 >= m,
            ));
        }
        if let Some(m) = x.max_p99_ms {
            out.push(row(
                "max_p99_ms",
                format!("≤ {m} ms"),
                format!("{} ms", s.worst_p99_ms),
                s.worst_p99_ms <= m,
            ));
        }
        if let Some(m) = x.max_budget_consumed {
            out.push(row(
                "max_budget_consumed",
                format!("≤ {m}"),
                format!("{}", s.budget_consumed),
                s.budget_consumed <= m,
            ));
        }
        if let Some(m) = x.max_alerts {
            out.push(row(
                "max_alerts",
                format!("≤ {m}"),
                s.alerts_fired.to_string(),
                s.alerts_fired <= m,
            ));
        }
        if let Some(m) = x.max_config_changes_while_down {
            out.push(row(
                "max_config_changes_while_down",
                format!("≤ {m}"),
                s.config_changes_while_down.to_string(),
                s.config_changes_while_down <= m,
            ));
        }
        if let Some(m) = x.max_failovers {
            out.push(row(
                "max_failovers",
                format!("≤ {m}"),
                s.failovers.to_string(),
                s.failovers <= u64::from(m),
            ));
        }
        if let Some(m) = x.min_failovers {
            out.push(row(
                "min_failovers",
                format!("≥ {m}"),
                s.failovers.to_string(),
                s.failovers >= u64::from(m),
            ));
        }
        if let Some(o) = &x.drill_outcome {
            let outcomes: Vec<&str> = r
                .drills
                .iter()
                .map(|d| d.outcome.split(':').next().unwrap_or(""))
                .collect();
            let pass = !outcomes.is_empty() && outcomes.iter().all(|d| d == o);
            out.push(row(
                "drill_outcome",
                o.clone(),
                if outcomes.is_empty() {
                    "no drill".into()
                } else {
                    outcomes.join(", ")
                },
                pass,
            ));
        }
    }
    out
}
