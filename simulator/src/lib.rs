//! `sextant-sim`: DR drills and failure scenarios against a model of a
//! fleet, driving the decision code of `sextant-core` with simulated time
//! (DESIGN.md principle 1: the drill simulated is the drill that runs).
//!
//! - [`scenario`]: the scenario file and its checks;
//! - [`engine`] (private): the world and the control loop, step by step;
//! - [`results`]: `results.json`; [`report`]: `report.html`;
//! - [`compare`]: two runs side by side.

#![forbid(unsafe_code)]

pub mod compare;
mod engine;
pub mod expect;
pub mod latency;
pub mod report;
pub mod results;
pub mod scenario;
pub mod slo;
pub mod time;

use std::path::{Path, PathBuf};

pub use results::Results;
pub use scenario::{Scenario, ScenarioError};

/// Why a run or a comparison failed.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a results.json of sextant-sim: {source}")]
    BadResults {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot encode the results: {0}")]
    Encode(#[source] serde_json::Error),
}

/// Runs a checked scenario; `progress(done, total)` is called per step.
pub fn simulate(scenario: &Scenario, progress: &mut dyn FnMut(u64, u64)) -> Results {
    engine::Engine::new(scenario).run(progress)
}

/// `results.json` text (pretty, deterministic, ends with a newline).
pub fn to_json(results: &Results) -> Result<String, SimError> {
    let mut s = serde_json::to_string_pretty(results).map_err(SimError::Encode)?;
    s.push('\n');
    Ok(s)
}

/// Loads, runs and writes `results.json` and `report.html` into `out`.
pub fn run(
    scenario_path: &Path,
    out: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Results, SimError> {
    let scenario = Scenario::load(scenario_path)?;
    let results = simulate(&scenario, progress);
    std::fs::create_dir_all(out).map_err(|source| SimError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    let write = |name: &str, text: &str| {
        let path = out.join(name);
        std::fs::write(&path, text).map_err(|source| SimError::Write { path, source })
    };
    write("results.json", &to_json(&results)?)?;
    write("report.html", &report::html(&results))?;
    Ok(results)
}

/// Reads a `results.json`, or the one in a run directory.
pub fn load_results(path: &Path) -> Result<Results, SimError> {
    let file = if path.is_dir() {
        path.join("results.json")
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read_to_string(&file).map_err(|source| SimError::Read {
        path: file.clone(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| SimError::BadResults { path: file, source })
}
