//! A real GoBGP (`gobgpd`) on loopback for the BMP tests: it peers with
//! nobody (BGP port -1), sends BMP to a station, and its global RIB is
//! changed with the `gobgp` CLI (`global rib add|del PREFIX`), which
//! gobgpd reports as Loc-RIB Route Monitoring.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use crate::eventually;

/// A `gobgpd` in the foreground, killed on drop.
#[derive(Debug)]
pub struct Gobgp {
    child: Option<Child>,
    api: u16,
}

impl Drop for Gobgp {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A gobgpd config: AS 65001, router id `router_id`, no BGP listener, and
/// one BMP station with route-monitoring-policy `policy`.
pub fn gobgp_config(router_id: &str, sys_name: &str, station: SocketAddr, policy: &str) -> String {
    format!(
        "[global.config]\n  as = 65001\n  router-id = \"{router_id}\"\n  port = -1\n\n\
         [[bmp-servers]]\n  [bmp-servers.config]\n    address = \"{}\"\n    port = {}\n    \
         route-monitoring-policy = \"{policy}\"\n    sys-name = \"{sys_name}\"\n",
        station.ip(),
        station.port()
    )
}

impl Gobgp {
    /// Starts gobgpd (Loc-RIB monitoring) sending BMP to `station`; waits
    /// until its API answers.
    pub fn start(dir: &Path, sys_name: &str, station: SocketAddr) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let config = dir.join("gobgpd.toml");
        std::fs::write(
            &config,
            gobgp_config("192.0.2.1", sys_name, station, "local-rib"),
        )?;
        let api = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let log = std::fs::File::create(dir.join("gobgpd.log"))?;
        let child = Command::new("gobgpd")
            .arg("-f")
            .arg(&config)
            .args([
                "--api-hosts",
                &format!("127.0.0.1:{api}"),
                "--pprof-disable",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start gobgpd (install gobgpd: scripts/setup-test-deps)")?;
        let g = Self {
            child: Some(child),
            api,
        };
        eventually(Duration::from_secs(10), "gobgpd's API to answer", || {
            g.cli(&["global"]).ok()
        })?;
        Ok(g)
    }

    /// Runs `gobgp -u 127.0.0.1 -p API ARGS`.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("gobgp")
            .args(["-u", "127.0.0.1", "-p", &self.api.to_string()])
            .args(args)
            .output()
            .context("cannot run gobgp")?;
        ensure!(
            out.status.success(),
            "gobgp {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Announces `prefix` from the global RIB.
    pub fn add(&self, prefix: &str) -> Result<()> {
        let family: &[&str] = if prefix.contains(':') {
            &["-a", "ipv6"]
        } else {
            &[]
        };
        let mut args = vec!["global", "rib", "add", prefix];
        args.extend_from_slice(family);
        self.cli(&args).map(drop)
    }

    /// Withdraws `prefix`.
    pub fn del(&self, prefix: &str) -> Result<()> {
        let family: &[&str] = if prefix.contains(':') {
            &["-a", "ipv6"]
        } else {
            &[]
        };
        let mut args = vec!["global", "rib", "del", prefix];
        args.extend_from_slice(family);
        self.cli(&args).map(drop)
    }

    /// Kills gobgpd (SIGKILL: its BMP session drops without a Termination).
    pub fn kill(mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill().context("kill gobgpd")?;
            c.wait().context("wait gobgpd")?;
        }
        Ok(())
    }
}
