//! A fleet bigger than one gRPC message: applied in pieces, stored in
//! chunks, read back whole, routed in several chunks, listed in pages.

use std::fmt::Write;

use anyhow::{ensure, Context, Result};
use sextant_tests::{ControlPlane, Ctl};

const GROUPS: usize = 8000;
const REGIONS: usize = 5;
const EDGES_PER_REGION: usize = 20;

fn big_fleet() -> String {
    let mut f = String::from(
        "[[services]]\nid = \"www\"\nhostname = \"www.example.com\"\nzone = \"example.com\"\n\
         default_group = \"g00000\"\nnameservers = [\"ns1.example.com\"]\n\n",
    );
    for r in 0..REGIONS {
        for e in 0..EDGES_PER_REGION {
            let _ = write!(
                f,
                "[[edges]]\nid = \"r{r}-e{e:02}\"\nkind = \"self_built\"\n\
                 site = \"region/r{r}/metro/m{}/site/s{e:02}\"\naddresses = [\"127.{r}.{e}.1\"]\n\
                 capacity_rps = {}\nhealth_check = \"127.{r}.{e}.1:80\"\n\n",
                e % 4,
                1000 + 100 * e
            );
        }
    }
    for g in 0..GROUPS {
        let (a, b) = (g % REGIONS, (g + 1) % REGIONS);
        let _ = write!(
            f,
            "[[groups]]\nid = \"g{g:05}\"\nprefixes = [\"10.{}.{}.0/24\", \"2001:db8:{g:x}::/48\"]\n\
             demand_rps = {{ www = {} }}\nlatency_ms = {{ \"region/r{a}\" = 10, \"region/r{b}\" = 60 }}\n\n",
            g / 256,
            g % 256,
            10 + g % 7
        );
    }
    f
}

#[test]
fn a_fleet_larger_than_a_grpc_message_round_trips() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let text = big_fleet();
    ensure!(
        text.len() > 1024 * 1024,
        "fleet is only {} bytes",
        text.len()
    );
    let file = dir.path().join("big.toml");
    std::fs::write(&file, &text)?;

    let cp = ControlPlane::start(&dir.path().join("cp"), None)?;
    let ctl: Ctl = cp.ctl();
    ctl.run(["apply".as_ref(), "-f".as_ref(), file.as_os_str()])?
        .ok()?;

    let fleet = ctl.run(["get", "fleet"])?.ok()?.stdout;
    ensure!(
        fleet.len() > 1024 * 1024,
        "fleet read back is {} bytes",
        fleet.len()
    );
    let back = sextant_core::Fleet::from_toml(&fleet).map_err(|e| anyhow::anyhow!("{e}"))?;
    ensure!(
        back.groups.len() == GROUPS,
        "groups read back: {}",
        back.groups.len()
    );

    let groups = ctl.json(["get", "groups"])?;
    ensure!(
        groups.as_array().map(Vec::len) == Some(GROUPS),
        "paged groups"
    );
    let edges = ctl.json(["get", "edges"])?;
    ensure!(edges.as_array().map(Vec::len) == Some(REGIONS * EDGES_PER_REGION));

    let routes = ctl.json(["routes", "www"])?;
    let rows = routes["rows"].as_array().context("rows")?;
    ensure!(rows.len() == GROUPS, "routing rows {}", rows.len());
    for row in rows {
        // Every row is served, only by its candidates (its two regions).
        let g: usize = row["group"]
            .as_str()
            .and_then(|g| g.strip_prefix('g'))
            .and_then(|g| g.parse().ok())
            .context("group id")?;
        let allowed = [
            format!("r{}-", g % REGIONS),
            format!("r{}-", (g + 1) % REGIONS),
        ];
        let weights = row["weights"].as_array().context("weights")?;
        ensure!(!weights.is_empty(), "no weights in {}", row["group"]);
        ensure!(row["unserved"] == 0.0, "unserved in {row}");
        for w in weights {
            let edge = w["edge"].as_str().unwrap_or_default();
            ensure!(
                allowed.iter().any(|a| edge.starts_with(a.as_str())),
                "{edge} is not a candidate of {}",
                row["group"]
            );
        }
    }

    // Drain a region; restart; the big table is read back from its chunks.
    ctl.run(["drain", "region/r0", "--reason", "big drain"])?
        .ok()?;
    cp.process.kill()?;
    let cp = ControlPlane::start(&dir.path().join("cp"), None)?;
    let routes = cp.ctl().json(["routes", "www", "--group", "g00000"])?;
    let weights = routes["rows"][0]["weights"].as_array().context("weights")?;
    ensure!(
        weights
            .iter()
            .all(|w| w["edge"].as_str().is_some_and(|e| e.starts_with("r1-"))),
        "{weights:?}"
    );
    ensure!(routes["version"] == 2, "{}", routes["version"]);
    Ok(())
}
