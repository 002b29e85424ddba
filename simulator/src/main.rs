//! `sextant-sim`: run a scenario, compare two runs.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "sextant-sim",
    version,
    about = "DR drills and failure scenarios against a model of a fleet"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs a scenario; writes results.json and report.html into --out.
    Run {
        scenario: PathBuf,
        #[arg(long, short, env = "SEXTANT_SIM_OUT")]
        out: PathBuf,
        /// Progress bar on stderr (default: when stderr is a terminal).
        #[arg(long)]
        progress: bool,
        #[arg(long, conflicts_with = "progress")]
        no_progress: bool,
        /// Exit non-zero when an expectation fails.
        #[arg(long)]
        check: bool,
    },
    /// Shows two runs (results.json files or run directories) side by side.
    Compare {
        a: PathBuf,
        b: PathBuf,
        /// human (default) or json.
        #[arg(long, short, default_value = "human")]
        output: String,
    },
    /// Checks a scenario file without running it.
    Check { scenario: PathBuf },
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("sextant-sim: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    match Cli::parse().command {
        Command::Run {
            scenario,
            out,
            progress,
            no_progress,
            check,
        } => {
            let show = progress || (!no_progress && std::io::stderr().is_terminal());
            let started = Instant::now();
            let mut last = 0u64;
            let mut bar = |done: u64, total: u64| {
                if !show || total == 0 {
                    return;
                }
                let pct = done * 100 / total;
                if pct != last || done == total {
                    last = pct;
                    let filled = (pct / 2) as usize;
                    eprint!(
                        "\r[{}{}] {pct:3}% step {done}/{total} {:.1}s",
                        "#".repeat(filled),
                        " ".repeat(50 - filled),
                        started.elapsed().as_secs_f64()
                    );
                    if done == total {
                        eprintln!();
                    }
                    let _ = std::io::stderr().flush();
                }
            };
            let r = sextant_sim::run(&scenario, &out, &mut bar)?;
            let s = &r.summary;
            println!(
                "{}: {} steps in {:.2}s; availability {:.5}, unserved {:.4}%, peak utilization {:.2} ({}), worst p99 {:.0} ms, {} routing versions, alerts fired {}",
                r.scenario.name,
                r.steps.t_s.len(),
                started.elapsed().as_secs_f64(),
                s.availability,
                s.unserved_share * 100.0,
                s.peak_utilization,
                s.peak_utilization_edge,
                s.worst_p99_ms,
                s.routing_versions,
                s.alerts_fired
            );
            for e in &r.expectations {
                println!(
                    "  {} {}: expected {}, got {}",
                    if e.pass { "PASS" } else { "FAIL" },
                    e.check,
                    e.expected,
                    e.actual
                );
            }
            println!("wrote {}", out.join("results.json").display());
            println!("wrote {}", out.join("report.html").display());
            if check && !r.passed {
                anyhow::bail!("expectations failed");
            }
        }
        Command::Compare { a, b, output } => {
            let ra = sextant_sim::load_results(&a)?;
            let rb = sextant_sim::load_results(&b)?;
            let rows = sextant_sim::compare::rows(&ra, &rb);
            match output.as_str() {
                "json" => println!("{}", serde_json::to_string_pretty(&rows)?),
                "human" => print!("{}", sextant_sim::compare::table(&ra, &rb, &rows)),
                other => anyhow::bail!("unknown output {other:?}: human or json"),
            }
        }
        Command::Check { scenario } => {
            let s = sextant_sim::Scenario::load(&scenario)?;
            println!(
                "{}: ok ({} edges, {} groups, {} events)",
                s.name,
                s.fleet.edges.len(),
                s.fleet.groups.len(),
                s.events.len()
            );
        }
    }
    Ok(())
}
