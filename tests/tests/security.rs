//! Mutual TLS and authorization end to end: a control plane with TLS on,
//! operators by certificate and by token, an edge and a GeoDNS server with
//! their own certificates, refusals that change nothing, certificate
//! rotation without a restart, and identities in the audit log.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use sextant_store::etcd_server::{EtcdServer, EtcdServerTls};
use sextant_tests::fleets::{origins_and_fleet, SITE1, SITE2};
use sextant_tests::{
    bin, eventually, http_get, logged_addr, split, ControlPlane, CtlOutput, DnsServer, EdgeProxy,
    Prober,
};

fn ca(args: &[&str]) -> Result<()> {
    let out = Command::new(bin("sextant-ca")?).args(args).output()?;
    ensure!(
        out.status.success(),
        "sextant-ca {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `sextantctl` over TLS, as operator `cert` (a certificate in `tls`) or
/// with `token`, or neither.
struct Ctl {
    url: String,
    tls: PathBuf,
}

impl Ctl {
    fn run(&self, cert: Option<&str>, token: Option<&str>, args: &[&str]) -> Result<CtlOutput> {
        self.run_in(&self.tls, cert, token, args)
    }

    fn run_in(
        &self,
        dir: &Path,
        cert: Option<&str>,
        token: Option<&str>,
        args: &[&str],
    ) -> Result<CtlOutput> {
        let mut cmd = Command::new(bin("sextantctl")?);
        cmd.args(["--server", &self.url, "--timeout", "10"])
            .arg("--tls-ca")
            .arg(self.tls.join("ca.crt"))
            .env_remove("SEXTANT_TOKEN");
        if let Some(c) = cert {
            cmd.arg("--tls-cert")
                .arg(dir.join(format!("operator-{c}.crt")))
                .arg("--tls-key")
                .arg(dir.join(format!("operator-{c}.key")));
        }
        if let Some(t) = token {
            cmd.env("SEXTANT_TOKEN", t);
        }
        let out = cmd.args(args).output().context("cannot run sextantctl")?;
        Ok(CtlOutput {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    fn json(&self, cert: Option<&str>, token: Option<&str>, args: &[&str]) -> Result<Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        self.run(cert, token, &all)?.ok()?.json()
    }

    /// Fails unless the call is refused with a message containing `says`.
    fn refused(
        &self,
        cert: Option<&str>,
        token: Option<&str>,
        args: &[&str],
        says: &str,
    ) -> Result<()> {
        let out = self.run(cert, token, args)?;
        ensure!(
            !out.success,
            "{args:?} as {cert:?} should be refused: {}",
            out.stdout
        );
        ensure!(
            out.stderr.contains(says),
            "{args:?} as {cert:?}: expected {says:?} in: {}",
            out.stderr
        );
        Ok(())
    }
}

fn tls_args(tls: &Path, who: &str) -> Vec<String> {
    vec![
        "--tls-ca".into(),
        tls.join("ca.crt").display().to_string(),
        "--tls-cert".into(),
        tls.join(format!("{who}.crt")).display().to_string(),
        "--tls-key".into(),
        tls.join(format!("{who}.key")).display().to_string(),
    ]
}

fn metric(addr: std::net::SocketAddr, name: &str) -> Option<f64> {
    let (_, body) = http_get(addr, "/metrics").ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}

#[test]
fn mutual_tls_roles_scopes_tokens_and_rotation() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tls = dir.path().join("tls");
    let tls_s = tls.display().to_string();
    ca(&["init", &tls_s])?;
    for (kind, id) in [
        ("replica", "cp-1"),
        ("edge", "e1"),
        ("dns", "dns-1"),
        ("probe", "probe-1"),
        ("operator", "admin"),
        ("operator", "alice"),
        ("operator", "bob"),
    ] {
        ca(&["issue", &tls_s, "--kind", kind, "--id", id])?;
    }
    // Another CA that issues a certificate with the admin's name.
    let evil = dir.path().join("evil");
    let evil_s = evil.display().to_string();
    ca(&["init", &evil_s])?;
    ca(&["issue", &evil_s, "--kind", "operator", "--id", "admin"])?;
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[operators]]\nname = \"admin\"\nrole = \"admin\"\n\n\
         [[operators]]\nname = \"alice\"\nrole = \"operator\"\nscopes = [\"region/r1\"]\n\n\
         [[operators]]\nname = \"bob\"\nrole = \"viewer\"\n",
    )?;
    let (_origins, fleet) = origins_and_fleet(dir.path())?;
    let p = |f: &str| tls.join(f).display().to_string();
    let cp = ControlPlane::start_with(
        &dir.path().join("cp"),
        Some(&fleet),
        &[
            "--tls-cert",
            &p("replica-cp-1.crt"),
            "--tls-key",
            &p("replica-cp-1.key"),
            "--tls-client-ca",
            &p("ca.crt"),
            "--policy",
            &policy.display().to_string(),
            "--metrics",
            "127.0.0.1:0",
        ],
    )?;
    let url = format!("https://{}", cp.process.addr);
    let metrics = logged_addr(&cp.process.log(), "metrics")?;
    let ctl = Ctl {
        url: url.clone(),
        tls: tls.clone(),
    };

    // Nobody without credentials; the admin by certificate.
    ctl.refused(None, None, &["status"], "no credentials")?;
    let status = ctl.json(Some("admin"), None, &["status"])?;
    ensure!(
        status["auth"] == "mtls+token" && status["insecure"] == false,
        "{status}"
    );
    // A certificate from another CA never gets past the handshake.
    let out = ctl.run_in(
        &evil,
        Some("admin"),
        None,
        &["drain", "region/r2", "--reason", "x"],
    )?;
    ensure!(!out.success, "a foreign CA's certificate was accepted");
    ensure!(
        out.stderr
            .contains("is your certificate from the control plane's CA"),
        "{}",
        out.stderr
    );

    // A viewer may read but not drain; a scoped operator only in its scope.
    ensure!(ctl
        .json(Some("bob"), None, &["get", "drains"])?
        .as_array()
        .is_some_and(|a| a.is_empty()));
    ctl.refused(
        Some("bob"),
        None,
        &["drain", "region/r1", "--reason", "x"],
        "role viewer is not enough",
    )?;
    ctl.refused(
        Some("alice"),
        None,
        &["drain", "region/r2", "--reason", "x"],
        "only within region/r1",
    )?;
    ctl.refused(
        Some("alice"),
        None,
        &[
            "drain",
            "region/r1",
            "--reason",
            "x",
            "--force",
            "--force-reason",
            "y",
        ],
        "may not force",
    )?;
    ensure!(
        ctl.json(Some("admin"), None, &["get", "drains"])?
            .as_array()
            .is_some_and(|a| a.is_empty()),
        "a refused drain changed something"
    );
    ctl.run(
        Some("alice"),
        None,
        &["drain", "region/r1", "--reason", "maintenance"],
    )?
    .ok()?;

    // Tokens: created by the admin, shown once, limited by role, revocable,
    // and they expire.
    let created = ctl.json(
        Some("admin"),
        None,
        &[
            "token", "create", "--name", "ci", "--role", "viewer", "--ttl", "1h", "--reason",
            "ci reads",
        ],
    )?;
    let token = created["token"].as_str().context("no token")?.to_owned();
    let id = created["id"].as_str().context("no id")?.to_owned();
    ensure!(token.starts_with("sxt_"), "{created}");
    let drains = ctl.json(None, Some(&token), &["get", "drains"])?;
    ensure!(drains.as_array().is_some_and(|a| a.len() == 1), "{drains}");
    ctl.refused(
        None,
        Some(&token),
        &["undrain", "region/r1"],
        "role viewer is not enough",
    )?;
    ctl.refused(None, Some(&token), &["token", "list"], "needs admin")?;
    let listed = ctl
        .json(Some("admin"), None, &["token", "list"])?
        .to_string();
    ensure!(
        listed.contains(&id) && !listed.contains(&token[20..]),
        "{listed}"
    );
    ctl.run(Some("admin"), None, &["token", "revoke", &id])?
        .ok()?;
    ctl.refused(None, Some(&token), &["get", "drains"], "revoked")?;
    let short = ctl.json(
        Some("admin"),
        None,
        &[
            "token", "create", "--name", "brief", "--role", "admin", "--ttl", "1s",
        ],
    )?;
    std::thread::sleep(Duration::from_millis(1500));
    let short = short["token"].as_str().context("no token")?;
    ctl.refused(None, Some(short), &["status"], "expired")?;
    ctl.refused(None, Some("sxt_nonsense"), &["status"], "not valid")?;

    // Data-plane nodes with their own certificates: the edge e1 and the DNS
    // server get config; e1's certificate cannot pose as e2.
    let edge_args = tls_args(&tls, "edge-e1");
    let edge_refs: Vec<&str> = edge_args.iter().map(String::as_str).collect();
    let e1 = EdgeProxy::start_with(&url, "e1", SITE1, &dir.path().join("e1"), &edge_refs)?;
    eventually(Duration::from_secs(15), "e1 gets its config", || {
        e1.config_version().ok().filter(|v| *v > 0)
    })?;
    let served = split(e1.process.addr, 6)?;
    ensure!(served.values().sum::<usize>() == 6, "{served:?}");
    let fake = EdgeProxy::start_with(&url, "e2", SITE2, &dir.path().join("e2"), &edge_refs)?;
    eventually(Duration::from_secs(15), "e2 posing is refused", || {
        fake.process
            .log()
            .contains("may not act as edge/e2")
            .then_some(())
    })?;
    ensure!(fake.config_version()? == 0, "the impostor got a config");
    let dns_args = tls_args(&tls, "dns-dns-1");
    let dns_refs: Vec<&str> = dns_args.iter().map(String::as_str).collect();
    let dns = DnsServer::start_with(&url, "dns-1", &dir.path().join("dns"), &dns_refs)?;
    // r1 is drained: only e2 (127.0.1.2) answers.
    eventually(
        Duration::from_secs(15),
        "DNS answers over mTLS config",
        || {
            let a = dns.dig(&["+short", "www.example.com", "A"]).ok()?;
            (a.trim() == "127.0.1.2").then_some(())
        },
    )?;

    // A prober lists the edges and reports as its own vantage id only.
    let probe_args = tls_args(&tls, "probe-probe-1");
    let probe_refs: Vec<&str> = probe_args.iter().map(String::as_str).collect();
    let prober = Prober::start(&url, "probe-1", &probe_refs)?;
    eventually(
        Duration::from_secs(15),
        "the prober lists the edges",
        || {
            prober
                .metric("sextant_probe_targets ")
                .ok()
                .flatten()
                .filter(|n| *n == 2.0)
        },
    )?;
    let posing = Prober::start(&url, "probe-2", &probe_refs)?;
    eventually(Duration::from_secs(15), "probe-2 posing is refused", || {
        posing
            .process
            .log()
            .contains("may not act as probe/probe-2")
            .then_some(())
    })?;
    ensure!(
        !prober.process.log().contains("may not"),
        "{}",
        prober.process.log()
    );

    // Rotation: new certificate files for the control plane are served to
    // new connections without a restart, and subscribed nodes stay.
    let before = std::fs::read(tls.join("replica-cp-1.crt"))?;
    let connects = |log: &str| log.matches("subscriber connected").count();
    let connected_before = connects(&cp.process.log());
    let rotated = dir.path().join("rotated");
    std::fs::create_dir_all(&rotated)?;
    std::fs::copy(tls.join("ca.crt"), rotated.join("ca.crt"))?;
    std::fs::copy(tls.join("ca.key"), rotated.join("ca.key"))?;
    ca(&[
        "issue",
        &rotated.display().to_string(),
        "--kind",
        "replica",
        "--id",
        "cp-1",
    ])?;
    for ext in ["key", "crt"] {
        let tmp = tls.join(format!("replica-cp-1.{ext}.new"));
        std::fs::copy(rotated.join(format!("replica-cp-1.{ext}")), &tmp)?;
        std::fs::rename(&tmp, tls.join(format!("replica-cp-1.{ext}")))?;
    }
    ensure!(std::fs::read(tls.join("replica-cp-1.crt"))? != before);
    eventually(
        Duration::from_secs(15),
        "the control plane reloads its certificate",
        || metric(metrics, "sextant_tls_reloads_total ").filter(|n| *n >= 1.0),
    )?;
    let status = ctl.json(Some("admin"), None, &["status"])?;
    let e1_sub = status["subscribers"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["node_id"] == "e1"))
        .cloned()
        .context("e1 not in status")?;
    ensure!(e1_sub["connected"] == true, "{status}");
    ensure!(
        connects(&cp.process.log()) == connected_before,
        "subscribers reconnected on rotation"
    );

    // The audit log names who did what, as authenticated.
    let audit = ctl.json(Some("bob"), None, &["audit"])?;
    let records = audit.as_array().context("audit is a list")?;
    let by = |action: &str| -> Vec<String> {
        records
            .iter()
            .filter(|r| r["action"] == action)
            .map(|r| r["actor"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    ensure!(by("drain") == ["operator/alice"], "{audit}");
    ensure!(
        by("token.create").iter().all(|a| a == "operator/admin"),
        "{audit}"
    );
    ensure!(by("token.revoke") == ["operator/admin"], "{audit}");
    // Refusals are counted.
    let refused = metric(
        metrics,
        "sextant_grpc_refused_total{code=\"permission_denied\"} ",
    );
    ensure!(
        refused.is_some_and(|n| n >= 3.0),
        "{refused:?}: {}",
        http_get(metrics, "/metrics")?
            .1
            .lines()
            .filter(|l| l.contains("refused"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(())
}

/// A CA in `dir` and a certificate for each (kind, id).
fn certificates(dir: &Path, who: &[(&str, &str)]) -> Result<()> {
    let d = dir.display().to_string();
    ca(&["init", &d])?;
    for (kind, id) in who {
        ca(&["issue", &d, "--kind", kind, "--id", id])?;
    }
    Ok(())
}

#[test]
fn a_tls_cluster_on_a_tls_etcd_forwards_with_the_callers_identity() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tls = dir.path().join("tls");
    certificates(
        &tls,
        &[
            ("replica", "cp-1"),
            ("replica", "cp-2"),
            ("replica", "etcd"),
            ("operator", "alice"),
            ("edge", "e1"),
        ],
    )?;
    let p = |f: &str| tls.join(f).display().to_string();
    let etcd = EtcdServer::start_tls(EtcdServerTls {
        cert: tls.join("replica-etcd.crt"),
        key: tls.join("replica-etcd.key"),
        client_ca: tls.join("ca.crt"),
    })
    .map_err(anyhow::Error::msg)?;
    let endpoint = etcd.endpoint();
    ensure!(endpoint.starts_with("https://"), "{endpoint}");
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[operators]]\nname = \"alice\"\nrole = \"operator\"\n",
    )?;
    let (_origins, fleet) = origins_and_fleet(dir.path())?;
    let start = |id: &str, fleet: Option<&Path>| {
        ControlPlane::start_with(
            &dir.path().join(id),
            fleet,
            &[
                "--store",
                "etcd",
                "--etcd-endpoints",
                &endpoint,
                "--etcd-tls-ca",
                &p("ca.crt"),
                "--etcd-tls-cert",
                &p(&format!("replica-{id}.crt")),
                "--etcd-tls-key",
                &p(&format!("replica-{id}.key")),
                "--replica-id",
                id,
                "--tls-cert",
                &p(&format!("replica-{id}.crt")),
                "--tls-key",
                &p(&format!("replica-{id}.key")),
                "--tls-client-ca",
                &p("ca.crt"),
                "--policy",
                &policy.display().to_string(),
            ],
        )
    };
    let cp1 = start("cp-1", Some(&fleet))?;
    let cp2 = start("cp-2", None)?;
    let ctl_of = |cp: &ControlPlane| Ctl {
        url: format!("https://{}", cp.process.addr),
        tls: tls.clone(),
    };
    let (c1, c2) = (ctl_of(&cp1), ctl_of(&cp2));
    // Both see the same leader and the seeded fleet.
    let leader = eventually(Duration::from_secs(20), "a leader over TLS etcd", || {
        let s1 = c1.json(Some("alice"), None, &["status"]).ok()?;
        let s2 = c2.json(Some("alice"), None, &["status"]).ok()?;
        let lead = |s: &Value| {
            s["replicas"]
                .as_array()?
                .iter()
                .find(|r| r["leader"] == true)?["id"]
                .as_str()
                .map(str::to_owned)
        };
        let (l1, l2) = (lead(&s1)?, lead(&s2)?);
        (l1 == l2 && s1["fleet_generation"].as_u64()? > 0 && s2["fleet_generation"].as_u64()? > 0)
            .then_some(l1)
    })?;
    let follower = if leader == "cp-1" { &c2 } else { &c1 };
    // A drain sent to the follower is forwarded to the leader over mTLS,
    // on behalf of alice.
    follower
        .run(
            Some("alice"),
            None,
            &["drain", "region/r2", "--reason", "dr test"],
        )?
        .ok()?;
    let audit = follower.json(Some("alice"), None, &["audit"])?;
    let actor = audit
        .as_array()
        .and_then(|a| a.iter().find(|r| r["action"] == "drain"))
        .map(|r| r["actor"].clone())
        .context("no drain in the audit log")?;
    ensure!(actor == "operator/alice", "{audit}");
    // An edge subscribed to the follower gets the drained routing and serves.
    let args = tls_args(&tls, "edge-e1");
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let e1 = EdgeProxy::start_with(
        &format!(
            "https://{}",
            if leader == "cp-1" {
                cp2.process.addr
            } else {
                cp1.process.addr
            }
        ),
        "e1",
        SITE1,
        &dir.path().join("e1"),
        &refs,
    )?;
    eventually(
        Duration::from_secs(15),
        "e1 gets config from the follower",
        || e1.config_version().ok().filter(|v| *v > 0),
    )?;
    let served = split(e1.process.addr, 4)?;
    ensure!(served.values().sum::<usize>() == 4, "{served:?}");
    Ok(())
}
