//! A throwaway etcd for tests: one `etcd` process on free loopback ports with
//! a temporary data directory, for the etcd conformance tests and any other
//! test that needs a real etcd (several control-plane replicas, etcd
//! outages). Not for production.
//!
//! [`EtcdServer::start`] finds the `etcd` binary (`$SEXTANT_ETCD_BIN`, else
//! `etcd` on `PATH`; `scripts/setup-test-deps` installs Debian's
//! `etcd-server`), starts it on `127.0.0.1` only and returns once it reports
//! itself healthy. Dropping the server kills the process and removes its
//! directory. A server kept in a `static` is never dropped, and a test
//! process may be killed: so each server also has a watchdog (a small `sh`
//! process reading a pipe from the test process) that kills etcd and removes
//! its directory when the test process goes away, however it ends.
//!
//! The server runs with a 50 ms heartbeat and a 500 ms election timeout, so
//! etcd's minimum lease TTL is 1 s (it is 2 s with etcd's defaults), and
//! without fsync when the binary supports `--unsafe-no-fsync` (the data is
//! thrown away).

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long etcd may take to become healthy.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How many times a start is retried with new ports (another process may
/// take a port between its choice and etcd's bind).
const START_ATTEMPTS: usize = 4;

/// Kills etcd when the test process goes away (its end of the pipe on stdin
/// closes without "done"), unless the PID now belongs to another process;
/// then removes the directory. `$1`: etcd's PID, `$2`: the directory.
const WATCHDOG: &str = r#"
pid=$1; dir=$2
if read -r line && [ "$line" = done ]; then exit 0; fi
if [ -r "/proc/$pid/cmdline" ]; then
  if tr '\000' '\n' < "/proc/$pid/cmdline" | grep -qxF -- "--data-dir=$dir/data"; then
    kill -9 "$pid" 2>/dev/null
  fi
else
  kill -9 "$pid" 2>/dev/null
fi
# Wait for it to exit (a zombie has exited: its parent, gone, cannot reap it).
i=0
while kill -0 "$pid" 2>/dev/null && [ "$i" -lt 50 ]; do
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)
  [ "$state" = Z ] && break
  sleep 0.1; i=$((i + 1))
done
rm -rf "$dir"
"#;

/// A running throwaway etcd. See the module docs.
#[derive(Debug)]
pub struct EtcdServer {
    binary: PathBuf,
    /// Holds `data/` and `etcd.log`; removed on drop.
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    /// With TLS: the plain-HTTP port of `/health` and `/metrics`.
    metrics_port: u16,
    tls: Option<EtcdServerTls>,
    etcd: Option<Child>,
    watchdog: Option<Watchdog>,
}

#[derive(Debug)]
struct Watchdog {
    child: Child,
    stdin: ChildStdin,
}

impl Watchdog {
    /// Lets the watchdog go without it doing anything.
    fn dismiss(mut self) {
        let _ = self.stdin.write_all(b"done\n");
        drop(self.stdin);
        let _ = self.child.wait();
    }
}

/// TLS for a test etcd's client port: its certificate and key, and the CA
/// clients' certificates must chain to (client certificates required).
#[derive(Debug, Clone)]
pub struct EtcdServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

impl EtcdServer {
    /// Starts a new etcd with an empty data directory and waits until it is
    /// healthy. Fails with a message saying what to do when etcd is not
    /// installed.
    pub fn start() -> Result<EtcdServer, String> {
        Self::start_with(None)
    }

    /// Like [`EtcdServer::start`], serving clients over mutual TLS.
    pub fn start_tls(tls: EtcdServerTls) -> Result<EtcdServer, String> {
        Self::start_with(Some(tls))
    }

    fn start_with(tls: Option<EtcdServerTls>) -> Result<EtcdServer, String> {
        let binary = find_etcd()?;
        let dir = new_temp_dir()?;
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            let (client_port, peer_port) = free_ports()?;
            let (metrics_port, _) = free_ports()?;
            let mut server = EtcdServer {
                binary: binary.clone(),
                dir: dir.clone(),
                client_port,
                peer_port,
                metrics_port,
                tls: tls.clone(),
                etcd: None,
                watchdog: None,
            };
            match server.launch() {
                Ok(()) => return Ok(server),
                Err(e) => {
                    last_error = e;
                    // Dropping it removes the directory: make a new one.
                    drop(server);
                    std::fs::create_dir_all(&dir)
                        .map_err(|e| format!("creating {}: {e}", dir.display()))?;
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        Err(last_error)
    }

    /// The client URL, `http://127.0.0.1:<port>` (`https://` with TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// The etcd process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.etcd.as_ref().map(Child::id)
    }

    /// Kills etcd at once (SIGKILL), keeping its data: a crash or an outage.
    /// [`EtcdServer::restart`] brings it back on the same port.
    pub fn kill(&mut self) {
        if let Some(mut etcd) = self.etcd.take() {
            let _ = etcd.kill();
            let _ = etcd.wait();
        }
        if let Some(watchdog) = self.watchdog.take() {
            watchdog.dismiss();
        }
    }

    /// Freezes etcd (SIGSTOP): it keeps its connections open but answers
    /// nothing, like a hung or partitioned server. [`EtcdServer::thaw`]
    /// resumes it.
    pub fn freeze(&self) -> Result<(), String> {
        self.signal("STOP")?;
        // The stop lands asynchronously: wait until every thread of etcd
        // is stopped, so that no request sent after this returns is
        // answered.
        let pid = self.pid().ok_or("etcd does not run")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !all_stopped(pid) {
            if Instant::now() > deadline {
                return Err(format!(
                    "etcd (pid {pid}) did not stop within 10 s of SIGSTOP"
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Resumes a frozen etcd (SIGCONT).
    pub fn thaw(&self) -> Result<(), String> {
        self.signal("CONT")
    }

    fn signal(&self, signal: &str) -> Result<(), String> {
        let pid = self.pid().ok_or("etcd does not run")?;
        let status = Command::new("sh")
            .args(["-c", "kill -s \"$1\" \"$2\"", "sh", signal])
            .arg(pid.to_string())
            .status()
            .map_err(|e| format!("running sh to signal etcd: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("kill -s {signal} {pid} failed ({status})"))
        }
    }

    /// Starts etcd again on the same ports with the same data (after
    /// [`EtcdServer::kill`]; a running etcd is killed first).
    pub fn restart(&mut self) -> Result<(), String> {
        self.kill();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.launch() {
                Ok(()) => return Ok(()),
                // The old process's ports may take a moment to be free.
                Err(e) if Instant::now() < deadline && e.contains("address already in use") => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The end of etcd's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn launch(&mut self) -> Result<(), String> {
        let data = self.dir.join("data");
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))
            .map_err(|e| format!("creating etcd's log in {}: {e}", self.dir.display()))?;
        let log_err = log
            .try_clone()
            .map_err(|e| format!("duplicating etcd's log handle: {e}"))?;
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut command = Command::new(&self.binary);
        command
            .arg("--name=sextant-test")
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=sextant-test={peer}"))
            .arg("--heartbeat-interval=50")
            .arg("--election-timeout=500")
            .arg("--logger=zap")
            .arg("--log-level=warn");
        if let Some(tls) = &self.tls {
            command
                .arg(format!("--cert-file={}", tls.cert.display()))
                .arg(format!("--key-file={}", tls.key.display()))
                .arg(format!("--trusted-ca-file={}", tls.client_ca.display()))
                .arg("--client-cert-auth")
                .arg(format!(
                    "--listen-metrics-urls=http://127.0.0.1:{}",
                    self.metrics_port
                ));
        }
        if supports_no_fsync(&self.binary) {
            command.arg("--unsafe-no-fsync");
        }
        // etcd reads ETCD_* variables as flags, and refuses to start when one
        // shadows a flag given here.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("ETCD_") {
                command.env_remove(name);
            }
        }
        let etcd = command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.binary.display()))?;
        let pid = etcd.id();
        self.etcd = Some(etcd);
        let mut watchdog = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg("sextant-etcd-watchdog")
            .arg(pid.to_string())
            .arg(&self.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting etcd's watchdog (sh): {e}"))?;
        let stdin = watchdog
            .stdin
            .take()
            .ok_or("the watchdog has no stdin pipe")?;
        self.watchdog = Some(Watchdog {
            child: watchdog,
            stdin,
        });
        self.wait_healthy().inspect_err(|_| self.kill())
    }

    fn wait_healthy(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(etcd) = self.etcd.as_mut() {
                if let Ok(Some(status)) = etcd.try_wait() {
                    return Err(format!(
                        "etcd exited during start-up ({status}); its log ({}):\n{}",
                        self.dir.join("etcd.log").display(),
                        self.log_tail()
                    ));
                }
            }
            let health_port = if self.tls.is_some() {
                self.metrics_port
            } else {
                self.client_port
            };
            if healthy(health_port) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "etcd at {} was not healthy within {START_TIMEOUT:?}; its log:\n{}",
                    self.endpoint(),
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Where the etcd binary is, or what to do to get one.
fn find_etcd() -> Result<PathBuf, String> {
    if let Some(bin) = std::env::var_os("SEXTANT_ETCD_BIN") {
        let bin = PathBuf::from(bin);
        return if bin.is_file() {
            Ok(bin)
        } else {
            Err(format!(
                "SEXTANT_ETCD_BIN is {}, which is not a file",
                bin.display()
            ))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("etcd"))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            "etcd is not installed (no `etcd` on PATH): run scripts/setup-test-deps, which \
             installs Debian's etcd-server, or set SEXTANT_ETCD_BIN to an etcd binary"
                .to_owned()
        })
}

/// Whether this etcd has `--unsafe-no-fsync` (3.4.10 and later).
fn supports_no_fsync(binary: &Path) -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        Command::new(binary)
            .arg("--help")
            .stdin(Stdio::null())
            .output()
            .map(|out| {
                String::from_utf8_lossy(&out.stdout).contains("unsafe-no-fsync")
                    || String::from_utf8_lossy(&out.stderr).contains("unsafe-no-fsync")
            })
            .unwrap_or(false)
    })
}

fn new_temp_dir() -> Result<PathBuf, String> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "sextant-etcd-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    Ok(dir)
}

/// Two loopback ports that were free a moment ago.
fn free_ports() -> Result<(u16, u16), String> {
    let bind = || {
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(|e| format!("binding a free loopback port: {e}"))
    };
    let (a, b) = (bind()?, bind()?);
    let port = |l: &TcpListener| {
        l.local_addr()
            .map(|a| a.port())
            .map_err(|e| format!("reading a bound port: {e}"))
    };
    Ok((port(&a)?, port(&b)?))
}

/// Whether etcd's `/health` says it is healthy (it has a leader and serves
/// reads).
fn healthy(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    let request = "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.contains(r#""health":"true""#)
}

/// Whether every thread of process `pid` is stopped (state `T` in
/// `/proc/PID/task/*/stat`). False when that cannot be read.
fn all_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    let mut any = false;
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            return false;
        };
        // The state follows the command name, which is in parentheses.
        let state = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next());
        if !matches!(state, Some("T" | "t")) {
            return false;
        }
        any = true;
    }
    any
}
