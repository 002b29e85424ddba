//! End to end on a real etcd: several control-plane replicas, one leader;
//! the leader killed repeatedly while operators write through followers and
//! an edge stays subscribed; etcd stopped and started again.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use sextant_store::etcd_server::EtcdServer;
use sextant_tests::fleets::{origins_and_fleet, SITE1};
use sextant_tests::{eventually, split, ControlPlane, Ctl, EdgeProxy};

fn replica(dir: &Path, etcd: &str, id: &str, fleet: Option<&Path>) -> Result<ControlPlane> {
    replica_at(dir, etcd, id, fleet, "127.0.0.1:0")
}

/// A replica on a given address (a restarted replica keeps its address, so
/// that the edges' list of control-plane URLs stays true).
fn replica_at(
    dir: &Path,
    etcd: &str,
    id: &str,
    fleet: Option<&Path>,
    listen: &str,
) -> Result<ControlPlane> {
    ControlPlane::start_with(
        &dir.join(id),
        fleet,
        &[
            "--listen",
            listen,
            "--store",
            "etcd",
            "--etcd-endpoints",
            etcd,
            "--replica-id",
            id,
            "--lease-ttl-seconds",
            "3",
        ],
    )
}

/// (leader id, routing version) as one replica sees them.
fn leader_of(ctl: &Ctl) -> Result<(String, u64)> {
    let s = ctl.json(["status"])?;
    let leader = s["replicas"]
        .as_array()
        .context("replicas")?
        .iter()
        .find(|r| r["leader"] == true)
        .and_then(|r| r["id"].as_str())
        .ok_or_else(|| anyhow!("no leader in {s}"))?
        .to_owned();
    Ok((leader, s["routing_version"].as_u64().context("version")?))
}

/// Replicas cp-a and cp-b with `fleet`, once both see the same leader
/// and a first version: (leader, follower).
fn two_replicas(dir: &Path, etcd: &str, fleet: &Path) -> Result<(ControlPlane, ControlPlane)> {
    let a = replica(dir, etcd, "cp-a", Some(fleet))?;
    let b = replica(dir, etcd, "cp-b", Some(fleet))?;
    let (ca, cb) = (a.ctl(), b.ctl());
    let leader = eventually(Duration::from_secs(15), "a leader", || {
        let (l, v) = leader_of(&ca).ok()?;
        (v >= 1 && leader_of(&cb).ok()?.0 == l).then_some(l)
    })?;
    Ok(if leader == "cp-a" { (a, b) } else { (b, a) })
}

fn drains(ctl: &Ctl) -> Result<Vec<(String, f64)>> {
    Ok(ctl
        .json(["get", "drains"])?
        .as_array()
        .context("drains")?
        .iter()
        .map(|d| {
            (
                d["domain"].as_str().unwrap_or_default().to_owned(),
                d["fraction"].as_f64().unwrap_or(0.0),
            )
        })
        .collect())
}

/// The kept routing versions as one replica lists them, checked to be
/// consecutive: no gap, no duplicate. Returns (lowest, highest).
fn consecutive_versions(ctl: &Ctl) -> Result<(u64, u64)> {
    let versions: Vec<u64> = ctl
        .json(["versions"])?
        .as_array()
        .context("versions")?
        .iter()
        .filter_map(|v| v["version"].as_u64())
        .collect();
    let set: BTreeSet<u64> = versions.iter().copied().collect();
    ensure!(
        set.len() == versions.len(),
        "duplicate versions: {versions:?}"
    );
    let (lo, hi) = (
        set.first().copied().unwrap_or(0),
        set.last().copied().unwrap_or(0),
    );
    ensure!((hi - lo + 1) as usize == set.len(), "gaps in {versions:?}");
    Ok((lo, hi))
}

#[test]
fn the_leader_dies_five_times_and_nothing_is_lost() -> Result<()> {
    let etcd = EtcdServer::start().map_err(|e| anyhow!(e))?;
    let endpoint = etcd.endpoint();
    let dir = tempfile::tempdir()?;
    let (_origins, fleet) = origins_and_fleet(dir.path())?;

    let ids = ["cp-1", "cp-2", "cp-3"];
    let mut replicas: Vec<Option<ControlPlane>> = Vec::new();
    for id in ids {
        replicas.push(Some(replica(dir.path(), &endpoint, id, Some(&fleet))?));
    }
    let urls: Vec<String> = replicas.iter().flatten().map(|r| r.url()).collect();
    let any = |replicas: &[Option<ControlPlane>], except: &str| -> Option<Ctl> {
        replicas
            .iter()
            .zip(ids)
            .find(|(r, id)| r.is_some() && *id != except)
            .and_then(|(r, _)| r.as_ref().map(ControlPlane::ctl))
    };
    let ctl = any(&replicas, "").context("a replica")?;
    let (_, v0) = eventually(
        Duration::from_secs(15),
        "a leader with the seeded fleet",
        || leader_of(&ctl).ok().filter(|(_, v)| *v >= 1),
    )?;

    let edge = EdgeProxy::start(&urls.join(","), "e1", SITE1, &dir.path().join("e1"))?;
    eventually(
        Duration::from_secs(10),
        "the edge to hold the first version",
        || (edge.config_version().ok()? == v0).then_some(()),
    )?;

    let mut last = v0;
    let mut failovers = Vec::new();
    for round in 0..5 {
        let ctl = any(&replicas, "").context("a replica")?;
        let (leader, _) = leader_of(&ctl)?;
        // Write through a follower: it is forwarded to the leader.
        let follower = any(&replicas, &leader).context("a follower")?;
        let fraction = [0.5, 0.25, 0.75, 0.4, 0.6][round];
        let out = follower
            .run([
                "drain",
                "region/r2/origin/o2",
                "--fraction",
                &fraction.to_string(),
                "--reason",
                &format!("round {round}"),
            ])?
            .ok()?;
        ensure!(out.stdout.contains("routing version"), "{}", out.stdout);
        let (_, v) = leader_of(&follower)?;
        let v = eventually(
            Duration::from_secs(5),
            "the follower to see the new version",
            || {
                let (_, v) = leader_of(&follower).ok()?;
                (v > last).then_some(v)
            },
        )
        .unwrap_or(v);
        ensure!(v == last + 1, "round {round}: version {v} after {last}");
        eventually(
            Duration::from_secs(10),
            "the edge to hold the new version",
            || (edge.config_version().ok()? == v).then_some(()),
        )?;

        // Kill the leader.
        let i = ids
            .iter()
            .position(|id| *id == leader)
            .context("leader index")?;
        let addr = replicas[i]
            .as_ref()
            .map(|r| r.process.addr.to_string())
            .context("leader address")?;
        let killed_at = Instant::now();
        if let Some(cp) = replicas[i].take() {
            cp.process.kill()?;
        }
        let survivor = any(&replicas, &leader).context("a survivor")?;
        let new_leader = eventually(Duration::from_secs(10), "a new leader", || {
            let (l, _) = leader_of(&survivor).ok()?;
            (l != leader).then_some(l)
        })?;
        let took = killed_at.elapsed();
        failovers.push(took);
        // The drain is there, the version did not move back, writes work.
        let d = drains(&survivor)?;
        ensure!(
            d == vec![("region/r2/origin/o2".to_owned(), fraction)],
            "round {round}: drains {d:?}"
        );
        let (_, after) = leader_of(&survivor)?;
        ensure!(
            after == v,
            "round {round}: version {after} after failover, expected {v}"
        );
        // The edge kept serving all along.
        let counts = split(edge.process.addr, 50)?;
        ensure!(counts.values().sum::<usize>() == 50, "{counts:?}");
        eprintln!("round {round}: {leader} killed, {new_leader} leads after {took:?}");
        replicas[i] = Some(replica_at(dir.path(), &endpoint, &leader, None, &addr)?);
        last = v;
    }
    // Versions kept are consecutive: no gap, no duplicate.
    let ctl = any(&replicas, "").context("a replica")?;
    let (_, hi) = consecutive_versions(&ctl)?;
    ensure!(hi == last, "last version {hi}, expected {last}");
    // Every failover took less than 5 s (3 s lease TTL).
    for (i, t) in failovers.iter().enumerate() {
        ensure!(*t < Duration::from_secs(5), "failover {i} took {t:?}");
    }
    // Three replicas, one leader.
    let s = ctl.json(["status"])?;
    let reps = s["replicas"].as_array().context("replicas")?;
    ensure!(reps.len() == 3, "{s}");
    ensure!(
        reps.iter().filter(|r| r["leader"] == true).count() == 1,
        "{s}"
    );
    ensure!(
        s["store"]["kind"] == "etcd" && s["store"]["health"] == "ok",
        "{s}"
    );
    Ok(())
}

#[test]
fn an_etcd_outage_keeps_reads_refuses_writes_and_heals() -> Result<()> {
    let mut etcd = EtcdServer::start().map_err(|e| anyhow!(e))?;
    let endpoint = etcd.endpoint();
    let dir = tempfile::tempdir()?;
    let fleet = sextant_tests::example_fleet();
    let a = replica(dir.path(), &endpoint, "cp-a", Some(&fleet))?;
    let b = replica(dir.path(), &endpoint, "cp-b", Some(&fleet))?;
    let (ca, cb) = (a.ctl(), b.ctl());
    eventually(
        Duration::from_secs(15),
        "the fleet on both replicas",
        || {
            let va = leader_of(&ca).ok()?.1;
            let vb = leader_of(&cb).ok()?.1;
            (va >= 1 && va == vb).then_some(())
        },
    )?;
    let before = ca.json(["routes", "www", "--group", "nl"])?;

    etcd.kill();
    let outage = Instant::now();
    // Reads keep working on both replicas; writes fail with a clear error.
    let mut saw_refusal = false;
    while outage.elapsed() < Duration::from_secs(10) {
        for ctl in [&ca, &cb] {
            let routes = ctl.json(["routes", "www", "--group", "nl"])?;
            ensure!(
                routes["rows"] == before["rows"],
                "routes changed during the outage"
            );
        }
        let out = ca.run(["drain", "provider/cdn-a", "--reason", "during outage"])?;
        if out.success {
            bail!("a write succeeded with etcd down: {}", out.stdout);
        }
        let err = out.stderr.to_lowercase();
        ensure!(
            err.contains("store unavailable") || err.contains("no leader") || err.contains("etcd"),
            "unclear write error: {}",
            out.stderr
        );
        saw_refusal = true;
        std::thread::sleep(Duration::from_millis(500));
    }
    ensure!(saw_refusal);

    etcd.restart().map_err(|e| anyhow!(e))?;
    // Both recover on their own: writes work again, from either replica.
    eventually(
        Duration::from_secs(20),
        "a write after etcd returns",
        || {
            cb.run(["drain", "provider/cdn-a", "--reason", "after outage"])
                .ok()
                .filter(|o| o.success)
        },
    )?;
    eventually(
        Duration::from_secs(10),
        "both replicas to see the drain",
        || {
            let da = drains(&ca).ok()?;
            let db = drains(&cb).ok()?;
            (da.len() == 1 && da == db).then_some(())
        },
    )?;
    Ok(())
}

#[test]
fn a_drill_runs_on_across_a_leader_change() -> Result<()> {
    let etcd = EtcdServer::start().map_err(|e| anyhow!(e))?;
    let endpoint = etcd.endpoint();
    let dir = tempfile::tempdir()?;
    let (_origins, fleet) = origins_and_fleet(dir.path())?;
    let mut a = Some(replica(dir.path(), &endpoint, "cp-1", Some(&fleet))?);
    let mut b = Some(replica(dir.path(), &endpoint, "cp-2", Some(&fleet))?);
    let ctl_a = a.as_ref().map(ControlPlane::ctl).context("cp-1")?;
    let (leader, _) = eventually(Duration::from_secs(15), "a leader", || {
        leader_of(&ctl_a).ok().filter(|(_, v)| *v >= 1)
    })?;
    let follower = if leader == "cp-1" { &b } else { &a }
        .as_ref()
        .map(ControlPlane::ctl)
        .context("follower")?;
    // Started through the follower; 8 s long.
    follower
        .run([
            "drill",
            "start",
            "region/r2/origin/o2",
            "--duration",
            "8s",
            "--abort-if",
            "error_rate>0.5",
            "--reason",
            "HA drill",
        ])?
        .ok()?;
    // (The follower sees the leader's commit through its watch of etcd.)
    eventually(
        Duration::from_secs(5),
        "the drill's drain on the follower",
        || {
            drains(&follower)
                .ok()?
                .iter()
                .any(|(d, _)| d == "region/r2/origin/o2")
                .then_some(())
        },
    )?;
    // The leader dies mid-drill; the other replica takes over and ends it.
    let dead = if leader == "cp-1" { a.take() } else { b.take() };
    dead.context("leader")?.process.kill()?;
    let killed = Instant::now();
    let report = eventually(
        Duration::from_secs(25),
        "the drill to end on the new leader",
        || {
            let r = follower.json(["drill", "report", "drill-1"]).ok()?;
            (r["outcome"] == "succeeded").then_some(r)
        },
    )?;
    ensure!(
        killed.elapsed() >= Duration::from_secs(3),
        "ended before the new leader could have"
    );
    ensure!(
        drains(&follower)?.is_empty(),
        "the drill's drain was left behind: {report}"
    );
    let (new_leader, _) = leader_of(&follower)?;
    ensure!(new_leader != leader, "no new leader");
    Ok(())
}

#[test]
fn a_stepped_drain_completes_across_leader_kills() -> Result<()> {
    let etcd = EtcdServer::start().map_err(|e| anyhow!(e))?;
    let endpoint = etcd.endpoint();
    let dir = tempfile::tempdir()?;
    let (_origins, fleet) = origins_and_fleet(dir.path())?;
    let ids = ["cp-1", "cp-2", "cp-3"];
    let mut replicas: Vec<Option<ControlPlane>> = Vec::new();
    for id in ids {
        replicas.push(Some(replica(dir.path(), &endpoint, id, Some(&fleet))?));
    }
    let ctl_of = |replicas: &[Option<ControlPlane>], except: &str| -> Option<Ctl> {
        replicas
            .iter()
            .zip(ids)
            .find(|(r, id)| r.is_some() && *id != except)
            .and_then(|(r, _)| r.as_ref().map(ControlPlane::ctl))
    };
    let ctl = ctl_of(&replicas, "").context("a replica")?;
    let (leader, v0) = eventually(Duration::from_secs(15), "a leader", || {
        leader_of(&ctl).ok().filter(|(_, v)| *v >= 1)
    })?;
    let follower = ctl_of(&replicas, &leader).context("a follower")?;
    // Four steps, 2 s apart, started through a follower.
    follower
        .run([
            "drain",
            "region/r2/origin/o2",
            "--steps",
            "0.25,0.5,0.75,1.0",
            "--interval",
            "2s",
            "--reason",
            "maintenance across failovers",
        ])?
        .ok()?;
    // Kill the leader twice while it steps.
    let mut leader = leader;
    for _ in 0..2 {
        let i = ids
            .iter()
            .position(|id| *id == leader)
            .context("leader index")?;
        if let Some(cp) = replicas[i].take() {
            cp.process.kill()?;
        }
        let survivor = ctl_of(&replicas, &leader).context("a survivor")?;
        let old = leader.clone();
        leader = eventually(Duration::from_secs(10), "a new leader", || {
            let (l, _) = leader_of(&survivor).ok()?;
            (l != old).then_some(l)
        })?;
        replicas[i] = Some(replica(dir.path(), &endpoint, &old, None)?);
    }
    let ctl = ctl_of(&replicas, "").context("a replica")?;
    eventually(
        Duration::from_secs(20),
        "the drain to reach its target",
        || {
            let d = drains(&ctl).ok()?;
            (d == vec![("region/r2/origin/o2".to_owned(), 1.0)]).then_some(())
        },
    )?;
    // One version per step, none lost or repeated.
    let (_, hi) = consecutive_versions(&ctl)?;
    ensure!(
        hi >= v0 + 4,
        "version {hi}: fewer versions than steps after {v0}"
    );
    Ok(())
}

#[test]
fn a_rib_loaded_through_a_follower_reaches_every_replica() -> Result<()> {
    let etcd = EtcdServer::start().map_err(|e| anyhow!(e))?;
    let endpoint = etcd.endpoint();
    let dir = tempfile::tempdir()?;
    let fleet = sextant_tests::example_fleet();
    let (leading, following) = two_replicas(dir.path(), &endpoint, &fleet)?;
    let (follower, other) = (&following.ctl(), &leading.ctl());

    // The example fleet's group nl names AS64501, gb AS64502.
    let routes = [("198.51.100.0/24", 64501), ("203.0.113.0/24", 64502)];
    let bird_dir = dir.path().join("bird");
    std::fs::create_dir_all(&bird_dir)?;
    let bird = sextant_tests::bird::Bird::start(&bird_dir, &routes)?;
    let rib = dir.path().join("rib.mrt");
    bird.dump(&rib, routes.len())?;
    let loaded = follower.json(["bgp", "load-rib", rib.to_str().context("path")?])?;
    ensure!(loaded["rib"]["generation"] == 1, "{loaded}");
    let digest = loaded["rib"]["digest"].clone();
    // Both replicas read the map from etcd.
    for ctl in [follower, other] {
        eventually(Duration::from_secs(10), "the map on the replica", || {
            let shown = ctl.json(["bgp", "show"]).ok()?;
            (shown["digest"] == digest).then_some(())
        })?;
        let found = ctl.json(["bgp", "lookup", "203.0.113.9"])?;
        ensure!(
            found["origin_asn"] == 64502 && found["group"] == "gb",
            "{found}"
        );
    }
    Ok(())
}

/// The leader publishes the routing table it computed; a follower, the
/// table it read back from etcd. Both must digest a version alike, or
/// every node moving between them (a failover) would be sent its config
/// whole again.
#[test]
fn a_node_moving_to_another_replica_is_sent_nothing_again() -> Result<()> {
    use sextant_proto::v1 as pb;
    use sextant_tests::subscriber::{ack, hello, hello_holding, subscribe, whole};
    let etcd = EtcdServer::start().map_err(|e| anyhow!(e))?;
    let endpoint = etcd.endpoint();
    let dir = tempfile::tempdir()?;
    let (_origins, fleet) = origins_and_fleet(dir.path())?;
    let (leading, following) = two_replicas(dir.path(), &endpoint, &fleet)?;
    sextant_tests::fleets::drain_o3_a_tenth(&leading.ctl())?;
    let v = leader_of(&leading.ctl())?.1;
    eventually(
        Duration::from_secs(10),
        "the follower at the version",
        || (leader_of(&following.ctl()).ok()?.1 == v).then_some(()),
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async {
        for (node, kind) in [("e1", pb::NodeKind::Proxy), ("dns-1", pb::NodeKind::Dns)] {
            let (tx, mut s) = subscribe(&leading.url(), hello(node, kind, 0)).await?;
            let u = whole(&mut s).await?;
            ensure!(u.version == v, "{u:?}");
            tx.send(ack(&u)).await?;
            let held = hello_holding(node, kind, v, &u.digest);
            let (_tx, mut s) = subscribe(&following.url(), held).await?;
            let r = tokio::time::timeout(Duration::from_secs(3), s.message()).await;
            ensure!(
                r.is_err(),
                "{node} holding version {v} from the leader was sent {r:?} by the follower"
            );
        }
        Ok(())
    })
}
