//! Availability SLO: burn rates and the multi-window, multi-burn-rate
//! alerts of the SRE workbook (chapter 5) for a 30-day objective.

use crate::results::{r3, AlertSummary};

/// (burn rate, long window, short window), seconds.
pub const ALERTS: [(f64, i64, i64); 4] = [
    (14.4, 3600, 300),
    (6.0, 6 * 3600, 1800),
    (3.0, 24 * 3600, 2 * 3600),
    (1.0, 3 * 24 * 3600, 6 * 3600),
];

/// The SLO's period, seconds.
const PERIOD_S: f64 = 30.0 * 86_400.0;

#[derive(Debug, Clone, Default)]
pub struct Evaluation {
    pub burn_5m: Vec<f64>,
    pub burn_1h: Vec<f64>,
    pub alerts: Vec<u8>,
    pub summary: Vec<AlertSummary>,
    pub budget_consumed: f64,
}

/// Burn rates per step from demand and unserved rates. Before the run,
/// traffic is taken as the first step's, all served, so that a long
/// window does not judge minutes as if they were hours.
pub fn evaluate(demand: &[f64], unserved: &[f64], step_ms: i64, objective: f64) -> Evaluation {
    let n = demand.len();
    let step_s = (step_ms as f64 / 1000.0).max(1e-3);
    let budget = (1.0 - objective).max(1e-12);
    // Prefix sums of traffic and errors.
    let mut tot = vec![0.0; n + 1];
    let mut bad = vec![0.0; n + 1];
    for i in 0..n {
        tot[i + 1] = tot[i] + demand[i];
        bad[i + 1] = bad[i] + unserved[i].max(0.0);
    }
    let before = demand.first().copied().unwrap_or(0.0);
    let burn = |k: usize, window_s: i64| -> f64 {
        let w = ((window_s as f64 / step_s).ceil() as usize).max(1);
        let from = (k + 1).saturating_sub(w);
        let missing = w - (k + 1 - from);
        let t = tot[k + 1] - tot[from] + missing as f64 * before;
        let b = bad[k + 1] - bad[from];
        if t > 0.0 {
            b / t / budget
        } else {
            0.0
        }
    };
    let mut out = Evaluation::default();
    let mut fired = [0u32; 4];
    let mut first: [Option<f64>; 4] = [None; 4];
    let mut firing = [0u64; 4];
    let mut prev = 0u8;
    for k in 0..n {
        out.burn_5m.push(burn(k, 300));
        out.burn_1h.push(burn(k, 3600));
        let mut bits = 0u8;
        for (i, (f, long, short)) in ALERTS.iter().enumerate() {
            if burn(k, *long) > *f && burn(k, *short) > *f {
                bits |= 1 << i;
                firing[i] += 1;
                if prev & (1 << i) == 0 {
                    fired[i] += 1;
                    first[i].get_or_insert(k as f64 * step_s);
                }
            }
        }
        prev = bits;
        out.alerts.push(bits);
    }
    out.summary = ALERTS
        .iter()
        .enumerate()
        .map(|(i, (f, long, short))| AlertSummary {
            name: format!("{f}x {}/{}", human(*long), human(*short)),
            factor: *f,
            long_s: *long as f64,
            short_s: *short as f64,
            fired: fired[i],
            first_s: first[i],
            firing_steps: firing[i],
        })
        .collect();
    let mean = if n > 0 { tot[n] / n as f64 } else { 0.0 };
    out.budget_consumed = if mean > 0.0 {
        r3(bad[n] * step_s / (budget * mean * PERIOD_S) * 1000.0) / 1000.0
    } else {
        0.0
    };
    out
}

fn human(s: i64) -> String {
    if s % 86_400 == 0 {
        format!("{}d", s / 86_400)
    } else if s % 3600 == 0 {
        format!("{}h", s / 3600)
    } else {
        format!("{}m", s / 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sharp_outage_pages_and_a_blip_does_not() {
        // 10 s steps, 2 h of 1000 rps; 10 minutes at 20% errors from 1 h.
        let n = 720;
        let demand = vec![1000.0; n];
        let mut unserved = vec![0.0; n];
        for u in unserved.iter_mut().skip(360).take(60) {
            *u = 200.0;
        }
        let e = evaluate(&demand, &unserved, 10_000, 0.999);
        assert_eq!(e.summary[0].fired, 1, "{:?}", e.summary[0]);
        // 20% errors over 5 min is a burn of 200.
        assert!((e.burn_5m[400] - 200.0).abs() < 1e-6, "{}", e.burn_5m[400]);
        let blip = {
            let mut u = vec![0.0; n];
            u[100] = 50.0;
            u
        };
        let e = evaluate(&demand, &blip, 10_000, 0.999);
        assert!(e.summary.iter().all(|a| a.fired == 0));
    }
}
