//! Every example file in `deploy/` loads and validates.

use anyhow::{ensure, Context, Result};
use sextant_core::Fleet;

#[test]
fn every_example_fleet_is_valid() -> Result<()> {
    let dir = sextant_tests::root().join("deploy/examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).with_context(|| format!("{}", dir.display()))? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        if !text.contains("[[edges]]") {
            continue; // not a fleet file
        }
        let fleet =
            Fleet::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        ensure!(!fleet.edges.is_empty(), "{}: no edges", path.display());
        seen += 1;
    }
    ensure!(seen >= 1, "no example fleet found in {}", dir.display());
    Ok(())
}

#[test]
fn the_example_fleet_has_the_promised_shape() -> Result<()> {
    let text = std::fs::read_to_string(sextant_tests::example_fleet())?;
    let fleet = Fleet::from_toml(&text).map_err(|e| anyhow::anyhow!("{e}"))?;
    use sextant_core::DomainKind;
    let count = |k: DomainKind| fleet.domains.keys().filter(|d| d.kind() == k).count();
    ensure!(count(DomainKind::Region) >= 4, "regions");
    for region in fleet
        .domains
        .keys()
        .filter(|d| d.kind() == DomainKind::Region)
    {
        let sites = fleet
            .domains
            .keys()
            .filter(|d| d.kind() == DomainKind::Site && region.covers(d))
            .count();
        ensure!(sites >= 4, "{region} has {sites} sites");
    }
    ensure!(count(DomainKind::Provider) == 2, "providers");
    let origin_regions: std::collections::BTreeSet<_> = fleet
        .origins
        .values()
        .filter_map(|o| o.domain.region())
        .collect();
    ensure!(origin_regions.len() >= 2, "origins in {origin_regions:?}");
    ensure!(fleet.groups.len() >= 20, "groups");
    ensure!(fleet.services.len() >= 2, "services");
    for g in fleet.groups.values() {
        let regions: std::collections::BTreeSet<_> = g
            .candidates
            .iter()
            .filter_map(|c| fleet.edges.get(&c.edge).and_then(|e| e.region()))
            .collect();
        ensure!(
            regions.len() >= 2,
            "group {} has candidates in {regions:?}",
            g.id
        );
    }
    // Only loopback addresses: the example runs on one machine.
    for e in fleet.edges.values() {
        if let sextant_core::fleet::EdgeTarget::SelfBuilt { addresses } = &e.target {
            ensure!(
                addresses.iter().all(|a| a.is_loopback()),
                "{} is not loopback",
                e.id
            );
        }
    }
    Ok(())
}
