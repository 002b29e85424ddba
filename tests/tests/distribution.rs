//! End to end: the config distribution protocol's edge cases, with real
//! control planes, real edges and scripted subscribers (found in review:
//! a split emptied by a delta, two kinds of node sharing a name, a claimed
//! version, a NACK of this node's own making).

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use sextant_proto::v1 as pb;
use sextant_tests::fleets::{two_edges_three_origins as fleet, SITE1, SITE2};
use sextant_tests::origin::Origin;
use sextant_tests::subscriber::{ack, hello, hello_holding, subscribe, whole};
use sextant_tests::{eventually, http_get, ControlPlane, Ctl, EdgeProxy};

fn version(ctl: &Ctl) -> Result<u64> {
    ctl.json(["status"])?["routing_version"]
        .as_u64()
        .context("no routing_version in status")
}

/// `node`'s line in `sextantctl status -o json`, of `kind`.
fn subscriber(ctl: &Ctl, node: &str, kind: &str) -> Option<serde_json::Value> {
    let status = ctl.json(["status"]).ok()?;
    status["subscribers"]
        .as_array()?
        .iter()
        .find(|s| s["node_id"] == node && s["kind"] == kind)
        .cloned()
}

/// A runtime whose connections run on a worker, so that checks that
/// block the test's thread (`sextantctl status`) do not stall them.
fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?)
}

fn applies(e: &EdgeProxy, v: u64, what: &str) -> Result<()> {
    eventually(Duration::from_secs(10), what, || {
        (e.config_version().ok()? == v).then_some(())
    })
}

#[test]
fn draining_every_origin_reaches_a_connected_edge_as_it_does_a_new_one() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let o1 = Origin::start("o1")?;
    let f = dir.path().join("fleet.toml");
    std::fs::write(&f, fleet(&[&o1], None))?;
    let cp = ControlPlane::start(&dir.path().join("cp"), Some(&f))?;
    let ctl = cp.ctl();
    let e1 = EdgeProxy::start(&cp.url(), "e1", SITE1, &dir.path().join("e1"))?;
    applies(&e1, version(&ctl)?, "e1 to apply the first version")?;
    let (code, body) = http_get(e1.process.addr, "/")?;
    ensure!(code == 200 && body.starts_with("o1"), "{code} {body}");
    // The only origin, drained whole: e1 gets it as a delta.
    ctl.run([
        "drain",
        "region/r1/origin/o1",
        "--reason",
        "dc maintenance",
        "--force",
        "--force-reason",
        "test",
    ])?
    .ok()?;
    let v2 = version(&ctl)?;
    applies(&e1, v2, "e1 to apply the drain")?;
    // A new edge gets the same version whole.
    let e2 = EdgeProxy::start(&cp.url(), "e2", SITE2, &dir.path().join("e2"))?;
    applies(&e2, v2, "e2 to apply the drain")?;
    for e in [&e1, &e2] {
        let (code, body) = http_get(e.process.addr, "/")?;
        ensure!(
            code == 503 && body.contains("no origin available"),
            "version {v2} drains o1, yet {code} {body:?}"
        );
    }
    ensure!(o1.requests.load(std::sync::atomic::Ordering::Relaxed) == 1);
    Ok(())
}

#[test]
fn a_dns_server_named_like_an_edge_is_another_subscriber() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cp = ControlPlane::start(dir.path(), Some(&sextant_tests::example_fleet()))?;
    let url = cp.url();
    let rt = runtime()?;
    rt.block_on(async {
        // ams1 is an edge of the example fleet; a DNS server may be named
        // after its site too.
        let (ptx, mut proxy) = subscribe(&url, hello("ams1", pb::NodeKind::Proxy, 0)).await?;
        ptx.send(ack(&whole(&mut proxy).await?)).await?;
        let (dtx, mut dns) = subscribe(&url, hello("ams1", pb::NodeKind::Dns, 0)).await?;
        dtx.send(ack(&whole(&mut dns).await?)).await?;
        // Neither stream is cut (a replaced one is, within 2 s).
        for s in [&mut proxy, &mut dns] {
            let r = tokio::time::timeout(Duration::from_secs(5), s.message()).await;
            ensure!(r.is_err(), "a stream ended or got an update: {r:?}");
        }
        let ctl = cp.ctl();
        for kind in ["proxy", "dns"] {
            let s = subscriber(&ctl, "ams1", kind).context("in status")?;
            ensure!(s["connected"] == true, "{s}");
        }
        Ok(())
    })
}

#[test]
fn a_version_claimed_ahead_of_the_control_plane_is_not_taken_as_applied() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cp = ControlPlane::start_with(
        dir.path(),
        Some(&sextant_tests::example_fleet()),
        &["--ahead-grace-seconds", "2", "--metrics", "127.0.0.1:0"],
    )?;
    let ctl = cp.ctl();
    let current = version(&ctl)?;
    let metrics = cp.logged_addr("metrics")?;
    let url = cp.url();
    let rt = runtime()?;
    rt.block_on(async {
        let (tx, mut s) = subscribe(&url, hello("dns-x", pb::NodeKind::Dns, 1000)).await?;
        let started = std::time::Instant::now();
        let st = subscriber(&ctl, "dns-x", "dns").context("dns-x in status")?;
        ensure!(st["version_applied"] == 0, "{st}");
        // Nothing older for the grace (a replica catching up), then the
        // current config, whole.
        let u = tokio::time::timeout(Duration::from_secs(10), whole(&mut s))
            .await
            .context("no snapshot after the grace")??;
        ensure!(
            started.elapsed() >= Duration::from_millis(1500),
            "sent before the grace"
        );
        ensure!(u.full && u.version == current, "{u:?}");
        tx.send(ack(&u)).await?;
        eventually(Duration::from_secs(5), "the ACK in status", || {
            let st = subscriber(&ctl, "dns-x", "dns")?;
            (st["version_applied"] == current).then_some(())
        })?;
        // A claim the control plane has reached is taken at once, with
        // the digest of its version...
        ensure!(!u.digest.is_empty(), "an update without a digest: {u:?}");
        let held = hello_holding("dns-y", pb::NodeKind::Dns, current, &u.digest);
        let (_tx, mut s) = subscribe(&url, held).await?;
        let st = subscriber(&ctl, "dns-y", "dns").context("dns-y in status")?;
        ensure!(st["version_applied"] == current, "{st}");
        let r = tokio::time::timeout(Duration::from_secs(3), s.message()).await;
        ensure!(r.is_err(), "a node at the current version was sent {r:?}");
        // ... and not with another (another history's version of that
        // number, or a node that kept no digest): that node gets the
        // current config whole, at once.
        for (node, digest) in [("dns-z", "0123456789abcdef0123456789abcdef"), ("dns-w", "")] {
            let (_tx, mut s) = subscribe(
                &url,
                hello_holding(node, pb::NodeKind::Dns, current, digest),
            )
            .await?;
            let st = subscriber(&ctl, node, "dns").context("in status")?;
            ensure!(st["version_applied"] == 0, "{st}");
            let u2 = tokio::time::timeout(Duration::from_secs(3), whole(&mut s))
                .await
                .context("nothing sent to a node holding other content")??;
            ensure!(
                u2.full && u2.version == current && u2.digest == u.digest,
                "{u2:?}"
            );
        }
        Ok(())
    })?;
    // Three sent whole (dns-x after the grace, dns-z, dns-w), one of them
    // to a node that named another digest (dns-w named none).
    eventually(Duration::from_secs(5), "the counts in the metrics", || {
        let (_, body) = http_get(metrics, "/metrics").ok()?;
        (body.contains("sextant_config_other_content_claims_total 1\n")
            && body.contains("sextant_config_updates_sent_total{update=\"full\"} 3\n")
            && body.contains("sextant_config_updates_sent_total{update=\"delta\"} 0\n"))
        .then_some(())
    })
}

#[test]
fn a_version_this_node_could_not_persist_is_applied_once_it_can() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (_origins, f) = sextant_tests::fleets::origins_and_fleet(dir.path())?;
    let cp = ControlPlane::start(&dir.path().join("cp"), Some(&f))?;
    let ctl = cp.ctl();
    let data = dir.path().join("e1");
    let e1 = EdgeProxy::start(&cp.url(), "e1", SITE1, &data)?;
    applies(&e1, version(&ctl)?, "e1 to apply the first version")?;
    // Persisting fails (a directory takes the temporary file's name; this
    // holds for root too).
    let tmp = data.join("last-good-config.pb.tmp");
    std::fs::create_dir(&tmp)?;
    ctl.run([
        "drain",
        "region/r2/origin/o2",
        "--fraction",
        "0.5",
        "--reason",
        "x",
    ])?
    .ok()?;
    let v2 = version(&ctl)?;
    eventually(
        Duration::from_secs(10),
        "e1's NACK of the new version",
        || {
            let s = subscriber(&ctl, "e1", "proxy")?;
            (s["last_nack_version"] == v2).then_some(())
        },
    )?;
    ensure!(e1.config_version()? < v2, "applied without persisting");
    std::fs::remove_dir(&tmp)?;
    applies(&e1, v2, "e1 to apply the version once it can persist it")?;
    Ok(())
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// A store seeded with origins o1–o3 and their fleet, and a backup of it
/// (copied with the control plane stopped): (origins, store, backup).
/// Keep the origins alive as long as the store is used.
fn backed_up_store(
    dir: &std::path::Path,
) -> Result<(Vec<Origin>, std::path::PathBuf, std::path::PathBuf)> {
    let (origins, f) = sextant_tests::fleets::origins_and_fleet(dir)?;
    let (store, backup) = (dir.join("cp"), dir.join("backup"));
    let cp = ControlPlane::start(&store, Some(&f))?;
    version(&cp.ctl())?;
    cp.process.stop()?;
    copy_dir(&store, &backup)?;
    Ok((origins, store, backup))
}

/// Puts `backup` back in place of `store` (the control plane stopped).
fn restore(store: &std::path::Path, backup: &std::path::Path) -> Result<()> {
    std::fs::remove_dir_all(store)?;
    copy_dir(backup, store)
}

/// A store restored from a backup numbers its versions on from the
/// backup's. Once it has published as far with other changes, an edge
/// that held the old history's version of the same number must get this
/// history's content, whole: not nothing (the same number), and not a
/// delta on a config it does not hold. Whether it reconnects then
/// (`connected_throughout` false: its hello is checked) or was connected
/// all along, claiming a version the server had not reached.
fn restored_history(connected_throughout: bool) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (_origins, store, backup) = backed_up_store(dir.path())?;
    // The old history: o2 drained.
    let cp = ControlPlane::start(&store, None)?;
    let ctl = cp.ctl();
    let data = dir.path().join("e1");
    let e1 = EdgeProxy::start(&cp.url(), "e1", SITE1, &data)?;
    ctl.run(["drain", "region/r2/origin/o2", "--reason", "old history"])?
        .ok()?;
    let held = version(&ctl)?;
    applies(&e1, held, "e1 to apply the old history's drain")?;
    let counts = sextant_tests::split(e1.process.addr, 200)?;
    ensure!(!counts.contains_key("o2"), "o2 drained: {counts:?}");
    e1.process.stop()?;
    cp.process.stop()?;
    // The restore (a grace long enough not to matter), and another history
    // up to the edge's version: o1 drained, o3 partly.
    restore(&store, &backup)?;
    let cp = ControlPlane::start_with(&store, None, &["--ahead-grace-seconds", "300"])?;
    let ctl = cp.ctl();
    ensure!(version(&ctl)? < held, "the backup is not older");
    let mut e1 = None;
    if connected_throughout {
        e1 = Some(EdgeProxy::start(&cp.url(), "e1", SITE1, &data)?);
    }
    ctl.run(["drain", "region/r1/origin/o1", "--reason", "new history"])?
        .ok()?;
    for step in 1.. {
        if version(&ctl)? >= held {
            break;
        }
        let fraction = format!("0.{step}");
        ctl.run([
            "drain",
            "region/r3/origin/o3",
            "--fraction",
            &fraction,
            "--reason",
            "move on",
        ])?
        .ok()?;
    }
    // The same number: a delta would not even be sent.
    ensure!(version(&ctl)? == held, "passed the edge's version {held}");
    let e1 = match e1 {
        Some(e) => e,
        None => EdgeProxy::start(&cp.url(), "e1", SITE1, &data)?,
    };
    eventually(
        Duration::from_secs(10),
        "e1 to serve this history's config",
        || {
            let counts = sextant_tests::split(e1.process.addr, 100).ok()?;
            (!counts.contains_key("o1") && counts.contains_key("o2")).then_some(())
        },
    )?;
    applies(&e1, version(&ctl)?, "e1 to hold the current version")?;
    let s = subscriber(&ctl, "e1", "proxy").context("e1 in status")?;
    ensure!(s["last_nack_version"] == 0, "{s}");
    Ok(())
}

#[test]
fn an_edge_holding_a_version_of_another_history_gets_this_ones() -> Result<()> {
    restored_history(false)
}

#[test]
fn an_edge_ahead_of_a_restored_store_gets_its_history_when_it_gets_there() -> Result<()> {
    restored_history(true)
}

/// A restart publishes the version the store holds, with the very content
/// (and digest) the node got before it: the node is sent nothing again.
/// (The leader publishes the table it computed; a restart, or a
/// follower, the table read back from the store.)
#[test]
fn a_restarted_control_plane_keeps_the_digest_of_its_version() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (_origins, f) = sextant_tests::fleets::origins_and_fleet(dir.path())?;
    let store = dir.path().join("cp");
    let cp = ControlPlane::start(&store, Some(&f))?;
    let ctl = cp.ctl();
    sextant_tests::fleets::drain_o3_a_tenth(&ctl)?;
    let v = version(&ctl)?;
    let rt = runtime()?;
    let digest = rt.block_on(async {
        let (tx, mut s) = subscribe(&cp.url(), hello("e1", pb::NodeKind::Proxy, 0)).await?;
        let u = whole(&mut s).await?;
        ensure!(u.version == v, "{u:?}");
        tx.send(ack(&u)).await?;
        Ok(u.digest)
    })?;
    cp.process.stop()?;
    let cp = ControlPlane::start(&store, None)?;
    ensure!(version(&cp.ctl())? == v, "the restart made a new version");
    rt.block_on(async {
        let held = hello_holding("e1", pb::NodeKind::Proxy, v, &digest);
        let (_tx, mut s) = subscribe(&cp.url(), held).await?;
        let r = tokio::time::timeout(Duration::from_secs(3), s.message()).await;
        ensure!(
            r.is_err(),
            "a node holding version {v} with its digest {digest} was sent {r:?}"
        );
        Ok(())
    })
}

/// A restored store that redoes the change a node holds reaches the same
/// content under the same number: the node, whose claim was ahead of the
/// store, is taken as holding it once the store gets there, and is sent
/// nothing again.
#[test]
fn a_restored_store_redoing_the_same_change_sends_nothing_again() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (_origins, store, backup) = backed_up_store(dir.path())?;
    let drain_o2 = |ctl: &Ctl| -> Result<u64> {
        ctl.run(["drain", "region/r2/origin/o2", "--reason", "x"])?
            .ok()?;
        version(ctl)
    };
    let cp = ControlPlane::start(&store, None)?;
    let held = drain_o2(&cp.ctl())?;
    let rt = runtime()?;
    let digest = rt.block_on(async {
        let (_tx, mut s) = subscribe(&cp.url(), hello("e1", pb::NodeKind::Proxy, 0)).await?;
        let u = whole(&mut s).await?;
        ensure!(u.version == held, "{u:?}");
        Ok(u.digest)
    })?;
    cp.process.stop()?;
    restore(&store, &backup)?;
    let cp = ControlPlane::start_with(&store, None, &["--ahead-grace-seconds", "300"])?;
    let ctl = cp.ctl();
    rt.block_on(async {
        let claim = hello_holding("e1", pb::NodeKind::Proxy, held, &digest);
        let (_tx, mut s) = subscribe(&cp.url(), claim).await?;
        let st = subscriber(&ctl, "e1", "proxy").context("e1 in status")?;
        ensure!(st["version_applied"] == 0, "a claim ahead taken: {st}");
        ensure!(drain_o2(&ctl)? == held, "the same change, another version");
        eventually(Duration::from_secs(5), "the claim taken", || {
            let st = subscriber(&ctl, "e1", "proxy")?;
            (st["version_applied"] == held).then_some(())
        })?;
        let r = tokio::time::timeout(Duration::from_secs(2), s.message()).await;
        ensure!(r.is_err(), "the same content sent again: {r:?}");
        Ok(())
    })
}
