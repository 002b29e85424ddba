//! A small harness for end-to-end tests: start the real binaries on
//! loopback with port 0, read their bound address from their log, run
//! `sextantctl`, and wait for conditions with a deadline.
//!
//! The binaries are found next to the test executable's target directory;
//! `scripts/test` builds them first (`cargo build --workspace --bins`).

#![forbid(unsafe_code)]

pub mod bird;
pub mod fleets;
pub mod gobgp;
pub mod origin;
pub mod stats;
pub mod subscriber;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::Value;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// The example fleet shipped in `deploy/examples/`.
pub fn example_fleet() -> PathBuf {
    root().join("deploy/examples/fleet.toml")
}

/// Path of a workspace binary, built in the same profile as this test.
pub fn bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the test executable")?;
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("unexpected test executable path {}", exe.display()))?;
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} not found: build the binaries first (cargo build --workspace --bins; scripts/test does)",
            path.display()
        );
    }
    Ok(path)
}

/// Waits until `check` returns `Some`, polling, or fails after `timeout`.
pub fn eventually<T>(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(t) = check() {
            return Ok(t);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A process whose stderr is collected and scanned for its listening line.
#[derive(Debug)]
pub struct Process {
    child: Child,
    log: Arc<Mutex<String>>,
    pub addr: SocketAddr,
}

impl Process {
    /// Starts `cmd` and waits for a log line `listening for <what> on ADDR`.
    pub fn start(mut cmd: Command, what: &str) -> Result<Self> {
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {cmd:?}"))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| anyhow!("no stderr pipe"))?;
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let needle = format!("listening for {what} on ");
        let sink = log.clone();
        let pattern = needle.clone();
        std::thread::spawn(move || {
            let needle = pattern;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(i) = line.find(&needle) {
                    let rest = &line[i + needle.len()..];
                    let addr = rest.split_whitespace().next().unwrap_or_default();
                    let _ = tx.send(addr.to_owned());
                }
                if let Ok(mut l) = sink.lock() {
                    l.push_str(&line);
                    l.push('\n');
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let log = log.lock().map(|l| l.clone()).unwrap_or_default();
                bail!("process did not log `{needle}ADDR` within 30 s; its log:\n{log}");
            }
        };
        let addr = addr
            .parse()
            .with_context(|| format!("bad listening address {addr:?}"))?;
        Ok(Self { child, log, addr })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the process logged so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Kills the process (SIGKILL: no chance to clean up) and waits for it.
    pub fn kill(mut self) -> Result<()> {
        self.child.kill().context("kill")?;
        self.child.wait().context("wait")?;
        Ok(())
    }

    /// Sends the process signal `name` (`TERM`, `USR1`...).
    pub fn signal(&self, name: &str) -> Result<()> {
        let pid = self.child.id().to_string();
        let status = Command::new("kill")
            .args([format!("-{name}"), pid])
            .status()?;
        ensure!(status.success(), "kill -{name} failed: {status}");
        Ok(())
    }

    /// Asks the process to stop (SIGTERM) and waits for it.
    pub fn stop(mut self) -> Result<std::process::ExitStatus> {
        self.signal("TERM")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                self.child.kill()?;
                bail!("process did not stop within 10 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `sextant-cp` on loopback with its own data directory.
#[derive(Debug)]
pub struct ControlPlane {
    pub process: Process,
}

impl ControlPlane {
    /// Starts `sextant-cp --listen 127.0.0.1:0 --data-dir DIR [--fleet FILE]`.
    pub fn start(data_dir: &Path, fleet: Option<&Path>) -> Result<Self> {
        Self::start_with(data_dir, fleet, &[])
    }

    /// Like [`ControlPlane::start`], with extra arguments.
    pub fn start_with(data_dir: &Path, fleet: Option<&Path>, extra: &[&str]) -> Result<Self> {
        let mut cmd = Command::new(bin("sextant-cp")?);
        if !extra.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        // Plaintext unless the test sets up TLS.
        if !extra.contains(&"--tls-cert") {
            cmd.arg("--insecure");
        }
        cmd.arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .env("SEXTANT_LOG", "info")
            // Most tests drain whole regions in one step; the blast-radius
            // brake has tests of its own (they pass --max-move-share).
            .env("SEXTANT_MAX_MOVE_SHARE", "1");
        if let Some(f) = fleet {
            cmd.arg("--fleet").arg(f);
        }
        Ok(Self {
            process: Process::start(cmd, "grpc")?,
        })
    }

    /// The address a `listening for <what> on ADDR` line of its log names.
    pub fn logged_addr(&self, what: &str) -> Result<SocketAddr> {
        logged_addr(&self.process.log(), what)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.process.addr)
    }

    /// A `sextantctl` bound to this control plane.
    pub fn ctl(&self) -> Ctl {
        Ctl { url: self.url() }
    }
}

/// A `sextant-edge` on loopback.
#[derive(Debug)]
pub struct EdgeProxy {
    pub process: Process,
    pub admin: SocketAddr,
}

impl EdgeProxy {
    /// Starts `sextant-edge` with ports 0, only loopback upstreams allowed.
    pub fn start(control_plane: &str, node_id: &str, site: &str, data_dir: &Path) -> Result<Self> {
        Self::start_with(control_plane, node_id, site, data_dir, &[])
    }

    /// Like [`EdgeProxy::start`], with extra arguments.
    pub fn start_with(
        control_plane: &str,
        node_id: &str,
        site: &str,
        data_dir: &Path,
        extra: &[&str],
    ) -> Result<Self> {
        let mut cmd = Command::new(bin("sextant-edge")?);
        cmd.args([
            "--control-plane",
            control_plane,
            "--node-id",
            node_id,
            "--site",
            site,
        ])
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args([
            "--allow-upstream",
            "127.0.0.0/8",
            "--report-interval",
            "0.5",
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra)
        .env("SEXTANT_LOG", "info,sextant_edge=debug");
        let process = Process::start(cmd, "http")?;
        let admin = logged_addr(&process.log(), "admin")?;
        Ok(Self { process, admin })
    }

    /// The config version the edge serves (from its metrics), 0 for none.
    pub fn config_version(&self) -> Result<u64> {
        self.metric("sextant_edge_config_version ")?
            .map(|v| v as u64)
            .ok_or_else(|| anyhow!("no config version in the edge's metrics"))
    }

    /// One sample of a metric (the line's value), if present.
    pub fn metric(&self, line_prefix: &str) -> Result<Option<f64>> {
        admin_metric(self.admin, line_prefix)
    }
}

/// The metrics text an admin port serves.
pub fn admin_metrics(admin: SocketAddr) -> Result<String> {
    let (code, body) = http_get(admin, "/metrics")?;
    ensure!(code == 200, "metrics: status {code}");
    Ok(body)
}

/// One sample of a metric on an admin port (the line's value), if present.
pub fn admin_metric(admin: SocketAddr, line_prefix: &str) -> Result<Option<f64>> {
    Ok(admin_metrics(admin)?.lines().find_map(|l| {
        l.strip_prefix(line_prefix)
            .and_then(|v| v.trim().parse().ok())
    }))
}

/// The address of a `listening for <what> on ADDR` line in a log.
pub fn logged_addr(log: &str, what: &str) -> Result<SocketAddr> {
    let needle = format!("listening for {what} on ");
    let line = log
        .lines()
        .find_map(|l| l.find(&needle).map(|i| &l[i + needle.len()..]))
        .ok_or_else(|| anyhow!("no `{needle}` line in the log:\n{log}"))?;
    let addr = line.split_whitespace().next().unwrap_or_default();
    addr.parse()
        .with_context(|| format!("bad address {addr:?}"))
}

/// Sends `n` GETs through `addr` (a new connection each) and counts the
/// answers by response body (trimmed).
pub fn split(addr: SocketAddr, n: usize) -> Result<std::collections::BTreeMap<String, usize>> {
    let mut out = std::collections::BTreeMap::new();
    for _ in 0..n {
        let (code, body) = http_get(addr, "/")?;
        ensure!(code == 200, "status {code}: {body}");
        *out.entry(body.trim().to_owned()).or_insert(0) += 1;
    }
    Ok(out)
}

/// A plain HTTP/1.1 GET on loopback; returns (status code, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no HTTP header end in {response:?}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("no status in {head:?}"))?;
    Ok((code, body.to_owned()))
}

/// The result of one `sextantctl` run.
#[derive(Debug)]
pub struct CtlOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl CtlOutput {
    /// Parses stdout as JSON.
    pub fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.stdout)
            .with_context(|| format!("stdout is not JSON: {}", self.stdout))
    }

    /// Fails unless the command succeeded.
    pub fn ok(self) -> Result<Self> {
        if self.success {
            Ok(self)
        } else {
            bail!("sextantctl failed: {}", self.stderr)
        }
    }
}

/// Runs `sextantctl` against one server.
#[derive(Debug, Clone)]
pub struct Ctl {
    pub url: String,
}

impl Ctl {
    pub fn run<I, S>(&self, args: I) -> Result<CtlOutput>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let out = Command::new(bin("sextantctl")?)
            .arg("--server")
            .arg(&self.url)
            .args(args)
            .env("SEXTANT_AS", "e2e-test")
            .output()
            .context("cannot run sextantctl")?;
        Ok(CtlOutput {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Runs a read command with `-o json` and parses its output.
    pub fn json<I, S>(&self, args: I) -> Result<Value>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut all: Vec<std::ffi::OsString> =
            args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        all.push("-o".into());
        all.push("json".into());
        self.run(all)?.ok()?.json()
    }
}

/// A `sextant-dns` on loopback (UDP and TCP on one port, admin port).
#[derive(Debug)]
pub struct DnsServer {
    pub process: Process,
    pub admin: SocketAddr,
}

impl DnsServer {
    /// Starts `sextant-dns` with ports 0 and two UDP threads.
    pub fn start(control_plane: &str, node_id: &str, data_dir: &Path) -> Result<Self> {
        Self::start_with(control_plane, node_id, data_dir, &[])
    }

    /// Like [`DnsServer::start`], with extra arguments.
    pub fn start_with(
        control_plane: &str,
        node_id: &str,
        data_dir: &Path,
        extra: &[&str],
    ) -> Result<Self> {
        let mut cmd = Command::new(bin("sextant-dns")?);
        cmd.args(["--control-plane", control_plane, "--node-id", node_id])
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(["--threads", "2"])
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .env("SEXTANT_LOG", "info,hickory_server=warn");
        let process = Process::start(cmd, "dns")?;
        let admin = logged_addr(&process.log(), "admin")?;
        Ok(Self { process, admin })
    }

    /// The DNS address (UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        self.process.addr
    }

    /// Its metrics text.
    pub fn metrics(&self) -> Result<String> {
        admin_metrics(self.admin)
    }

    /// One sample of a metric (the line's value), if present.
    pub fn metric(&self, line_prefix: &str) -> Result<Option<f64>> {
        admin_metric(self.admin, line_prefix)
    }

    /// The config version it serves, 0 for none.
    pub fn config_version(&self) -> Result<u64> {
        Ok(self
            .metric("sextant_dns_config_version ")?
            .map_or(0, |v| v as u64))
    }

    /// Runs `dig @127.0.0.1 -p PORT ARGS` (2 s timeout, one try).
    pub fn dig(&self, args: &[&str]) -> Result<String> {
        dig(self.addr(), args)
    }

    /// The A answers for `www.example.com` to a client in `subnet` (ECS),
    /// one per line of `dig +short`; `extra` goes to dig.
    pub fn answers(&self, subnet: &str, extra: &[&str]) -> Result<Vec<String>> {
        let ecs = format!("+subnet={subnet}");
        let mut args = vec!["www.example.com", "A", "+short", ecs.as_str()];
        args.extend_from_slice(extra);
        Ok(self.dig(&args)?.lines().map(str::to_owned).collect())
    }
}

/// Runs Debian's `dig` against a loopback server and returns its stdout.
pub fn dig(server: SocketAddr, args: &[&str]) -> Result<String> {
    ensure!(
        server.ip().is_loopback(),
        "dig only against loopback, not {server}"
    );
    let out = Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string(), "+time=2", "+tries=1"])
        .args(args)
        .output()
        .context("cannot run dig (install bind9-dnsutils: scripts/setup-test-deps)")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "dig {args:?} failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

/// A `sextant-probe` on loopback.
#[derive(Debug)]
pub struct Prober {
    pub process: Process,
    /// Its admin address (/healthz, /metrics).
    pub admin: SocketAddr,
}

impl Prober {
    /// Starts `sextant-probe --control-plane URL --vantage-id ID` with
    /// `--interval 1s --timeout 500ms --refresh 1s --admin 127.0.0.1:0`
    /// (each left out when `extra` gives the flag, as a separate argument)
    /// and `extra`; returns once it listens for admin.
    pub fn start(control_plane: &str, vantage_id: &str, extra: &[&str]) -> Result<Self> {
        let mut cmd = Command::new(bin("sextant-probe")?);
        cmd.args(["--control-plane", control_plane, "--vantage-id", vantage_id]);
        for (flag, value) in [
            ("--interval", "1s"),
            ("--timeout", "500ms"),
            ("--refresh", "1s"),
            ("--admin", "127.0.0.1:0"),
        ] {
            if !extra.contains(&flag) {
                cmd.args([flag, value]);
            }
        }
        cmd.args(extra).env("SEXTANT_LOG", "info");
        let process = Process::start(cmd, "admin")?;
        let admin = process.addr;
        Ok(Self { process, admin })
    }

    /// Its metrics text.
    pub fn metrics(&self) -> Result<String> {
        admin_metrics(self.admin)
    }

    /// One sample of a metric (the line's value), if present.
    pub fn metric(&self, line_prefix: &str) -> Result<Option<f64>> {
        admin_metric(self.admin, line_prefix)
    }
}
