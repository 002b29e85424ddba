//! `sextant-probe`, the active health prober: from one vantage point it
//! probes the health-check target of every edge of the fleet each interval
//! and streams the results to the control plane
//! (`SignalsService.ReportProbes`). Third-party CDN edges run no agent, so
//! these probes are their only health signal.
//!
//! Three tasks share the work:
//! - the refresher lists the fleet's edges (`FleetService.ListEdges`, every
//!   page) every `refresh` and publishes the parsed [`Targets`] on a
//!   `watch`; when the list cannot be fetched the last one stays;
//! - the prober runs one [`round`] per `interval` (every target at once,
//!   bounded, each within `timeout`) and hands one batch per round to the
//!   sender;
//! - the sender keeps one `ReportProbes` stream open, trying the
//!   control-plane URLs in turn when it breaks, and drops the rounds it
//!   cannot send (a stale probe result is worth nothing).
//!
//! A health check is `http://HOST[:PORT][/PATH]` (GET; ok on 2xx and 3xx)
//! or `HOST:PORT` (ok when a TCP connection opens). A target that does not
//! parse, or whose address is outside the allowed ranges, is reported as a
//! failed probe saying why.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hyper::StatusCode;
use ipnet::IpNet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sextant_proto::v1 as pb;
use sextant_proto::v1::fleet_service_client::FleetServiceClient;
use sextant_proto::v1::signals_service_client::SignalsServiceClient;
use sextant_tls::ClientTls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::MissedTickBehavior;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::admin;
use crate::edge::{self, EdgeError};
use crate::subscriber::{control_plane_urls, now_ms};

/// Targets probed at once, at most.
pub const DEFAULT_CONCURRENCY: usize = 256;
/// The longest wait between two attempts to open the report stream.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// One control plane's whole `ListEdges` walk must finish within this.
const LIST_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes read while looking for the HTTP status line.
const MAX_STATUS_LINE: usize = 8 * 1024;

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

/// How to run a prober.
#[derive(Debug, Clone)]
pub struct ProbeConfig {
    /// Control-plane gRPC URL, or several separated by commas (replicas):
    /// on failure the next one is tried.
    pub control_plane: String,
    /// This vantage point's identity, sent with every batch.
    pub vantage_id: String,
    /// Time between rounds.
    pub interval: Duration,
    /// Time one probe may take, connection included; at most `interval`.
    pub timeout: Duration,
    /// Time between two listings of the fleet's edges.
    pub refresh: Duration,
    /// Probe only addresses inside these ranges (empty: any).
    pub allow_targets: Vec<IpNet>,
    /// Admin address for /healthz and /metrics.
    pub admin: Option<SocketAddr>,
    /// Targets probed at once, at most.
    pub concurrency: usize,
    /// TLS to the control plane (`None`: plaintext).
    pub tls: Option<ClientTls>,
}

/// A prober configuration that cannot run, with every problem found.
#[derive(Debug, thiserror::Error)]
#[error("invalid prober configuration: {}", .problems.join("; "))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl ProbeConfig {
    /// Checks the configuration, reporting every problem at once.
    pub fn validate(self) -> Result<Self, ConfigError> {
        let mut problems = Vec::new();
        if self.vantage_id.trim().is_empty() {
            problems.push("--vantage-id must not be empty".to_owned());
        }
        for url in control_plane_urls(&self.control_plane) {
            if let Err(e) = endpoint(&url, self.tls.as_ref()) {
                problems.push(format!("--control-plane {url:?}: {e}"));
            }
        }
        for (flag, d) in [
            ("--interval", self.interval),
            ("--timeout", self.timeout),
            ("--refresh", self.refresh),
        ] {
            if d.is_zero() {
                problems.push(format!("{flag} must be more than 0"));
            }
        }
        if self.timeout > self.interval {
            problems.push(format!(
                "--timeout ({}) must not be longer than --interval ({}): a slow target would delay the next round",
                format_duration(self.timeout),
                format_duration(self.interval)
            ));
        }
        if self.concurrency == 0 {
            problems.push("concurrency must be at least 1".to_owned());
        }
        if problems.is_empty() {
            Ok(self)
        } else {
            Err(ConfigError { problems })
        }
    }
}

/// Parses a duration such as `500ms`, `1s`, `2m` or `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{s:?} has no unit; use ms, s, m or h (e.g. 500ms, 1s)"))?;
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} does not start with a whole number"))?;
    if unit.starts_with(['.', ',']) {
        return Err(format!("{s:?}: use a whole number (e.g. 1500ms, not 1.5s)"));
    }
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1_000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; use ms, s, m or h")),
    };
    ms.map(Duration::from_millis)
        .ok_or_else(|| format!("{s:?} is too long"))
}

/// Formats a duration the way [`parse_duration`] reads it (`800ms`, `2s`).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms >= 1_000 && ms.is_multiple_of(1_000) {
        format!("{}s", ms / 1_000)
    } else {
        format!("{ms}ms")
    }
}

// ---------------------------------------------------------------------------
// Targets
// ---------------------------------------------------------------------------

/// The host of a target: an IP address, or a DNS name resolved at each
/// probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Ip(IpAddr),
    Name(String),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(ip) => write!(f, "{ip}"),
            Host::Name(n) => f.write_str(n),
        }
    }
}

/// What one health check probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `GET http://host:port/path`; ok on a 2xx or 3xx status.
    Http { host: Host, port: u16, path: String },
    /// A TCP connection; ok when it opens.
    Tcp { host: Host, port: u16 },
}

/// Why a health check cannot be probed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("bad health_check {input:?}: {reason}")]
    Bad {
        input: String,
        #[source]
        reason: BadTarget,
    },
    #[error("health_check {input:?}: {ip} is outside the allowed targets ({allowed})")]
    NotAllowed {
        input: String,
        ip: IpAddr,
        allowed: String,
    },
}

/// What is wrong with a health-check string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadTarget {
    #[error("it is empty; expected http://HOST[:PORT][/PATH] or HOST:PORT")]
    Empty,
    #[error("unsupported scheme {0:?}; expected http://HOST[:PORT][/PATH] or HOST:PORT")]
    Scheme(String),
    #[error("https is not supported by the prober (no TLS); use http:// or HOST:PORT")]
    Https,
    #[error("no host")]
    NoHost,
    #[error("no port; expected HOST:PORT")]
    NoPort,
    #[error("bad port {0:?} (1 to 65535)")]
    BadPort(String),
    #[error("bad host {0:?}: not an IP address or a DNS name")]
    BadHost(String),
    #[error("an IPv6 address needs brackets, e.g. [::1]:80")]
    Ipv6Brackets,
    #[error("user info (user@host) is not supported")]
    UserInfo,
    #[error("the path contains {0:?}; percent-encode it")]
    BadPath(char),
}

impl FromStr for Target {
    type Err = TargetError;

    fn from_str(input: &str) -> Result<Self, TargetError> {
        parse_target(input.trim()).map_err(|reason| TargetError::Bad {
            input: input.to_owned(),
            reason,
        })
    }
}

fn parse_target(s: &str) -> Result<Target, BadTarget> {
    if s.is_empty() {
        return Err(BadTarget::Empty);
    }
    if let Some((scheme, rest)) = s.split_once("://") {
        return match scheme.to_ascii_lowercase().as_str() {
            "http" => parse_http(rest),
            "https" => Err(BadTarget::Https),
            _ => Err(BadTarget::Scheme(scheme.to_owned())),
        };
    }
    if s.contains('/') {
        return Err(BadTarget::BadHost(s.to_owned()));
    }
    let (host, port) = host_port(s, None)?;
    Ok(Target::Tcp { host, port })
}

fn parse_http(rest: &str) -> Result<Target, BadTarget> {
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let tail = tail.split('#').next().unwrap_or_default();
    let path = match tail.chars().next() {
        None => "/".to_owned(),
        Some('?') => format!("/{tail}"),
        Some(_) => tail.to_owned(),
    };
    if let Some(c) = path.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(BadTarget::BadPath(c));
    }
    if authority.contains('@') {
        return Err(BadTarget::UserInfo);
    }
    let (host, port) = host_port(authority, Some(80))?;
    Ok(Target::Http { host, port, path })
}

/// Splits `host:port` (`[v6]:port`); the port may be left out when there is
/// a default.
fn host_port(s: &str, default_port: Option<u16>) -> Result<(Host, u16), BadTarget> {
    if s.is_empty() {
        return Err(BadTarget::NoHost);
    }
    let port_or_default = |p: Option<&str>| match p {
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(BadTarget::BadPort(p.to_owned())),
        },
        None => default_port.ok_or(BadTarget::NoPort),
    };
    if let Some(rest) = s.strip_prefix('[') {
        let (ip, after) = rest
            .split_once(']')
            .ok_or_else(|| BadTarget::BadHost(s.to_owned()))?;
        let ip: Ipv6Addr = ip.parse().map_err(|_| BadTarget::BadHost(s.to_owned()))?;
        let port = match after {
            "" => port_or_default(None)?,
            _ => port_or_default(Some(
                after
                    .strip_prefix(':')
                    .ok_or_else(|| BadTarget::BadHost(s.to_owned()))?,
            ))?,
        };
        return Ok((Host::Ip(IpAddr::V6(ip)), port));
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((h, _)) if h.contains(':') => return Err(BadTarget::Ipv6Brackets),
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    if host.is_empty() {
        return Err(BadTarget::NoHost);
    }
    let port = port_or_default(port)?;
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Ok((Host::Ip(IpAddr::V4(ip)), port));
    }
    if !is_dns_name(host) {
        return Err(BadTarget::BadHost(host.to_owned()));
    }
    Ok((Host::Name(host.to_ascii_lowercase()), port))
}

/// A DNS name of letters, digits, `-` and `_`, whose last label is not a
/// number (`10.1.2` is a malformed address, not a name).
fn is_dns_name(name: &str) -> bool {
    let n = name.strip_suffix('.').unwrap_or(name);
    let labels_ok = !n.is_empty()
        && n.len() <= 253
        && n.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    labels_ok
        && !n
            .rsplit('.')
            .next()
            .is_some_and(|l| l.chars().all(|c| c.is_ascii_digit()))
}

impl Target {
    fn host(&self) -> &Host {
        match self {
            Target::Http { host, .. } | Target::Tcp { host, .. } => host,
        }
    }

    fn port(&self) -> u16 {
        match self {
            Target::Http { port, .. } | Target::Tcp { port, .. } => *port,
        }
    }

    /// The `Host` header: the host, and the port unless it is 80.
    fn host_header(&self) -> String {
        match self.port() {
            80 => self.host().to_string(),
            p => format!("{}:{p}", self.host()),
        }
    }
}

/// The canonical form of an address for range checks (an IPv4-mapped IPv6
/// address is the IPv4 address it reaches).
fn is_allowed(ip: IpAddr, allowed: &[IpNet]) -> bool {
    let ip = ip.to_canonical();
    allowed.is_empty() || allowed.iter().any(|n| n.contains(&ip))
}

fn list_nets(allowed: &[IpNet]) -> String {
    allowed
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Parses a health check and, when its host is an address, checks it
/// against the allowed ranges (names are checked once resolved).
pub fn parse_allowed(health_check: &str, allowed: &[IpNet]) -> Result<Target, TargetError> {
    let t: Target = health_check.parse()?;
    if let Host::Ip(ip) = t.host() {
        if !is_allowed(*ip, allowed) {
            return Err(TargetError::NotAllowed {
                input: health_check.to_owned(),
                ip: *ip,
                allowed: list_nets(allowed),
            });
        }
    }
    Ok(t)
}

/// What one round probes: edge id → target, or why it cannot be probed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Targets {
    by_edge: BTreeMap<String, Result<Target, TargetError>>,
}

impl Targets {
    /// Parses `(edge id, health_check)` pairs.
    pub fn from_checks<I, E, H>(checks: I, allowed: &[IpNet]) -> Self
    where
        I: IntoIterator<Item = (E, H)>,
        E: Into<String>,
        H: AsRef<str>,
    {
        Self {
            by_edge: checks
                .into_iter()
                .map(|(edge, check)| (edge.into(), parse_allowed(check.as_ref(), allowed)))
                .collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.by_edge.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_edge.is_empty()
    }

    pub fn get(&self, edge: &str) -> Option<&Result<Target, TargetError>> {
        self.by_edge.get(edge)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Result<Target, TargetError>)> {
        self.by_edge.iter()
    }
}

// ---------------------------------------------------------------------------
// Probing
// ---------------------------------------------------------------------------

/// Why a probe failed; the text is what the control plane is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeFailure {
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("resolve {host}: {reason}")]
    Resolve { host: String, reason: String },
    #[error("resolve {host}: no address inside the allowed targets ({allowed}), got {got}")]
    ResolvedNotAllowed {
        host: String,
        allowed: String,
        got: String,
    },
    #[error("connect: {0}")]
    Connect(String),
    #[error("send request: {0}")]
    Send(String),
    #[error("read response: {0}")]
    Read(String),
    #[error("bad response: {0}")]
    BadResponse(String),
    #[error("timeout after {}", format_duration(*.0))]
    Timeout(Duration),
    #[error("status {0}")]
    Status(u16),
}

/// An I/O error as a short lowercase phrase (`connection refused`).
fn io_reason(e: &std::io::Error) -> String {
    let s = e.to_string();
    let s = match s.find(" (os error") {
        Some(i) => &s[..i],
        None => s.as_str(),
    };
    let mut c = s.chars();
    match c.next() {
        Some(first) => first.to_lowercase().chain(c).collect(),
        None => format!("{:?}", e.kind()),
    }
}

/// The result of probing one edge.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub edge: String,
    pub at_unix_ms: i64,
    /// Time the probe took (to the status line, the connection, or the
    /// failure).
    pub latency: Duration,
    pub result: Result<(), ProbeFailure>,
}

impl From<Outcome> for pb::ProbeResult {
    fn from(o: Outcome) -> Self {
        pb::ProbeResult {
            edge: o.edge,
            at_unix_ms: o.at_unix_ms,
            ok: o.result.is_ok(),
            latency_ms: o.latency.as_secs_f64() * 1_000.0,
            error: o.result.err().map(|e| e.to_string()).unwrap_or_default(),
        }
    }
}

/// Probes one target within `timeout`.
pub async fn probe(
    target: &Target,
    allowed: &[IpNet],
    timeout: Duration,
) -> Result<(), ProbeFailure> {
    tokio::time::timeout(timeout, probe_now(target, allowed))
        .await
        .unwrap_or(Err(ProbeFailure::Timeout(timeout)))
}

async fn probe_now(target: &Target, allowed: &[IpNet]) -> Result<(), ProbeFailure> {
    let addrs = addresses(target.host(), target.port(), allowed).await?;
    let stream = connect(&addrs).await?;
    match target {
        Target::Tcp { .. } => Ok(()),
        Target::Http { path, .. } => {
            let code = http_status(stream, &target.host_header(), path).await?;
            if (200..400).contains(&code) {
                Ok(())
            } else {
                Err(ProbeFailure::Status(code))
            }
        }
    }
}

/// The allowed addresses of a host.
async fn addresses(
    host: &Host,
    port: u16,
    allowed: &[IpNet],
) -> Result<Vec<SocketAddr>, ProbeFailure> {
    let all: Vec<SocketAddr> = match host {
        Host::Ip(ip) => vec![SocketAddr::new(*ip, port)],
        Host::Name(name) => tokio::net::lookup_host((name.as_str(), port))
            .await
            .map_err(|e| ProbeFailure::Resolve {
                host: name.clone(),
                reason: io_reason(&e),
            })?
            .collect(),
    };
    if all.is_empty() {
        return Err(ProbeFailure::Resolve {
            host: host.to_string(),
            reason: "no addresses".into(),
        });
    }
    let ok: Vec<SocketAddr> = all
        .iter()
        .copied()
        .filter(|a| is_allowed(a.ip(), allowed))
        .collect();
    if ok.is_empty() {
        return Err(ProbeFailure::ResolvedNotAllowed {
            host: host.to_string(),
            allowed: list_nets(allowed),
            got: all
                .iter()
                .map(|a| a.ip().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    Ok(ok)
}

/// Connects to the first address that answers.
async fn connect(addrs: &[SocketAddr]) -> Result<TcpStream, ProbeFailure> {
    let mut last = ProbeFailure::Connect("no address".into());
    for a in addrs {
        match TcpStream::connect(a).await {
            Ok(s) => return Ok(s),
            Err(e) => last = ProbeFailure::Connect(io_reason(&e)),
        }
    }
    Err(last)
}

/// Sends a GET and reads the status code of the response.
async fn http_status(mut stream: TcpStream, host: &str, path: &str) -> Result<u16, ProbeFailure> {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: sextant-probe/{}\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        env!("CARGO_PKG_VERSION")
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| ProbeFailure::Send(io_reason(&e)))?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buf.iter().position(|&b| b == b'\n') {
            return status_code(&buf[..end]);
        }
        if buf.len() > MAX_STATUS_LINE {
            return Err(ProbeFailure::BadResponse(format!(
                "no status line in the first {MAX_STATUS_LINE} bytes"
            )));
        }
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| ProbeFailure::Read(io_reason(&e)))?;
        if n == 0 {
            if buf.is_empty() {
                return Err(ProbeFailure::Read(
                    "connection closed before a response".into(),
                ));
            }
            return status_code(&buf);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The code of an HTTP/1.x status line (`HTTP/1.1 200 OK`).
fn status_code(line: &[u8]) -> Result<u16, ProbeFailure> {
    let line = String::from_utf8_lossy(line);
    let line = line.trim_end();
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts
        .next()
        .filter(|c| c.len() == 3)
        .and_then(|c| c.parse::<u16>().ok())
        .filter(|c| (100..600).contains(c));
    match code {
        Some(c) if version.starts_with("HTTP/1.") => Ok(c),
        _ => {
            let shown: String = line.chars().take(80).collect();
            Err(ProbeFailure::BadResponse(format!(
                "not an HTTP/1 status line: {shown:?}"
            )))
        }
    }
}

/// Probes every target once, at most `concurrency` at a time; the outcomes
/// are sorted by edge.
pub async fn round(
    targets: &Targets,
    allowed: &[IpNet],
    timeout: Duration,
    concurrency: usize,
) -> Vec<Outcome> {
    // Owned items: a closure over borrowed ones is not `Send` enough for a
    // spawned task (higher-ranked lifetimes).
    let work: Vec<(String, Result<Target, TargetError>)> = targets
        .iter()
        .map(|(e, t)| (e.clone(), t.clone()))
        .collect();
    let mut out: Vec<Outcome> = futures::stream::iter(work)
        .map(|(edge, target)| async move {
            let at_unix_ms = now_ms();
            let started = Instant::now();
            let result = match target {
                Ok(t) => probe(&t, allowed, timeout).await,
                Err(e) => Err(ProbeFailure::Target(e)),
            };
            Outcome {
                edge,
                at_unix_ms,
                latency: started.elapsed(),
                result,
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    out.sort_by(|a, b| a.edge.cmp(&b.edge));
    out
}

/// A target whose result changed since the last round.
#[derive(Debug, Clone, PartialEq)]
pub struct Flip {
    pub edge: String,
    /// `None` when it turned ok; the failure when it turned failed.
    pub failure: Option<ProbeFailure>,
}

/// Remembers each target's last result to report only changes.
#[derive(Debug, Default)]
pub struct Flips {
    ok: HashMap<String, bool>,
}

impl Flips {
    /// Records a round; returns the targets whose result changed, and the
    /// ones that fail on their first round. Edges no longer probed are
    /// forgotten.
    pub fn observe(&mut self, outcomes: &[Outcome]) -> Vec<Flip> {
        let mut flips = Vec::new();
        let mut seen = HashMap::with_capacity(outcomes.len());
        for o in outcomes {
            let ok = o.result.is_ok();
            let before = self.ok.get(&o.edge).copied();
            if before != Some(ok) && !(before.is_none() && ok) {
                flips.push(Flip {
                    edge: o.edge.clone(),
                    failure: o.result.clone().err(),
                });
            }
            seen.insert(o.edge.clone(), ok);
        }
        self.ok = seen;
        flips
    }
}

// ---------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------

type Labels = Vec<(String, String)>;

/// The prober's metrics, registered up front.
#[derive(Debug, Default)]
pub struct Metrics {
    rounds: Counter,
    results: Family<Labels, Counter>,
    targets: Gauge,
    batches_dropped: Counter,
}

impl Metrics {
    /// Registers the metrics (give a registry prefixed `sextant_probe`).
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register("rounds", "Probe rounds run", m.rounds.clone());
        registry.register(
            "results",
            "Probe results by outcome (ok or fail)",
            m.results.clone(),
        );
        registry.register("targets", "Edges probed each round", m.targets.clone());
        registry.register(
            "batches_dropped",
            "Rounds not sent because the report stream was down or behind",
            m.batches_dropped.clone(),
        );
        for r in ["ok", "fail"] {
            m.result(r);
        }
        m
    }

    fn result(&self, r: &str) -> Counter {
        self.results
            .get_or_create(&vec![("result".to_owned(), r.to_owned())])
            .clone()
    }

    fn record(&self, outcomes: &[Outcome]) {
        self.rounds.inc();
        let ok = outcomes.iter().filter(|o| o.result.is_ok()).count();
        self.result("ok").inc_by(ok as u64);
        self.result("fail").inc_by((outcomes.len() - ok) as u64);
    }
}

// ---------------------------------------------------------------------------
// Running
// ---------------------------------------------------------------------------

/// Why the prober could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Listen(#[from] EdgeError),
}

fn endpoint(url: &str, tls: Option<&ClientTls>) -> Result<Endpoint, String> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err("expected an http:// or https:// URL".into());
    }
    sextant_tls::control_plane_endpoint(url, tls)
        .map(|e| {
            e.connect_timeout(Duration::from_secs(3))
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
        })
        .map_err(|e| e.to_string())
}

/// One lazily connected channel per control-plane replica.
#[derive(Debug, Clone)]
struct Replicas {
    urls: Vec<String>,
    channels: Vec<Channel>,
}

/// A gRPC error in one line: code, message and root cause
/// (`Unavailable: tcp connect error (connection refused)`).
fn status_text(status: &tonic::Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    let mut root = None;
    while let Some(c) = cause {
        root = Some(c);
        cause = c.source();
    }
    if let Some(root) = root {
        let reason = match root.downcast_ref::<std::io::Error>() {
            Some(io) => io_reason(io),
            None => root.to_string(),
        };
        if !status.message().contains(&reason) {
            text.push_str(&format!(" ({reason})"));
        }
    }
    text
}

/// Why the edges could not be listed from one replica.
#[derive(Debug, thiserror::Error)]
enum ListError {
    #[error("{url}: {}", status_text(.status))]
    Rpc {
        url: String,
        #[source]
        status: tonic::Status,
    },
    #[error("{url}: page token {token:?} came back twice")]
    PageLoop { url: String, token: String },
    #[error("{url}: no answer within {}", format_duration(LIST_TIMEOUT))]
    Timeout { url: String },
}

impl Replicas {
    fn new(list: &str, tls: Option<&ClientTls>) -> Result<Self, ConfigError> {
        let urls = control_plane_urls(list);
        let mut channels = Vec::new();
        let mut problems = Vec::new();
        for url in &urls {
            match endpoint(url, tls) {
                Ok(e) => channels.push(e.connect_lazy()),
                Err(e) => problems.push(format!("--control-plane {url:?}: {e}")),
            }
        }
        if problems.is_empty() {
            Ok(Self { urls, channels })
        } else {
            Err(ConfigError { problems })
        }
    }

    /// Lists every edge, from `preferred` first and then the others;
    /// `preferred` becomes the replica that answered.
    async fn list_edges(&self, preferred: &mut usize) -> Result<Vec<pb::Edge>, ListError> {
        let n = self.urls.len();
        let mut last = None;
        for i in 0..n {
            let at = (*preferred + i) % n;
            let url = &self.urls[at];
            let walk = list_all(self.channels[at].clone(), url);
            match tokio::time::timeout(LIST_TIMEOUT, walk).await {
                Ok(Ok(edges)) => {
                    *preferred = at;
                    return Ok(edges);
                }
                Ok(Err(e)) => last = Some(e),
                Err(_) => last = Some(ListError::Timeout { url: url.clone() }),
            }
            if let Some(e) = &last {
                debug!(error = %e, "cannot list edges from this control plane");
            }
        }
        Err(last.unwrap_or(ListError::Timeout { url: String::new() }))
    }
}

/// Walks every page of `ListEdges`.
async fn list_all(channel: Channel, url: &str) -> Result<Vec<pb::Edge>, ListError> {
    let mut client = FleetServiceClient::new(channel);
    let mut edges = Vec::new();
    let mut token = String::new();
    let mut seen = HashSet::new();
    loop {
        let page = client
            .list_edges(pb::ListEdgesRequest {
                page_size: 0,
                page_token: token.clone(),
            })
            .await
            .map_err(|status| ListError::Rpc {
                url: url.to_owned(),
                status,
            })?
            .into_inner();
        edges.extend(page.edges);
        if page.next_page_token.is_empty() {
            return Ok(edges);
        }
        if !seen.insert(page.next_page_token.clone()) {
            return Err(ListError::PageLoop {
                url: url.to_owned(),
                token: page.next_page_token,
            });
        }
        token = page.next_page_token;
    }
}

/// The published target list: `None` until the fleet was listed once.
type Published = watch::Receiver<Option<Arc<Targets>>>;

/// Runs the prober until `shutdown` completes.
pub async fn run(
    config: ProbeConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ProbeError> {
    let config = Arc::new(config.validate()?);
    let replicas = Replicas::new(&config.control_plane, config.tls.as_ref())?;
    let mut registry = Registry::with_prefix("sextant_probe");
    let metrics = Arc::new(Metrics::new(&mut registry));
    let (stop_tx, stop) = watch::channel(false);
    let (targets_tx, targets) = watch::channel(None);

    if let Some(addr) = config.admin {
        let listener = edge::bind(addr, "admin").await?;
        let (registry, targets) = (Arc::new(registry), targets.clone());
        tokio::spawn(admin::serve_with(listener, move |uri| {
            respond(uri.path(), &registry, &targets)
        }));
    }
    let (batch_tx, batches) = mpsc::channel(2);
    let span = info_span!("prober", vantage = %config.vantage_id);
    tokio::spawn(
        refresh(
            config.clone(),
            replicas.clone(),
            targets_tx,
            metrics.clone(),
            stop.clone(),
        )
        .instrument(span.clone()),
    );
    tokio::spawn(send(replicas, batches, metrics.clone(), stop.clone()).instrument(span.clone()));
    tokio::spawn(rounds(config.clone(), targets, batch_tx, metrics, stop).instrument(span));
    info!(
        vantage = %config.vantage_id,
        interval = %format_duration(config.interval),
        timeout = %format_duration(config.timeout),
        "prober running"
    );
    shutdown.await;
    info!("shutting down");
    let _ = stop_tx.send(true);
    Ok(())
}

fn respond(path: &str, registry: &Registry, targets: &Published) -> (StatusCode, String) {
    match path {
        "/metrics" => {
            let mut out = String::new();
            match encode(&mut out, registry) {
                Ok(()) => (StatusCode::OK, out),
                Err(e) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("# cannot encode metrics: {e}\n"),
                ),
            }
        }
        "/healthz" => match targets.borrow().as_deref() {
            Some(t) => (StatusCode::OK, format!("ok: probing {} targets\n", t.len())),
            None => (
                StatusCode::SERVICE_UNAVAILABLE,
                "no edge list from the control plane yet\n".into(),
            ),
        },
        _ => (StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// Lists the fleet's edges every `refresh` and publishes the targets when
/// they change; keeps the last list when the control plane cannot answer.
async fn refresh(
    config: Arc<ProbeConfig>,
    replicas: Replicas,
    publish: watch::Sender<Option<Arc<Targets>>>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(config.refresh);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut preferred = 0;
    let mut failing: Option<String> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let listed = tokio::select! {
            r = replicas.list_edges(&mut preferred) => r,
            _ = stop.changed() => return,
        };
        let edges = match listed {
            Ok(edges) => {
                if failing.take().is_some() {
                    info!("listing the fleet's edges again");
                }
                edges
            }
            Err(e) => {
                let kept = publish.borrow().as_ref().map_or(0, |t| t.len());
                let error = e.to_string();
                // Said once per distinct error, not every refresh.
                if failing.as_ref() != Some(&error) {
                    warn!(%error, kept, "cannot list the fleet's edges; keeping the last list");
                } else {
                    debug!(%error, kept, "cannot list the fleet's edges; keeping the last list");
                }
                failing = Some(error);
                continue;
            }
        };
        let new = Targets::from_checks(
            edges.into_iter().map(|e| (e.id, e.health_check)),
            &config.allow_targets,
        );
        if publish.borrow().as_deref() == Some(&new) {
            continue;
        }
        // Targets that cannot be probed are told by the next round, as
        // failures.
        info!(
            "probing {} targets from vantage {}",
            new.len(),
            config.vantage_id
        );
        metrics
            .targets
            .set(i64::try_from(new.len()).unwrap_or(i64::MAX));
        publish.send_replace(Some(Arc::new(new)));
    }
}

/// Runs one round per interval and hands each batch to the sender.
async fn rounds(
    config: Arc<ProbeConfig>,
    mut targets: Published,
    batches: mpsc::Sender<pb::ProbeBatch>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    // The first round as soon as there is a list, then one per interval.
    let listed = async { targets.wait_for(Option::is_some).await.map(|_| ()) };
    tokio::select! {
        r = listed => if r.is_err() { return },
        _ = stop.changed() => return,
    }
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut flips = Flips::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let Some(current) = targets.borrow().clone() else {
            continue;
        };
        if current.is_empty() {
            continue;
        }
        let outcomes = tokio::select! {
            o = round(&current, &config.allow_targets, config.timeout, config.concurrency) => o,
            _ = stop.changed() => return,
        };
        metrics.record(&outcomes);
        for f in flips.observe(&outcomes) {
            match f.failure {
                Some(e) => warn!(edge = %f.edge, error = %e, "probe failing"),
                None => warn!(edge = %f.edge, "probe ok again"),
            }
        }
        let batch = pb::ProbeBatch {
            vantage_id: config.vantage_id.clone(),
            results: outcomes.into_iter().map(Into::into).collect(),
        };
        if batches.try_send(batch).is_err() {
            metrics.batches_dropped.inc();
            debug!("round dropped: the sender is behind");
        }
    }
}

/// Keeps a `ReportProbes` stream open and feeds it the batches; drops the
/// batches that arrive while it is down.
async fn send(
    replicas: Replicas,
    mut batches: mpsc::Receiver<pb::ProbeBatch>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let mut attempt = 0usize;
    let mut backoff = FIRST_BACKOFF;
    let mut failing: Option<String> = None;
    loop {
        let at = attempt % replicas.urls.len();
        let url = &replicas.urls[at];
        let (tx, rx) = mpsc::channel::<pb::ProbeBatch>(2);
        let mut client = SignalsServiceClient::new(replicas.channels[at].clone());
        let call = async move {
            client
                .report_probes(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        };
        let mut call = Box::pin(call);
        let opened = Instant::now();
        let ended = loop {
            tokio::select! {
                r = &mut call => break r,
                b = batches.recv() => match b {
                    Some(b) => if tx.try_send(b).is_err() {
                        metrics.batches_dropped.inc();
                        debug!("round dropped: the report stream is not keeping up");
                    },
                    None => return,
                },
                _ = stop.changed() => return,
            }
        };
        if opened.elapsed() >= MAX_BACKOFF * 10 {
            // It was up a while: this is a new outage.
            backoff = FIRST_BACKOFF;
            failing = None;
        }
        match ended {
            Ok(ack) => debug!(%url, accepted = ack.get_ref().accepted, "probe stream ended"),
            Err(status) => {
                let error = status_text(&status);
                let retry_in_ms = backoff.as_millis() as u64;
                // Said once per distinct error, not every attempt.
                if failing.as_ref() != Some(&error) {
                    warn!(%url, %error, retry_in_ms, "probe stream failed");
                } else {
                    debug!(%url, %error, retry_in_ms, "probe stream failed");
                }
                failing = Some(error);
                attempt += 1;
            }
        }
        let wake = tokio::time::Instant::now() + backoff;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => break,
                b = batches.recv() => match b {
                    Some(_) => {
                        metrics.batches_dropped.inc();
                    }
                    None => return,
                },
                _ = stop.changed() => return,
            }
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn parse(s: &str) -> Result<Target, TargetError> {
        s.parse()
    }

    fn bad(s: &str) -> String {
        match parse(s) {
            Ok(t) => panic!("{s:?} parsed as {t:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().expect("net")).collect()
    }

    #[test]
    fn parses_http_targets() {
        let v4 = Host::Ip(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)));
        assert_eq!(
            parse("http://127.0.0.1:8080/healthz"),
            Ok(Target::Http {
                host: v4.clone(),
                port: 8080,
                path: "/healthz".into()
            })
        );
        assert_eq!(
            parse("http://127.0.0.1:8080"),
            Ok(Target::Http {
                host: v4.clone(),
                port: 8080,
                path: "/".into()
            })
        );
        assert_eq!(
            parse("HTTP://Edge.Example.com/h?x=1#frag"),
            Ok(Target::Http {
                host: Host::Name("edge.example.com".into()),
                port: 80,
                path: "/h?x=1".into()
            })
        );
        assert_eq!(
            parse("http://[::1]:8080/ready"),
            Ok(Target::Http {
                host: Host::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST)),
                port: 8080,
                path: "/ready".into()
            })
        );
        let t = parse("http://[::1]/").expect("v6 without port");
        assert_eq!(t.host_header(), "[::1]");
        assert_eq!(
            parse("http://a.example:81/").map(|t| t.host_header()),
            Ok("a.example:81".into())
        );
    }

    #[test]
    fn parses_tcp_targets() {
        assert_eq!(
            parse("127.0.0.1:443"),
            Ok(Target::Tcp {
                host: Host::Ip(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1))),
                port: 443
            })
        );
        assert_eq!(
            parse("[::1]:80"),
            Ok(Target::Tcp {
                host: Host::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST)),
                port: 80
            })
        );
        assert_eq!(
            parse(" cdn.example.net:80 "),
            Ok(Target::Tcp {
                host: Host::Name("cdn.example.net".into()),
                port: 80
            })
        );
    }

    #[test]
    fn bad_targets_say_why() {
        assert_eq!(
            bad("ftp://x"),
            "bad health_check \"ftp://x\": unsupported scheme \"ftp\"; expected http://HOST[:PORT][/PATH] or HOST:PORT"
        );
        assert!(bad("").contains("it is empty"));
        assert!(bad("https://x.example/").contains("https is not supported"));
        assert!(bad("127.0.0.1").contains("no port"));
        assert!(bad("127.0.0.1:0").contains("bad port \"0\""));
        assert!(bad("127.0.0.1:99999").contains("bad port \"99999\""));
        assert!(bad("127.0.0.1:http").contains("bad port \"http\""));
        assert!(bad("::1:80").contains("needs brackets"));
        assert!(bad("[::1:80").contains("bad host"));
        assert!(bad("[::1]x").contains("bad host"));
        assert!(bad(":80").contains("no host"));
        assert!(bad("http://").contains("no host"));
        assert!(bad("http:///x").contains("no host"));
        assert!(bad("http://u@127.0.0.1/").contains("user info"));
        assert!(bad("http://127.0.0.1/a b").contains("path contains ' '"));
        assert!(bad("http://127.0.0.1/a\r\nX: y").contains("path contains '\\r'"));
        assert!(bad("10.1.2:80").contains("bad host \"10.1.2\""));
        assert!(bad("bad_-.example:80").contains("bad host"));
        assert!(bad("x y:80").contains("bad host"));
        assert!(bad("127.0.0.1:80/x").contains("bad host"));
    }

    #[test]
    fn allow_list_filters_addresses() {
        let allowed = nets(&["127.0.0.0/8", "::1/128"]);
        assert!(parse_allowed("127.0.0.5:80", &allowed).is_ok());
        assert!(parse_allowed("http://[::1]:80/", &allowed).is_ok());
        assert!(parse_allowed("[::ffff:127.0.0.1]:80", &allowed).is_ok());
        let e = parse_allowed("http://10.0.0.1:8080/h", &allowed)
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("health_check \"http://10.0.0.1:8080/h\": 10.0.0.1 is outside the allowed targets (127.0.0.0/8, ::1/128)")
        );
        assert!(parse_allowed("[::ffff:10.0.0.1]:80", &allowed).is_err());
        // Names are checked once resolved; an empty list allows all.
        assert!(parse_allowed("edge.example:80", &allowed).is_ok());
        assert!(parse_allowed("10.0.0.1:80", &[]).is_ok());

        let t = Targets::from_checks(
            [
                ("a", "127.0.0.1:80"),
                ("b", "10.0.0.1:80"),
                ("c", "ftp://x"),
            ],
            &allowed,
        );
        assert_eq!(t.len(), 3);
        assert!(matches!(t.get("a"), Some(Ok(_))));
        assert!(matches!(
            t.get("b"),
            Some(Err(TargetError::NotAllowed { .. }))
        ));
        assert!(matches!(t.get("c"), Some(Err(TargetError::Bad { .. }))));
    }

    #[tokio::test]
    async fn resolved_names_are_checked_against_the_allow_list() {
        let r = probe(
            &parse("localhost:9").expect("target"),
            &nets(&["192.0.2.0/24"]),
            Duration::from_secs(2),
        )
        .await;
        assert!(
            matches!(r, Err(ProbeFailure::ResolvedNotAllowed { .. })),
            "{r:?}"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("1").is_err());
        assert!(parse_duration("s").is_err());
        assert_eq!(
            parse_duration("1.5s"),
            Err("\"1.5s\": use a whole number (e.g. 1500ms, not 1.5s)".into())
        );
        assert!(parse_duration("3w").is_err());
        assert_eq!(format_duration(Duration::from_millis(800)), "800ms");
        assert_eq!(format_duration(Duration::from_secs(2)), "2s");
    }

    #[test]
    fn config_problems_are_all_reported() {
        let c = ProbeConfig {
            control_plane: "http://127.0.0.1:1,127.0.0.1:2".into(),
            vantage_id: " ".into(),
            interval: Duration::from_millis(500),
            timeout: Duration::from_secs(1),
            refresh: Duration::ZERO,
            allow_targets: vec![],
            admin: None,
            concurrency: DEFAULT_CONCURRENCY,
            tls: None,
        };
        let e = c.validate().err().map(|e| e.problems).unwrap_or_default();
        assert_eq!(e.len(), 4, "{e:?}");
        assert!(e[0].contains("--vantage-id"));
        assert!(e[1].contains("\"127.0.0.1:2\": expected an http://"));
        assert!(e[2].contains("--refresh must be more than 0"));
        assert!(e[3].contains("--timeout (1s) must not be longer than --interval (500ms)"));
    }

    #[test]
    fn status_lines() {
        assert_eq!(status_code(b"HTTP/1.1 200 OK\r"), Ok(200));
        assert_eq!(status_code(b"HTTP/1.0 503"), Ok(503));
        assert!(status_code(b"SSH-2.0-OpenSSH").is_err());
        assert!(status_code(b"HTTP/1.1 20 OK").is_err());
    }

    #[test]
    fn flips_report_changes_only() {
        let o = |edge: &str, ok: bool| Outcome {
            edge: edge.into(),
            at_unix_ms: 0,
            latency: Duration::ZERO,
            result: if ok {
                Ok(())
            } else {
                Err(ProbeFailure::Status(503))
            },
        };
        let mut f = Flips::default();
        let first = f.observe(&[o("a", true), o("b", false)]);
        assert_eq!(
            first,
            vec![Flip {
                edge: "b".into(),
                failure: Some(ProbeFailure::Status(503))
            }]
        );
        assert!(f.observe(&[o("a", true), o("b", false)]).is_empty());
        let second = f.observe(&[o("a", false), o("b", true)]);
        assert_eq!(second.len(), 2);
        assert_eq!(second[1].failure, None);
        // Forgotten when gone: a reappearing ok target is not news.
        assert!(f.observe(&[o("b", true)]).is_empty());
        assert!(f.observe(&[o("a", true), o("b", true)]).is_empty());
    }

    #[test]
    fn outcomes_become_probe_results() {
        let r: pb::ProbeResult = Outcome {
            edge: "cdn-eu".into(),
            at_unix_ms: 42,
            latency: Duration::from_micros(1500),
            result: Err(ProbeFailure::Timeout(Duration::from_millis(800))),
        }
        .into();
        assert_eq!(
            (r.edge.as_str(), r.at_unix_ms, r.ok, r.latency_ms),
            ("cdn-eu", 42, false, 1.5)
        );
        assert_eq!(r.error, "timeout after 800ms");
    }

    /// A one-shot-per-connection HTTP server answering `status`; returns
    /// its address and the request heads it received.
    async fn http_server(status: &'static str) -> (SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 512];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                if let Ok(mut l) = log.lock() {
                    l.push(String::from_utf8_lossy(&buf).into_owned());
                }
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        (addr, seen)
    }

    #[tokio::test]
    async fn http_probe_reads_the_status() {
        let timeout = Duration::from_secs(2);
        let (up, seen) = http_server("200 OK").await;
        let t = parse(&format!("http://{up}/healthz")).expect("target");
        assert_eq!(probe(&t, &[], timeout).await, Ok(()));
        let head = seen.lock().map(|s| s.join("")).unwrap_or_default();
        assert!(head.starts_with("GET /healthz HTTP/1.1\r\n"), "{head}");
        assert!(head.contains(&format!("\r\nHost: {up}\r\n")), "{head}");
        assert!(head.contains("\r\nConnection: close\r\n"), "{head}");

        let (moved, _) = http_server("302 Found").await;
        let t = parse(&format!("http://{moved}/")).expect("target");
        assert_eq!(probe(&t, &[], timeout).await, Ok(()));

        let (down, _) = http_server("503 Service Unavailable").await;
        let t = parse(&format!("http://{down}/healthz")).expect("target");
        let r = probe(&t, &[], timeout).await;
        assert_eq!(r, Err(ProbeFailure::Status(503)));
        assert_eq!(
            r.err().map(|e| e.to_string()).as_deref(),
            Some("status 503")
        );
    }

    /// A loopback port with nothing listening.
    fn closed_port() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    }

    #[tokio::test]
    async fn tcp_probe_of_a_closed_port_is_refused() {
        let addr = closed_port();
        let t = parse(&addr.to_string()).expect("target");
        let r = probe(&t, &[], Duration::from_secs(2)).await;
        assert_eq!(
            r.err().map(|e| e.to_string()).as_deref(),
            Some("connect: connection refused")
        );
        let http = parse(&format!("http://{addr}/")).expect("target");
        assert!(probe(&http, &[], Duration::from_secs(2)).await.is_err());

        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let open = parse(&l.local_addr().expect("addr").to_string()).expect("target");
        assert_eq!(probe(&open, &[], Duration::from_secs(2)).await, Ok(()));
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        // Accepts (the kernel does) and never answers.
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let t = parse(&format!("http://{}/", l.local_addr().expect("addr"))).expect("target");
        let started = Instant::now();
        let r = probe(&t, &[], Duration::from_millis(300)).await;
        assert_eq!(
            r.err().map(|e| e.to_string()).as_deref(),
            Some("timeout after 300ms")
        );
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(2),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn a_round_probes_every_target_at_once() {
        let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (up, _) = http_server("200 OK").await;
        let mut checks = vec![("bad".to_owned(), "ftp://x".to_owned())];
        for i in 0..20 {
            checks.push((
                format!("slow-{i:02}"),
                format!("http://{}/", silent.local_addr().expect("addr")),
            ));
        }
        checks.push(("up".into(), format!("http://{up}/")));
        let targets = Targets::from_checks(checks, &[]);
        let started = Instant::now();
        let out = round(&targets, &[], Duration::from_millis(300), 256).await;
        assert!(started.elapsed() < Duration::from_secs(2), "not concurrent");
        assert_eq!(out.len(), 22);
        assert_eq!(out[0].edge, "bad");
        assert!(matches!(out[0].result, Err(ProbeFailure::Target(_))));
        assert!(out[1..21]
            .iter()
            .all(|o| o.result == Err(ProbeFailure::Timeout(Duration::from_millis(300)))));
        assert_eq!((out[21].edge.as_str(), &out[21].result), ("up", &Ok(())));
    }
}
