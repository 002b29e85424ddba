//! End to end: the real `sextant-sim` binary runs a shipped scenario,
//! writes results.json and report.html, and compares two runs.

use std::process::Command;

use anyhow::{ensure, Context, Result};
use sextant_tests::{bin, root};

#[test]
fn sextant_sim_runs_a_scenario_and_writes_its_report() -> Result<()> {
    let sim = bin("sextant-sim")?;
    let dir = tempfile::tempdir()?;
    let scenario = root().join("simulator/scenarios/known-answer.toml");
    let mut outs = vec![];
    for name in ["a", "b"] {
        let out = dir.path().join(name);
        let o = Command::new(&sim)
            .arg("run")
            .arg(&scenario)
            .arg("--out")
            .arg(&out)
            .arg("--no-progress")
            .arg("--check")
            .output()
            .context("run sextant-sim")?;
        ensure!(
            o.status.success(),
            "sextant-sim run failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let stdout = String::from_utf8_lossy(&o.stdout);
        ensure!(stdout.contains("PASS max_time_to_mitigate_s"), "{stdout}");
        outs.push(out);
    }
    let a = std::fs::read(outs[0].join("results.json"))?;
    let b = std::fs::read(outs[1].join("results.json"))?;
    ensure!(a == b, "results.json differs between two runs");
    let json: serde_json::Value = serde_json::from_slice(&a)?;
    ensure!(json["summary"]["failovers"] == 1, "{}", json["summary"]);

    let html = std::fs::read_to_string(outs[0].join("report.html"))?;
    for want in [
        "<title>sextant-sim: known answer: one region lost</title>",
        "id=\"chart-traffic\"",
        "id=\"chart-heatmap\"",
        "id=\"chart-burn\"",
        "id=\"chart-latency\"",
        "region_loss region/r1",
        "<td class=\"pass\">PASS</td>",
        "failover.down",
    ] {
        ensure!(html.contains(want), "report.html lacks {want}");
    }
    ensure!(
        !html.contains("http://") && !html.contains("https://"),
        "the report must not load anything"
    );

    let o = Command::new(&sim)
        .arg("compare")
        .arg(&outs[0])
        .arg(outs[1].join("results.json"))
        .output()?;
    ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    ensure!(String::from_utf8_lossy(&o.stdout).contains("unserved_share"));

    // A bad scenario: non-zero exit and every problem on stderr.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"x\"\nduration = \"1h\"\nfleet = \"missing.toml\"\n[demand]\ntrough = 2\n",
    )?;
    let o = Command::new(&sim)
        .arg("run")
        .arg(&bad)
        .arg("--out")
        .arg(dir.path().join("c"))
        .output()?;
    let err = String::from_utf8_lossy(&o.stderr);
    ensure!(
        !o.status.success() && err.contains("2 problems") && err.contains("line 3, column"),
        "{err}"
    );
    Ok(())
}
