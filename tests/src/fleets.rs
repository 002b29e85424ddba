//! Small fleets for end-to-end tests.

use crate::origin::Origin;

pub const SITE1: &str = "region/r1/metro/m1/site/s1";
pub const SITE2: &str = "region/r2/metro/m2/site/s2";

/// Two edges (`e1` at [`SITE1`], `e2` at [`SITE2`]) and one origin per
/// entry of `origins`, with capacities 1000, 2000, 1000 (in that order) in
/// regions r1, r2, r3. `third_endpoint` replaces the third origin's endpoint.
pub fn two_edges_three_origins(origins: &[&Origin], third_endpoint: Option<&str>) -> String {
    let mut f = String::from(
        "[[services]]\nid = \"www\"\nhostname = \"www.example.com\"\nzone = \"example.com\"\n\
         default_group = \"all\"\nnameservers = [\"ns1.example.com\"]\n\n",
    );
    for (i, (o, cap)) in origins.iter().zip([1000, 2000, 1000]).enumerate() {
        let endpoint = match (i, third_endpoint) {
            (2, Some(e)) => e.to_owned(),
            _ => o.addr.to_string(),
        };
        f.push_str(&format!(
            "[[origins]]\nid = \"{}\"\ndomain = \"region/r{}/origin/{}\"\nendpoints = [\"{endpoint}\"]\ncapacity_rps = {cap}\n\n",
            o.name,
            i + 1,
            o.name
        ));
    }
    for (id, site, addr) in [("e1", SITE1, "127.0.1.1"), ("e2", SITE2, "127.0.1.2")] {
        f.push_str(&format!(
            "[[edges]]\nid = \"{id}\"\nkind = \"self_built\"\nsite = \"{site}\"\naddresses = [\"{addr}\"]\n\
             capacity_rps = 1000\nhealth_check = \"{addr}:80\"\n\n"
        ));
    }
    f.push_str(
        "[[groups]]\nid = \"all\"\nprefixes = [\"10.0.0.0/8\"]\ndemand_rps = { www = 100 }\n\
         latency_ms = { \"region/r1\" = 10, \"region/r2\" = 20 }\n",
    );
    f
}

/// Starts origins `o1`, `o2`, `o3` on loopback and writes the
/// [`two_edges_three_origins`] fleet for them to `DIR/fleet.toml`; keep the
/// origins alive as long as the fleet is used.
pub fn origins_and_fleet(
    dir: &std::path::Path,
) -> anyhow::Result<(Vec<Origin>, std::path::PathBuf)> {
    let origins = vec![
        Origin::start("o1")?,
        Origin::start("o2")?,
        Origin::start("o3")?,
    ];
    let refs: Vec<&Origin> = origins.iter().collect();
    let path = dir.join("fleet.toml");
    std::fs::write(&path, two_edges_three_origins(&refs, None))?;
    Ok((origins, path))
}

/// Drains o3 (of [`two_edges_three_origins`]) by a tenth: the split then
/// has weights such as 0.23076923076923078, which a lossy float parser
/// reads back one bit off (a check that replicas and restarts serve the
/// very same weights).
pub fn drain_o3_a_tenth(ctl: &crate::Ctl) -> anyhow::Result<()> {
    ctl.run([
        "drain",
        "region/r3/origin/o3",
        "--fraction",
        "0.1",
        "--reason",
        "odd weights",
    ])?
    .ok()?;
    Ok(())
}
