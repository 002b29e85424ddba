//! The steering solver's bench (`harness = false`).
//!
//! ```text
//! cargo bench -p sextant-core --bench solver                      # 1k, 10k, 100k synthetic groups
//! cargo bench -p sextant-core --bench solver -- --instance FILE  # a gen_instance.py instance
//! ```
//!
//! Each size runs in a fresh process (this binary re-runs itself with
//! `--child`), so that the peak memory (VmHWM) is that size's alone. A child
//! prints one JSON line:
//!
//! - `solve_ms`: the LP of the HiGHS anchor (network build + network
//!   simplex), `objective` its value, comparable to `highs_anchor.py`;
//! - `fleet_solve_ms`: the same instance as a fleet through
//!   `sextant_core::solver::solve` (policy, rows, routing table out);
//! - `incremental_ms`: a re-solve from that table after the most loaded
//!   edge goes down, and `recovery_ms` after it comes back;
//! - `peak_mb`: the process's peak resident memory.

use std::process::Command;
use std::time::{Duration, Instant};

use sextant_core::drain::DrainSet;
use sextant_core::signals::{EdgeSignal, Health, Signals};
use sextant_core::solver::instance::Instance;
use sextant_core::solver::{problem, solve_with, SolveInput, SolveOptions};
use sextant_core::{EdgeId, Fleet};

fn peak_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// CPU time of this thread so far, ms (from /proc/thread-self/schedstat):
/// on a shared machine, wall time includes waiting for a core.
fn cpu_ms() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(f64::NAN, |ns| ns / 1e6)
}

/// Runs `f` and returns its result, wall ms and CPU ms.
fn timed<T>(f: impl FnOnce() -> T) -> (T, f64, f64) {
    let c = cpu_ms();
    let t = Instant::now();
    let r = f();
    (r, ms(t.elapsed()), cpu_ms() - c)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn min(xs: &[f64]) -> f64 {
    xs.iter().copied().fold(f64::INFINITY, f64::min)
}

fn child(inst: &Instance, fleet_too: bool) -> String {
    let t = Instant::now();
    let p = inst.to_problem().expect("instance");
    let to_problem_ms = ms(t.elapsed());
    let (out, solve_ms, solve_cpu) = timed(|| problem::solve(&p));
    let objective = inst.objective(&p, &out);
    let violation = inst.violation(&p, &out);
    let peak_instance = peak_mb();
    let mut line = format!(
        "{{\"groups\": {}, \"edges\": {}, \"arcs\": {}, \"to_problem_ms\": {:.1}, \"solve_ms\": {:.1}, \
         \"solve_cpu_ms\": {:.1}, \"pivots\": {}, \"rounds\": {}, \"objective\": {:.4}, \"violation\": {:.2e}, \"peak_mb_lp\": {:.0}",
        inst.groups.len(),
        inst.edges.len(),
        p.arcs.len(),
        to_problem_ms,
        solve_ms,
        solve_cpu,
        out.pivots,
        out.rounds,
        objective,
        violation,
        peak_instance
    );
    drop(out);
    drop(p);
    if fleet_too {
        let fleet = Fleet::from_spec(inst.to_fleet_spec()).expect("fleet");
        let drains = DrainSet::new();
        let signals = Signals::default();
        let input = |signals, previous| SolveInput {
            fleet: &fleet,
            signals,
            drains: &drains,
            previous,
            now_ms: 0,
        };
        let ((table, stats), fleet_ms, fleet_cpu) =
            timed(|| solve_with(input(&signals, None), SolveOptions::default()));
        // The most loaded edge goes down.
        let (edge, _) = table
            .edges
            .iter()
            .max_by(|a, b| {
                a.1.predicted_load_rps
                    .total_cmp(&b.1.predicted_load_rps)
                    .then(b.0.cmp(a.0))
            })
            .expect("edges");
        let edge: EdgeId = edge.clone();
        let mut down = Signals::default();
        down.edges.insert(
            edge.clone(),
            EdgeSignal {
                health: Health::Down,
                reason: "bench".into(),
                ..EdgeSignal::default()
            },
        );
        let mut inc = Vec::new();
        let mut after = None;
        let repeat: usize = std::env::var("SEXTANT_BENCH_REPEAT")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(9);
        let mut inc_cpu = Vec::new();
        for _ in 0..repeat {
            let (r, wall, cpu) =
                timed(|| solve_with(input(&down, Some(&table)), SolveOptions::default()));
            inc.push(wall);
            inc_cpu.push(cpu);
            after = Some(r);
        }
        let (after, inc_stats) = after.expect("runs");
        let mut rec = Vec::new();
        let mut rec_cpu = Vec::new();
        let mut back = None;
        for _ in 0..repeat {
            let (r, wall, cpu) =
                timed(|| solve_with(input(&signals, Some(&after)), SolveOptions::default()));
            rec.push(wall);
            rec_cpu.push(cpu);
            back = Some(r);
        }
        let (back, rec_stats) = back.expect("runs");
        line.push_str(&format!(
            ", \"fleet_solve_ms\": {:.1}, \"fleet_solve_cpu_ms\": {:.1}, \"fleet_pivots\": {}, \
             \"fleet_objective\": {:.4}, \"down_edge\": \"{edge}\", \"incremental_ms\": {:.1}, \
             \"incremental_cpu_ms\": {:.1}, \"incremental_min_ms\": {:.1}, \"incremental_pivots\": {}, \"incremental_rounds\": {}, \"incremental_warm\": {}, \
             \"incremental_churn\": {:.5}, \"recovery_ms\": {:.1}, \"recovery_cpu_ms\": {:.1}, \"recovery_min_ms\": {:.1}, \
             \"recovery_pivots\": {}, \"recovery_churn\": {:.5}",
            fleet_ms,
            fleet_cpu,
            stats.pivots,
            table.summary.objective,
            median(inc.clone()),
            median(inc_cpu),
            min(&inc),
            inc_stats.pivots,
            inc_stats.rounds,
            inc_stats.warm_start,
            after.summary.churn,
            median(rec.clone()),
            median(rec_cpu),
            min(&rec),
            rec_stats.pivots,
            back.summary.churn,
        ));
    }
    line.push_str(&format!(", \"peak_mb\": {:.0}}}", peak_mb()));
    line
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |name: &str| args.iter().position(|a| a == name).map(|i| i + 1);
    let fleet_too = !args.iter().any(|a| a == "--lp-only");
    if args.iter().any(|a| a == "--child") {
        let inst = if let Some(i) = arg("--instance") {
            let text = std::fs::read_to_string(&args[i]).expect("read the instance");
            Instance::from_json(&text).expect("instance")
        } else if let Some(i) = arg("--synthetic") {
            let n: Vec<usize> = args[i..i + 4]
                .iter()
                .map(|a| a.parse().expect("number"))
                .collect();
            Instance::synthetic(n[0], n[1], n[2], n[3] as u64)
        } else {
            panic!("--child needs --instance FILE or --synthetic G E K SEED");
        };
        println!("{}", child(&inst, fleet_too));
        return;
    }
    let me = std::env::current_exe().expect("own path");
    let runs: Vec<Vec<String>> = if let Some(i) = arg("--instance") {
        vec![vec!["--instance".into(), args[i].clone()]]
    } else {
        [(1_000, 100), (10_000, 1_000), (100_000, 10_000)]
            .iter()
            .map(|(g, e)| {
                vec![
                    "--synthetic".into(),
                    g.to_string(),
                    e.to_string(),
                    "20".into(),
                    "7".into(),
                ]
            })
            .collect()
    };
    for run in runs {
        let mut cmd = Command::new(&me);
        cmd.arg("--child").args(&run);
        if !fleet_too {
            cmd.arg("--lp-only");
        }
        let out = cmd.output().expect("run the child");
        if !out.status.success() {
            eprintln!("{}", String::from_utf8_lossy(&out.stderr));
            std::process::exit(1);
        }
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
}
