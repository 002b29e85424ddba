//! `sextantctl`: the operator CLI.
//!
//! Human tables by default, `-o json` for scripts; flags also read from
//! `SEXTANT_*` environment variables; on failure, one line on stderr and a
//! non-zero exit (the binary's `main` does that with the error returned here).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};
use sextant_proto::v1 as pb;
use sextant_proto::v1::cluster_service_client::ClusterServiceClient;
use sextant_proto::v1::fleet_service_client::FleetServiceClient;
use sextant_proto::v1::operations_service_client::OperationsServiceClient;
use sextant_proto::v1::steering_service_client::SteeringServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::grpc::split_document;

mod token;

/// A connection to the control plane that presents the bearer token, if
/// one is given, on every call.
pub(crate) type Conn = InterceptedService<Channel, Bearer>;

/// Adds `authorization: Bearer <token>` to every request.
#[derive(Clone)]
pub(crate) struct Bearer(Option<tonic::metadata::AsciiMetadataValue>);

impl std::fmt::Debug for Bearer {
    // Never print the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Bearer(..)"
        } else {
            "Bearer(none)"
        })
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

mod bgp;
use crate::timefmt::{parse_duration_ms, rfc3339};

/// Operate Sextant: apply fleets, drain and undrain fault domains, read
/// routing and the audit log.
#[derive(Debug, Parser)]
#[command(name = "sextantctl", version, about)]
pub struct Cli {
    /// Control-plane gRPC address.
    #[arg(
        long,
        global = true,
        env = "SEXTANT_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    pub server: String,
    /// Output format.
    #[arg(short = 'o', long = "output", global = true, env = "SEXTANT_OUTPUT", value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Who you are, for the audit log (default: $USER).
    #[arg(long = "as", global = true, env = "SEXTANT_AS")]
    pub actor: Option<String>,
    /// CA certificate (PEM) the control plane's certificate must chain to;
    /// turns TLS on (--server must then be https://).
    #[arg(long, global = true, env = "SEXTANT_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Your client certificate (PEM; SAN URI spiffe://sextant/operator/NAME).
    #[arg(long, global = true, env = "SEXTANT_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Your client key (PEM).
    #[arg(long, global = true, env = "SEXTANT_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Bearer token (`sxt_...`) from `sextantctl token create`; prefer the
    /// environment variable to keep it out of shell history.
    #[arg(long, global = true, env = "SEXTANT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Give up on a call after this many seconds.
    #[arg(long, global = true, env = "SEXTANT_TIMEOUT", default_value_t = 30)]
    pub timeout: u64,
    #[command(subcommand)]
    pub command: Command,
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate and apply a fleet file (replaces the stored fleet).
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Why (recorded in the audit log).
        #[arg(long, default_value = "")]
        reason: String,
        /// Apply even if it moves more traffic at once than allowed.
        #[arg(long, requires = "force_reason")]
        force: bool,
        /// Why the guardrails are overridden (audited).
        #[arg(long)]
        force_reason: Option<String>,
    },
    /// Show what applying a fleet file would change, without applying it.
    Diff {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// List objects: edges, domains, services, groups, drains, or the fleet.
    Get {
        #[arg(value_enum)]
        what: GetWhat,
    },
    /// Show the routing of a service (all groups, or one).
    Routes {
        service: String,
        #[arg(long)]
        group: Option<String>,
        /// A kept older version instead of the current one.
        #[arg(long)]
        version: Option<u64>,
    },
    /// Drain a fault domain (e.g. region/eu-west): withdraw a fraction of its capacity.
    Drain {
        /// The fault domain, e.g. region/eu-west, provider/cdn-a.
        domain: String,
        /// Why; required.
        #[arg(long, required = true)]
        reason: String,
        /// Fraction of capacity to withdraw, in (0, 1] (default: the last
        /// step, or 1).
        #[arg(long)]
        fraction: Option<f64>,
        /// Step schedule: fractions to reach in order, e.g. 0.25,0.5,1.0.
        #[arg(long, value_delimiter = ',')]
        steps: Vec<f64>,
        /// Time between steps, e.g. 5m.
        #[arg(long)]
        interval: Option<String>,
        /// Undrain by itself after this long, e.g. 4h (default and maximum:
        /// the control plane's settings).
        #[arg(long)]
        expires: Option<String>,
        /// Team or person responsible (default: you).
        #[arg(long, default_value = "")]
        owner: String,
        /// Show what it would do (routing, per-region load, latency, cost,
        /// guardrails); change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Go ahead even if guardrails refuse it.
        #[arg(long, requires = "force_reason")]
        force: bool,
        /// Why the guardrails are overridden (audited).
        #[arg(long)]
        force_reason: Option<String>,
        /// Follow its progress until it reaches its target and every edge
        /// and DNS server holds the config.
        #[arg(long)]
        wait: bool,
    },
    /// Remove the drain of a fault domain (stepping down its schedule).
    Undrain {
        /// The drained fault domain.
        domain: String,
        /// Why (for the audit log).
        #[arg(long, default_value = "")]
        reason: String,
        /// Remove it at once instead of stepping down.
        #[arg(long = "now")]
        immediate: bool,
        /// Show what it would do; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Follow its progress until it is gone and the config is held.
        #[arg(long)]
        wait: bool,
    },
    /// Follow changes as they happen.
    Watch {
        #[command(subcommand)]
        what: WatchWhat,
    },
    /// DR drills: a drain run as an exercise, with abort conditions and a
    /// restore.
    Drill {
        #[command(subcommand)]
        cmd: DrillCmd,
    },
    /// Explain the weights of one (service, group): latency, cost,
    /// utilization, and which constraint binds each edge.
    Explain {
        service: String,
        #[arg(long)]
        group: String,
    },
    /// What losing each region or provider would do to the others.
    #[command(name = "n-minus-one")]
    NMinusOne,
    /// Show the audit log.
    Audit {
        /// Only records newer than this: a duration (15m, 2h, 7d) or unix ms.
        #[arg(long)]
        since: Option<String>,
        /// Only the newest N records.
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Show the control plane's status: replicas, store, versions.
    Status,
    /// List the kept routing versions.
    Versions,
    /// BGP inputs: RIB dumps (client groups by origin ASN) and BMP sessions.
    Bgp {
        #[command(subcommand)]
        cmd: bgp::BgpCmd,
    },
    /// Bearer tokens for operators and tools (admins only).
    Token {
        #[command(subcommand)]
        cmd: token::TokenCmd,
    },
}

#[derive(Debug, Subcommand)]
pub enum WatchWhat {
    /// Drain progress: steps, undrains, expiries, and how many edges and DNS
    /// servers hold each version.
    Drains {
        /// Only this domain.
        domain: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DrillCmd {
    /// Start a drill: drain DOMAIN for DURATION, abort and restore at once
    /// when a condition holds.
    Start {
        /// The fault domain to drain, e.g. region/eu-west.
        domain: String,
        /// How long to hold the drain, e.g. 30m.
        #[arg(long)]
        duration: String,
        /// Abort condition, repeatable: METRIC OP NUMBER [for DURATION],
        /// METRIC one of utilization, error_rate, unserved; e.g.
        /// 'utilization>0.9', 'error_rate>0.01 for 30s'.
        #[arg(long = "abort-if", required = true)]
        abort_if: Vec<String>,
        /// Step schedule of the drain, e.g. 0.5,1.0 (default: all at once).
        #[arg(long, value_delimiter = ',')]
        steps: Vec<f64>,
        /// Time between steps, e.g. 2m.
        #[arg(long)]
        interval: Option<String>,
        /// Why; required (e.g. the drill's ticket).
        #[arg(long, required = true)]
        reason: String,
        /// Check it and show what it would do; start nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Abort a running drill and restore at once.
    Abort {
        /// The drill's id (drill list).
        id: String,
        /// Why; required.
        #[arg(long, required = true)]
        reason: String,
    },
    /// List drills, running and past.
    List,
    /// A drill's report: timeline, peaks, times to drain and restore, outcome.
    Report { id: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GetWhat {
    Edges,
    Domains,
    Services,
    Groups,
    Drains,
    Fleet,
}

/// Errors of the CLI, each shown as one line.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot reach the control plane at {server}: {reason}")]
    Connect { server: String, reason: String },
    #[error("{0}")]
    Rpc(String),
    #[error("{0}")]
    Usage(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        let msg = s.message().trim();
        let mut msg = if msg.is_empty() {
            format!("{:?}", s.code())
        } else {
            msg.to_owned()
        };
        // The transport's own words (a TLS alert, a reset) are in the chain.
        let mut source = std::error::Error::source(&s);
        while let Some(e) = source {
            let text = e.to_string();
            if !msg.contains(&text) {
                msg = format!("{msg}: {text}");
            }
            source = e.source();
        }
        if msg.contains("transport error") || msg.contains("connection closed") {
            msg = format!(
                "{msg} (the connection was closed: with TLS, is your certificate from the control plane's CA? \
                 without, does the control plane need https:// and --tls-ca?)"
            );
        }
        match s.code() {
            tonic::Code::Unavailable if msg.contains("transport") || msg.contains("connect") => {
                CliError::Rpc(format!("control plane unavailable: {msg}"))
            }
            _ => CliError::Rpc(msg),
        }
    }
}

/// Runs one CLI command, printing its output to stdout.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    let tls = sextant_tls::ClientTlsArgs {
        tls_ca: cli.tls_ca.clone(),
        tls_cert: cli.tls_cert.clone(),
        tls_key: cli.tls_key.clone(),
    };
    if tls.tls_cert.is_some() != tls.tls_key.is_some() {
        return Err(CliError::Usage(
            "--tls-cert and --tls-key go together".into(),
        ));
    }
    let tls = tls.client().map_err(|e| CliError::Usage(e.to_string()))?;
    let channel = connect(&cli.server, cli.timeout, cli.token.as_deref(), tls.as_ref()).await?;
    let actor = Some(pb::Actor {
        name: cli
            .actor
            .clone()
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "unknown".into()),
    });
    let json = cli.output == Output::Json;
    let out = match cli.command {
        Command::Apply {
            file,
            reason,
            force,
            force_reason,
        } => {
            let document = read(&file)?;
            let format = format_of(&file);
            let mut first = Some(pb::ApplyFleetRequest {
                format: format.into(),
                actor,
                reason,
                force,
                force_reason: force_reason.unwrap_or_default(),
                ..pb::ApplyFleetRequest::default()
            });
            let messages: Vec<pb::ApplyFleetRequest> = split_document(&document)
                .into_iter()
                .map(|document| pb::ApplyFleetRequest {
                    document,
                    ..first.take().unwrap_or_default()
                })
                .collect();
            let r = FleetServiceClient::new(channel)
                .apply(futures::stream::iter(messages))
                .await?
                .into_inner();
            if json {
                json!({"generation": r.generation, "changed": r.changed,
                       "routing_version_before": r.routing_version_before,
                       "routing_version_after": r.routing_version_after})
                .to_string()
            } else if r.changed {
                format!(
                    "fleet applied: generation {}, routing version {} -> {}",
                    r.generation, r.routing_version_before, r.routing_version_after
                )
            } else {
                format!("fleet unchanged (generation {})", r.generation)
            }
        }
        Command::Diff { file } => {
            let document = read(&file)?;
            let format = format_of(&file).into();
            let messages: Vec<pb::DiffFleetRequest> = split_document(&document)
                .into_iter()
                .map(|document| pb::DiffFleetRequest { document, format })
                .collect();
            let r = FleetServiceClient::new(channel)
                .diff(futures::stream::iter(messages))
                .await?
                .into_inner();
            show_diff(&r, json)
        }
        Command::Get { what } => get(channel, what, json).await?,
        Command::Routes {
            service,
            group,
            version,
        } => {
            routes(
                channel,
                service,
                group.unwrap_or_default(),
                version.unwrap_or(0),
                json,
            )
            .await?
        }
        Command::Drain {
            domain,
            reason,
            fraction,
            steps,
            interval,
            expires,
            owner,
            dry_run,
            force,
            force_reason,
            wait,
        } => {
            if let Some(f) = fraction {
                if !(f > 0.0 && f <= 1.0) {
                    return Err(CliError::Usage(format!(
                        "--fraction must be in (0, 1], got {f}"
                    )));
                }
            }
            let secs = |flag: &str, v: Option<String>| -> Result<u64, CliError> {
                v.map_or(Ok(0), |s| {
                    parse_duration_ms(&s)
                        .map(|ms| u64::try_from(ms / 1000).unwrap_or(0))
                        .map_err(|e| CliError::Usage(format!("{flag}: {e}")))
                })
            };
            let step_interval_seconds = secs("--interval", interval)?;
            let expires_in_seconds = secs("--expires", expires)?;
            if steps.len() > 1 && step_interval_seconds == 0 {
                return Err(CliError::Usage(
                    "--steps needs --interval (e.g. --interval 5m)".into(),
                ));
            }
            let target = fraction.or(steps.last().copied()).unwrap_or(1.0);
            let mut ops = OperationsServiceClient::new(channel.clone());
            let r = ops
                .drain(pb::DrainRequest {
                    domain: domain.clone(),
                    fraction: fraction.unwrap_or(0.0),
                    reason,
                    actor,
                    dry_run,
                    steps,
                    step_interval_seconds,
                    expires_in_seconds,
                    force,
                    force_reason: force_reason.unwrap_or_default(),
                    owner,
                })
                .await?
                .into_inner();
            let mut out = show_change(
                &format!("drain {domain} (target {target})"),
                Change {
                    dry_run: r.dry_run,
                    before: r.routing_version_before,
                    after: r.routing_version_after,
                    changes: &r.changes,
                    total: r.changes_total,
                    shifts: &r.shifts,
                },
                json,
            );
            if !json {
                if let Some(i) = &r.impact {
                    out.push_str("\n\n");
                    out.push_str(&show_impact(i));
                }
            } else if let Some(i) = &r.impact {
                out = merge_json(&out, "impact", impact_json(i));
            }
            if wait && !dry_run {
                print_out(&out)?;
                return follow_drains(ops, &domain, Until::Reached, json).await;
            }
            out
        }
        Command::Undrain {
            domain,
            reason,
            immediate,
            dry_run,
            wait,
        } => {
            let mut ops = OperationsServiceClient::new(channel.clone());
            let r = ops
                .undrain(pb::UndrainRequest {
                    domain: domain.clone(),
                    reason,
                    actor,
                    dry_run,
                    immediate,
                })
                .await?
                .into_inner();
            let out = show_change(
                &format!("undrain {domain}"),
                Change {
                    dry_run: r.dry_run,
                    before: r.routing_version_before,
                    after: r.routing_version_after,
                    changes: &r.changes,
                    total: r.changes_total,
                    shifts: &r.shifts,
                },
                json,
            );
            if wait && !dry_run {
                print_out(&out)?;
                return follow_drains(ops, &domain, Until::Gone, json).await;
            }
            out
        }
        Command::Watch {
            what: WatchWhat::Drains { domain },
        } => {
            let ops = OperationsServiceClient::new(channel.clone());
            return follow_drains(ops, domain.as_deref().unwrap_or(""), Until::Never, json).await;
        }
        Command::Drill { cmd } => drill(channel.clone(), cmd, actor, json).await?,
        Command::Audit { since, limit } => {
            let since_unix_ms = match since {
                None => 0,
                Some(s) if s.chars().all(|c| c.is_ascii_digit()) => s
                    .parse()
                    .map_err(|_| CliError::Usage(format!("--since {s:?} is not a number")))?,
                Some(s) => {
                    let ago = parse_duration_ms(&s)
                        .map_err(|e| CliError::Usage(format!("--since: {e}")))?;
                    now_ms() - ago
                }
            };
            let client = OperationsServiceClient::new(channel);
            let limit = limit.unwrap_or(0);
            let records = all_pages(|page_token| {
                let mut client = client.clone();
                async move {
                    let r = client
                        .list_audit(pb::ListAuditRequest {
                            since_unix_ms,
                            limit,
                            page_size: 0,
                            page_token,
                        })
                        .await?
                        .into_inner();
                    Ok((r.records, r.next_page_token))
                }
            })
            .await?;
            show_audit(&records, json)
        }
        Command::Explain { service, group } => {
            let r = SteeringServiceClient::new(channel)
                .explain(pb::ExplainRequest { service, group })
                .await?
                .into_inner();
            show_explain(&r, json)
        }
        Command::NMinusOne => {
            let r = SteeringServiceClient::new(channel)
                .n_minus_one(pb::NMinusOneRequest {})
                .await?
                .into_inner();
            show_n_minus_one(&r, json)
        }
        Command::Status => {
            let r = ClusterServiceClient::new(channel)
                .status(pb::StatusRequest {})
                .await?
                .into_inner();
            show_status(&r, json)
        }
        Command::Bgp { cmd } => bgp::run(channel, cmd, actor, json).await?,
        Command::Token { cmd } => token::run(channel, cmd, json).await?,
        Command::Versions => {
            let r = SteeringServiceClient::new(channel)
                .list_versions(pb::ListVersionsRequest {})
                .await?
                .into_inner();
            if json {
                Value::Array(
                    r.versions
                        .iter()
                        .map(|v| json!({"version": v.version, "computed_at": rfc3339(v.computed_at_unix_ms),
                                        "fleet_generation": v.fleet_generation, "cause": v.cause, "churn": v.churn}))
                        .collect(),
                )
                .to_string()
            } else {
                let mut t = Table::new(["VERSION", "COMPUTED", "FLEET", "CHURN", "CAUSE"]);
                for v in &r.versions {
                    t.row([
                        v.version.to_string(),
                        rfc3339(v.computed_at_unix_ms),
                        v.fleet_generation.to_string(),
                        pct(v.churn),
                        v.cause.clone(),
                    ]);
                }
                t.render()
            }
        }
    };
    print_out(&out)
}

/// Prints to stdout; a closed pipe (`| head`) is not an error.
fn print_out(out: &str) -> Result<(), CliError> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{out}").and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(CliError::Usage(format!("cannot write output: {e}")))
        }
        _ => Ok(()),
    }
}

async fn connect(
    server: &str,
    timeout: u64,
    token: Option<&str>,
    tls: Option<&sextant_tls::ClientTls>,
) -> Result<Conn, CliError> {
    let err = |reason: String| CliError::Connect {
        server: server.to_owned(),
        reason,
    };
    let bearer = match token.map(str::trim).filter(|t| !t.is_empty()) {
        None => None,
        Some(t) => Some(format!("Bearer {t}").parse().map_err(|_| {
            CliError::Usage(
                "--token / SEXTANT_TOKEN: not a valid token (printable ASCII only)".into(),
            )
        })?),
    };
    let channel = sextant_tls::control_plane_endpoint(server, tls)
        .map_err(|e| err(format!("{e}")))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(timeout.max(1)))
        .connect()
        .await
        .map_err(|e| {
            let mut reason = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                reason = format!("{reason}: {s}");
                source = s.source();
            }
            err(reason)
        })?;
    Ok(InterceptedService::new(channel, Bearer(bearer)))
}

fn read(path: &PathBuf) -> Result<String, CliError> {
    std::fs::read_to_string(path).map_err(|source| CliError::Read {
        path: path.clone(),
        source,
    })
}

fn format_of(path: &std::path::Path) -> pb::DocumentFormat {
    match path.extension().and_then(|e| e.to_str()) {
        Some("json") => pb::DocumentFormat::Json,
        _ => pb::DocumentFormat::Toml,
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

fn weights_str(ws: &[pb::EdgeWeight]) -> String {
    if ws.is_empty() {
        return "-".into();
    }
    ws.iter()
        .map(|w| format!("{}={:.3}", w.edge, w.weight))
        .collect::<Vec<_>>()
        .join(" ")
}

fn weights_json(ws: &[pb::EdgeWeight]) -> Value {
    Value::Array(
        ws.iter()
            .map(|w| json!({"edge": w.edge, "weight": w.weight}))
            .collect(),
    )
}

/// Calls a paged List RPC until the last page.
async fn all_pages<T, F, Fut>(mut call: F) -> Result<Vec<T>, CliError>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, String), tonic::Status>>,
{
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let (items, next) = call(token).await?;
        out.extend(items);
        if next.is_empty() {
            return Ok(out);
        }
        token = next;
    }
}

async fn get(channel: Conn, what: GetWhat, json: bool) -> Result<String, CliError> {
    let mut fleet = FleetServiceClient::new(channel.clone());
    Ok(match what {
        GetWhat::Edges => {
            let edges = all_pages(|page_token| {
                let mut fleet = fleet.clone();
                async move {
                    let r = fleet
                        .list_edges(pb::ListEdgesRequest {
                            page_size: 0,
                            page_token,
                        })
                        .await?
                        .into_inner();
                    Ok((r.edges, r.next_page_token))
                }
            })
            .await?;
            if json {
                Value::Array(edges.iter().map(|e| json!({
                    "id": e.id, "kind": e.kind, "site": e.site, "provider": e.provider,
                    "addresses": e.addresses, "cname": e.cname, "capacity_rps": e.capacity_rps,
                    "effective_capacity_rps": e.effective_capacity_rps, "drain_factor": e.drain_factor,
                    "health": e.health, "predicted_load_rps": e.predicted_load_rps,
                    "health_check": e.health_check, "cost_per_unit": e.cost_per_unit,
                    "commit_rps": e.commit_rps, "overage_price": e.overage_price,
                    "reported_rps": e.reported_rps, "reported_error_rate": e.reported_error_rate,
                    "reported_capacity_rps": e.reported_capacity_rps,
                    "reported_config_version": e.reported_config_version,
                    "last_report": (e.last_report_unix_ms > 0).then(|| rfc3339(e.last_report_unix_ms)),
                    "health_reason": e.health_reason,
                    "health_since": (e.health_since_unix_ms > 0).then(|| rfc3339(e.health_since_unix_ms)),
                    "damping_penalty": e.damping_penalty, "damped": e.damped,
                    "failover_held": e.failover_held, "utilization": e.utilization,
                })).collect()).to_string()
            } else {
                let mut t = Table::new([
                    "EDGE",
                    "KIND",
                    "SITE",
                    "CAPACITY",
                    "EFFECTIVE",
                    "LOAD",
                    "UTIL",
                    "REPORTED",
                    "HEALTH",
                    "SINCE",
                    "PENALTY",
                ]);
                let mut reasons = Vec::new();
                for e in &edges {
                    let mut health = e.health.clone();
                    if e.damped {
                        health.push_str(" (damped)");
                    }
                    if e.failover_held {
                        health.push_str(" (held: bound)");
                    }
                    if e.health != "up" && !e.health_reason.is_empty() {
                        reasons.push(format!("{}: {}", e.id, e.health_reason));
                    }
                    t.row([
                        e.id.clone(),
                        e.kind.clone(),
                        e.site.clone(),
                        format!("{:.0}", e.capacity_rps),
                        format!("{:.0}", e.effective_capacity_rps),
                        format!("{:.0}", e.predicted_load_rps),
                        pct(e.predicted_load_rps / e.capacity_rps.max(f64::MIN_POSITIVE)),
                        if e.last_report_unix_ms > 0 {
                            pct(e.utilization)
                        } else {
                            "-".to_owned()
                        },
                        health,
                        if e.health_since_unix_ms > 0 {
                            rfc3339(e.health_since_unix_ms)
                        } else {
                            "-".to_owned()
                        },
                        format!("{:.0}", e.damping_penalty),
                    ]);
                }
                let mut out = t.render();
                for r in reasons {
                    out.push_str(&format!("\n{r}"));
                }
                out
            }
        }
        GetWhat::Domains => {
            let r = fleet
                .list_domains(pb::ListDomainsRequest {})
                .await?
                .into_inner();
            if json {
                Value::Array(r.domains.iter().map(|d| json!({
                    "path": d.path, "kind": d.kind, "edges": d.edges, "origins": d.origins,
                    "capacity_rps": d.capacity_rps, "drained_fraction": d.drained_fraction,
                })).collect()).to_string()
            } else {
                let mut t =
                    Table::new(["DOMAIN", "KIND", "EDGES", "ORIGINS", "CAPACITY", "DRAINED"]);
                for d in &r.domains {
                    t.row([
                        d.path.clone(),
                        d.kind.clone(),
                        d.edges.to_string(),
                        d.origins.to_string(),
                        format!("{:.0}", d.capacity_rps),
                        if d.drained_fraction > 0.0 {
                            pct(d.drained_fraction)
                        } else {
                            "-".into()
                        },
                    ]);
                }
                t.render()
            }
        }
        GetWhat::Services => {
            let r = fleet
                .list_services(pb::ListServicesRequest {})
                .await?
                .into_inner();
            if json {
                Value::Array(r.services.iter().map(|s| json!({
                    "id": s.id, "hostname": s.hostname, "zone": s.zone, "ttl_seconds": s.ttl_seconds,
                    "default_group": s.default_group, "mode": s.mode,
                })).collect()).to_string()
            } else {
                let mut t = Table::new([
                    "SERVICE",
                    "HOSTNAME",
                    "ZONE",
                    "TTL",
                    "DEFAULT GROUP",
                    "MODE",
                ]);
                for s in &r.services {
                    t.row([
                        s.id.clone(),
                        s.hostname.clone(),
                        s.zone.clone(),
                        s.ttl_seconds.to_string(),
                        s.default_group.clone(),
                        s.mode.clone(),
                    ]);
                }
                t.render()
            }
        }
        GetWhat::Groups => {
            let groups = all_pages(|page_token| {
                let mut fleet = fleet.clone();
                async move {
                    let r = fleet
                        .list_groups(pb::ListGroupsRequest {
                            page_size: 0,
                            page_token,
                        })
                        .await?
                        .into_inner();
                    Ok((r.groups, r.next_page_token))
                }
            })
            .await?;
            let sorted = |m: &std::collections::HashMap<String, f64>| {
                let mut v: Vec<(String, f64)> = m.iter().map(|(k, v)| (k.clone(), *v)).collect();
                v.sort_by(|a, b| a.0.cmp(&b.0));
                v
            };
            if json {
                Value::Array(groups.iter().map(|g| json!({
                    "id": g.id, "prefixes": g.prefixes, "countries": g.countries, "asns": g.asns,
                    "rib_prefixes": g.rib_prefixes,
                    "demand_rps": sorted(&g.demand_rps).into_iter()
                        .map(|(k, v)| (k, json!(v))).collect::<serde_json::Map<String, Value>>(),
                    "candidate_latency_ms": sorted(&g.candidate_latency_ms).into_iter()
                        .map(|(k, v)| (k, json!(v))).collect::<serde_json::Map<String, Value>>(),
                })).collect()).to_string()
            } else {
                let mut t = Table::new([
                    "GROUP",
                    "PREFIXES",
                    "COUNTRIES",
                    "ASNS",
                    "DEMAND",
                    "CANDIDATES",
                ]);
                for g in &groups {
                    let asns = match g.asns.len() {
                        0 => String::new(),
                        1..=3 => g
                            .asns
                            .iter()
                            .map(|a| format!("AS{a}"))
                            .collect::<Vec<_>>()
                            .join(","),
                        n => format!("{n} ASNs"),
                    };
                    let asns = if g.asns.is_empty() {
                        asns
                    } else {
                        format!("{asns} ({} RIB prefixes)", g.rib_prefixes)
                    };
                    t.row([
                        g.id.clone(),
                        g.prefixes.join(","),
                        g.countries.join(","),
                        asns,
                        sorted(&g.demand_rps)
                            .iter()
                            .map(|(s, d)| format!("{s}={d:.0}"))
                            .collect::<Vec<_>>()
                            .join(" "),
                        g.candidate_latency_ms.len().to_string(),
                    ]);
                }
                t.render()
            }
        }
        GetWhat::Drains => {
            let r = OperationsServiceClient::new(channel)
                .list_drains(pb::ListDrainsRequest {})
                .await?
                .into_inner();
            if json {
                Value::Array(r.drains.iter().map(|d| json!({
                    "domain": d.domain, "fraction": d.fraction, "reason": d.reason, "owner": d.owner,
                    "created_by": d.created_by, "created_at": rfc3339(d.created_at_unix_ms),
                })).collect()).to_string()
            } else if r.drains.is_empty() {
                "no active drains".into()
            } else {
                let mut t = Table::new(["DOMAIN", "FRACTION", "OWNER", "BY", "SINCE", "REASON"]);
                for d in &r.drains {
                    t.row([
                        d.domain.clone(),
                        pct(d.fraction),
                        d.owner.clone(),
                        d.created_by.clone(),
                        rfc3339(d.created_at_unix_ms),
                        d.reason.clone(),
                    ]);
                }
                t.render()
            }
        }
        GetWhat::Fleet => {
            let mut stream = fleet
                .get(pb::GetFleetRequest {
                    format: if json {
                        pb::DocumentFormat::Json
                    } else {
                        pb::DocumentFormat::Toml
                    }
                    .into(),
                })
                .await?
                .into_inner();
            let mut document = String::new();
            let mut generation = 0;
            while let Some(piece) = stream.message().await? {
                generation = piece.generation;
                document.push_str(&piece.document);
            }
            if generation == 0 {
                return Err(CliError::Rpc("no fleet has been applied yet".into()));
            }
            document
        }
    })
}

async fn routes(
    channel: Conn,
    service: String,
    group: String,
    version: u64,
    json: bool,
) -> Result<String, CliError> {
    let mut stream = SteeringServiceClient::new(channel)
        .get_routing_table(pb::GetRoutingTableRequest {
            service,
            group,
            version,
        })
        .await?
        .into_inner();
    let mut rows = Vec::new();
    let mut header: Option<pb::RoutingTableChunk> = None;
    while let Some(chunk) = stream.message().await? {
        if let Some(h) = &header {
            if h.version != chunk.version {
                return Err(CliError::Rpc(
                    "routing table changed while reading; retry".into(),
                ));
            }
        }
        let last = chunk.last;
        rows.extend(chunk.groups.iter().cloned());
        if header.is_none() {
            header = Some(chunk);
        }
        if last {
            break;
        }
    }
    let version = header.as_ref().map_or(0, |h| h.version);
    Ok(if json {
        json!({
            "version": version,
            "computed_at": header.as_ref().map(|h| rfc3339(h.computed_at_unix_ms)),
            "rows": rows.iter().map(|r| json!({
                "service": r.service, "group": r.group, "demand_rps": r.demand_rps,
                "weights": weights_json(&r.weights), "unserved": r.unserved,
                "failed_open": r.failed_open, "notes": r.notes,
            })).collect::<Vec<_>>(),
        })
        .to_string()
    } else {
        let mut t = Table::new(["SERVICE", "GROUP", "DEMAND", "UNSERVED", "WEIGHTS"]);
        for r in &rows {
            t.row([
                r.service.clone(),
                r.group.clone(),
                format!("{:.0}", r.demand_rps),
                if r.unserved > 0.0 {
                    pct(r.unserved)
                } else {
                    "-".into()
                },
                weights_str(&r.weights),
            ]);
        }
        format!("routing version {version}\n{}", t.render())
    })
}

/// The effect of a drain or undrain, as the server reported it.
struct Change<'a> {
    dry_run: bool,
    before: u64,
    after: u64,
    changes: &'a [pb::RoutingChange],
    /// Rows that change (the server sends at most 1,000).
    total: u32,
    shifts: &'a [pb::TrafficShift],
}

fn show_change(what: &str, c: Change<'_>, json: bool) -> String {
    let Change {
        dry_run,
        before,
        after,
        changes,
        total,
        shifts,
    } = c;
    if json {
        return json!({
            "dry_run": dry_run,
            "routing_version_before": before,
            "routing_version_after": after,
            "changes": changes_json(changes),
            "changes_total": total,
            "shifts": shifts.iter().map(|s| json!({"scope": s.scope, "rps_before": s.rps_before,
                "rps_after": s.rps_after, "moved_share": s.moved_share})).collect::<Vec<_>>(),
        })
        .to_string();
    }
    let mut out = if dry_run {
        format!(
            "dry run: {what} would change {} routing rows (nothing written)\n",
            changes.len()
        )
    } else {
        format!(
            "{what}: routing version {before} -> {after}, {} rows changed\n",
            changes.len()
        )
    };
    out.push_str(&changes_table(changes));
    if !shifts.is_empty() {
        let mut t = Table::new(["SCOPE", "RPS BEFORE", "RPS AFTER", "MOVED"]);
        for s in shifts {
            t.row([
                s.scope.clone(),
                format!("{:.0}", s.rps_before),
                format!("{:.0}", s.rps_after),
                pct(s.moved_share),
            ]);
        }
        out.push('\n');
        out.push_str(&t.render());
    }
    out
}

fn changes_json(changes: &[pb::RoutingChange]) -> Vec<Value> {
    changes
        .iter()
        .map(|c| {
            json!({"service": c.service, "group": c.group,
                   "before": weights_json(&c.before), "after": weights_json(&c.after),
                   "unserved_before": c.unserved_before, "unserved_after": c.unserved_after})
        })
        .collect()
}

fn changes_table(changes: &[pb::RoutingChange]) -> String {
    let mut t = Table::new(["SERVICE", "GROUP", "BEFORE", "AFTER"]);
    for c in changes {
        let side = |ws: &[pb::EdgeWeight], unserved: f64| {
            let mut s = weights_str(ws);
            if unserved > 0.0 {
                s.push_str(&format!(" unserved={unserved:.3}"));
            }
            s
        };
        t.row([
            c.service.clone(),
            c.group.clone(),
            side(&c.before, c.unserved_before),
            side(&c.after, c.unserved_after),
        ]);
    }
    t.render()
}

fn show_diff(r: &pb::DiffFleetResponse, json: bool) -> String {
    let kind = |k: i32| match pb::fleet_change::Kind::try_from(k) {
        Ok(pb::fleet_change::Kind::Added) => "added",
        Ok(pb::fleet_change::Kind::Removed) => "removed",
        Ok(pb::fleet_change::Kind::Changed) => "changed",
        _ => "?",
    };
    if json {
        return json!({
            "changes": r.changes.iter().map(|c| json!({"kind": kind(c.kind), "object": c.object,
                "id": c.id, "details": c.details})).collect::<Vec<_>>(),
            "routing_changes": changes_json(&r.routing_changes),
            "routing_changes_total": r.routing_changes_total,
            "shifts": r.shifts.iter().map(|s| json!({"scope": s.scope, "rps_before": s.rps_before,
                "rps_after": s.rps_after, "moved_share": s.moved_share})).collect::<Vec<_>>(),
        })
        .to_string();
    }
    if r.changes.is_empty() {
        return "no changes".into();
    }
    let mut out = String::new();
    for c in &r.changes {
        out.push_str(&format!("{} {} {}\n", kind(c.kind), c.object, c.id));
        for d in &c.details {
            out.push_str(&format!("    {d}\n"));
        }
    }
    out.push_str(&format!(
        "\n{} routing rows would change\n",
        r.routing_changes.len()
    ));
    let mut t = Table::new(["SCOPE", "RPS BEFORE", "RPS AFTER", "MOVED"]);
    for s in &r.shifts {
        t.row([
            s.scope.clone(),
            format!("{:.0}", s.rps_before),
            format!("{:.0}", s.rps_after),
            pct(s.moved_share),
        ]);
    }
    out.push_str(&t.render());
    out
}

fn show_audit(records: &[pb::AuditRecord], json: bool) -> String {
    if json {
        return Value::Array(
            records
                .iter()
                .map(|r| {
                    json!({"seq": r.seq, "at": rfc3339(r.at_unix_ms), "at_unix_ms": r.at_unix_ms,
                           "actor": r.actor, "action": r.action, "target": r.target, "reason": r.reason,
                           "routing_version_before": r.routing_version_before,
                           "routing_version_after": r.routing_version_after, "details": r.details})
                })
                .collect(),
        )
        .to_string();
    }
    let mut t = Table::new([
        "SEQ", "AT", "ACTOR", "ACTION", "TARGET", "VERSIONS", "REASON",
    ]);
    for r in records {
        t.row([
            r.seq.to_string(),
            rfc3339(r.at_unix_ms),
            r.actor.clone(),
            r.action.clone(),
            r.target.clone(),
            format!(
                "{} -> {}",
                r.routing_version_before, r.routing_version_after
            ),
            r.reason.clone(),
        ]);
    }
    t.render()
}

/// When `follow_drains` stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Until {
    /// The drain is at its target and every subscriber holds the version.
    Reached,
    /// The drain is gone and every subscriber holds the version.
    Gone,
    /// Never (watch).
    Never,
}

fn acks(e: &pb::DrainEvent) -> String {
    format!(
        "edges {}/{}, dns {}/{}",
        e.acked_proxies, e.total_proxies, e.acked_dns, e.total_dns
    )
}

/// Streams drain events, one line each, until `until` holds.
async fn follow_drains(
    mut ops: OperationsServiceClient<Conn>,
    domain: &str,
    until: Until,
    json: bool,
) -> Result<(), CliError> {
    // No overall timeout: a stepped drain may take hours.
    let mut req = tonic::Request::new(pb::WatchDrainsRequest {
        domain: domain.to_owned(),
    });
    req.set_timeout(Duration::from_secs(365 * 86_400));
    let mut stream = ops.watch_drains(req).await?.into_inner();
    let mut present = false;
    let mut at_target = false;
    while let Some(e) = stream.message().await? {
        if let Some(d) = &e.drain {
            present = e.kind != "undrained";
            at_target =
                present && d.phase == "draining" && (d.fraction - d.target_fraction).abs() < 1e-12;
        }
        let line = if json {
            json!({"kind": e.kind, "routing_version": e.routing_version,
                   "drain": e.drain.as_ref().map(|d| json!({"domain": d.domain, "fraction": d.fraction,
                        "target_fraction": d.target_fraction, "phase": d.phase, "step_index": d.step_index})),
                   "acked_proxies": e.acked_proxies, "total_proxies": e.total_proxies,
                   "acked_dns": e.acked_dns, "total_dns": e.total_dns})
            .to_string()
        } else {
            match &e.drain {
                Some(d) => format!(
                    "{} {} {}: fraction {} of {} (step {}/{}), version {}, {}",
                    crate::timefmt::rfc3339(now_ms()),
                    e.kind,
                    d.domain,
                    d.fraction,
                    d.target_fraction,
                    d.step_index + 1,
                    d.steps.len().max(1),
                    e.routing_version,
                    acks(&e)
                ),
                None => format!(
                    "{} {} version {}: {}",
                    crate::timefmt::rfc3339(now_ms()),
                    e.kind,
                    e.routing_version,
                    acks(&e)
                ),
            }
        };
        print_out(&line)?;
        let all_acked = e.acked_proxies == e.total_proxies && e.acked_dns == e.total_dns;
        let done = match until {
            Until::Reached => at_target && all_acked,
            Until::Gone => !present && all_acked,
            Until::Never => false,
        };
        if done {
            return Ok(());
        }
    }
    Err(CliError::Rpc(
        "the watch ended before the drain finished".into(),
    ))
}

async fn drill(
    channel: Conn,
    cmd: DrillCmd,
    actor: Option<pb::Actor>,
    json: bool,
) -> Result<String, CliError> {
    let mut ops = OperationsServiceClient::new(channel);
    let ms = |flag: &str, v: Option<String>| -> Result<u64, CliError> {
        v.map_or(Ok(0), |s| {
            parse_duration_ms(&s)
                .map(|ms| u64::try_from(ms / 1000).unwrap_or(0))
                .map_err(|e| CliError::Usage(format!("{flag}: {e}")))
        })
    };
    Ok(match cmd {
        DrillCmd::Start {
            domain,
            duration,
            abort_if,
            steps,
            interval,
            reason,
            dry_run,
        } => {
            let r = ops
                .start_drill(pb::StartDrillRequest {
                    domain,
                    duration_seconds: ms("--duration", Some(duration))?,
                    abort_if,
                    steps,
                    step_interval_seconds: ms("--interval", interval)?,
                    reason,
                    actor,
                    dry_run,
                })
                .await?
                .into_inner();
            if json {
                json!({"drill_id": r.drill_id, "dry_run": dry_run,
                       "impact": r.impact.as_ref().map(impact_json)})
                .to_string()
            } else {
                let mut out = if dry_run {
                    "dry run: the drill passes its checks (nothing started)".to_owned()
                } else {
                    format!("drill {} started", r.drill_id)
                };
                if let Some(i) = &r.impact {
                    out.push_str("\n\n");
                    out.push_str(&show_impact(i));
                }
                out
            }
        }
        DrillCmd::Abort { id, reason } => {
            ops.abort_drill(pb::AbortDrillRequest {
                drill_id: id.clone(),
                reason,
                actor,
            })
            .await?;
            if json {
                json!({"drill_id": id, "aborted": true}).to_string()
            } else {
                format!("drill {id} aborted: restoring")
            }
        }
        DrillCmd::List => {
            let r = ops
                .list_drills(pb::ListDrillsRequest {})
                .await?
                .into_inner();
            if json {
                Value::Array(r.drills.iter().map(drill_json).collect()).to_string()
            } else {
                let mut t = Table::new(["DRILL", "DOMAIN", "STATE", "STARTED", "OUTCOME"]);
                for d in &r.drills {
                    t.row([
                        d.id.clone(),
                        d.domain.clone(),
                        d.state.clone(),
                        rfc3339(d.started_at_unix_ms),
                        d.outcome.clone(),
                    ]);
                }
                t.render()
            }
        }
        DrillCmd::Report { id } => {
            let r = ops
                .get_drill_report(pb::GetDrillReportRequest { drill_id: id })
                .await?
                .into_inner();
            if json {
                json!({
                    "drill": r.drill.as_ref().map(drill_json),
                    "outcome": r.outcome,
                    "peak_utilization": r.peak_utilization,
                    "peak_error_rate": r.peak_error_rate,
                    "time_to_drain_ms": r.time_to_drain_ms,
                    "time_to_restore_ms": r.time_to_restore_ms,
                    "events": r.events.iter().map(|e| json!({"at": rfc3339(e.at_unix_ms), "at_unix_ms": e.at_unix_ms, "text": e.text})).collect::<Vec<_>>(),
                    "audit": r.timeline.iter().map(|a| json!({"seq": a.seq, "at_unix_ms": a.at_unix_ms,
                        "action": a.action, "target": a.target, "actor": a.actor, "reason": a.reason,
                        "routing_version_after": a.routing_version_after})).collect::<Vec<_>>(),
                })
                .to_string()
            } else {
                let d = r.drill.unwrap_or_default();
                let mut out = format!(
                    "drill {} on {} ({}), by {}: {}\noutcome: {}\npeak utilization {} (outside the domain), peak error rate {}\ntime to drain {}, time to restore {}\n",
                    d.id,
                    d.domain,
                    d.abort_if.join(" | "),
                    d.created_by,
                    d.reason,
                    r.outcome,
                    pct(r.peak_utilization),
                    pct(r.peak_error_rate),
                    if r.time_to_drain_ms > 0 { format!("{:.1} s", r.time_to_drain_ms as f64 / 1000.0) } else { "-".into() },
                    if r.time_to_restore_ms > 0 { format!("{:.1} s", r.time_to_restore_ms as f64 / 1000.0) } else { "-".into() },
                );
                let mut t = Table::new(["AT", "EVENT"]);
                for e in &r.events {
                    t.row([rfc3339(e.at_unix_ms), e.text.clone()]);
                }
                out.push_str(&t.render());
                out
            }
        }
    })
}

fn drill_json(d: &pb::DrillInfo) -> Value {
    json!({"id": d.id, "domain": d.domain, "state": d.state, "outcome": d.outcome,
           "started_at": rfc3339(d.started_at_unix_ms), "ended_at_unix_ms": d.ended_at_unix_ms,
           "duration_seconds": d.duration_seconds, "abort_if": d.abort_if, "reason": d.reason,
           "created_by": d.created_by})
}

fn impact_json(i: &pb::Impact) -> Value {
    json!({
        "scopes": i.scopes.iter().map(|s| json!({"scope": s.scope, "load_before_rps": s.load_before_rps,
            "load_after_rps": s.load_after_rps, "utilization_before": s.utilization_before,
            "utilization_after": s.utilization_after})).collect::<Vec<_>>(),
        "latency": i.latency.iter().map(|l| json!({"service": l.service, "group": l.group,
            "latency_before_ms": l.latency_before_ms, "latency_after_ms": l.latency_after_ms})).collect::<Vec<_>>(),
        "unserved_before_rps": i.unserved_before_rps, "unserved_after_rps": i.unserved_after_rps,
        "overage_before": i.overage_before, "overage_after": i.overage_after,
        "moved_share": i.moved_share, "violations": i.violations,
    })
}

/// Adds a key to a JSON object rendered as text.
fn merge_json(text: &str, key: &str, value: Value) -> String {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(mut m)) => {
            m.insert(key.to_owned(), value);
            Value::Object(m).to_string()
        }
        _ => text.to_owned(),
    }
}

fn show_impact(i: &pb::Impact) -> String {
    let mut out = String::from("impact at the target:\n");
    let mut t = Table::new([
        "SCOPE",
        "LOAD BEFORE",
        "LOAD AFTER",
        "UTIL BEFORE",
        "UTIL AFTER",
    ]);
    for s in &i.scopes {
        t.row([
            s.scope.clone(),
            format!("{:.0}", s.load_before_rps),
            format!("{:.0}", s.load_after_rps),
            pct(s.utilization_before),
            pct(s.utilization_after),
        ]);
    }
    out.push_str(&t.render());
    out.push_str(&format!(
        "\nunserved {:.0} -> {:.0} rps; third-party overage {:.2} -> {:.2} per s; {} of traffic moves",
        i.unserved_before_rps,
        i.unserved_after_rps,
        i.overage_before,
        i.overage_after,
        pct(i.moved_share)
    ));
    if !i.latency.is_empty() {
        let mut l = Table::new(["SERVICE", "GROUP", "LATENCY BEFORE", "LATENCY AFTER"]);
        for c in i.latency.iter().take(10) {
            l.row([
                c.service.clone(),
                c.group.clone(),
                format!("{:.0}ms", c.latency_before_ms),
                format!("{:.0}ms", c.latency_after_ms),
            ]);
        }
        out.push('\n');
        out.push_str(&l.render());
        if i.latency.len() > 10 {
            out.push_str(&format!("\n... and {} more groups", i.latency.len() - 10));
        }
    }
    if i.violations.is_empty() {
        out.push_str("\nguardrails: ok");
    } else {
        for v in &i.violations {
            out.push_str(&format!("\nGUARDRAIL: {v}"));
        }
    }
    out
}

fn show_explain(r: &pb::ExplainResponse, json: bool) -> String {
    if json {
        return json!({
            "version": r.version, "service": r.service, "group": r.group, "mode": r.mode,
            "demand_rps": r.demand_rps, "unserved": r.unserved, "failed_open": r.failed_open,
            "shift_limited": r.shift_limited, "notes": r.notes,
            "edges": r.edges.iter().map(|e| json!({
                "edge": e.edge, "weight": e.weight, "latency_ms": e.latency_ms,
                "cost_per_unit": e.cost_per_unit, "utilization": e.utilization,
                "load_rps": e.load_rps, "limit_rps": e.limit_rps, "marginal_cost": e.marginal_cost,
                "binding": e.binding, "drains": e.drains, "health": e.health, "reason": e.reason,
            })).collect::<Vec<_>>(),
        })
        .to_string();
    }
    let mut out = format!(
        "routing version {}: {} / {} ({}), demand {:.0} rps, unserved {}\n",
        r.version,
        r.service,
        r.group,
        r.mode,
        r.demand_rps,
        pct(r.unserved)
    );
    for n in &r.notes {
        out.push_str(&format!("note: {n}\n"));
    }
    let mut t = Table::new([
        "EDGE", "WEIGHT", "LATENCY", "COST", "UTIL", "BINDING", "HEALTH", "REASON",
    ]);
    for e in &r.edges {
        t.row([
            e.edge.clone(),
            format!("{:.3}", e.weight),
            format!("{:.0}ms", e.latency_ms),
            format!("{:.3}", e.cost_per_unit),
            pct(e.utilization),
            e.binding.join(","),
            e.health.clone(),
            e.reason.clone(),
        ]);
    }
    out.push_str(&t.render());
    out
}

fn show_n_minus_one(r: &pb::NMinusOneReport, json: bool) -> String {
    let dom = |d: &pb::DomainUtilization| {
        json!({"domain": d.domain, "load_rps": d.load_rps, "capacity_rps": d.capacity_rps,
               "utilization": d.utilization})
    };
    if json {
        return json!({
            "version": r.version,
            "baseline": r.baseline.iter().map(dom).collect::<Vec<_>>(),
            "scenarios": r.scenarios.iter().map(|s| json!({
                "lost": s.lost, "unserved_rps": s.unserved_rps, "max_utilization": s.max_utilization,
                "domains": s.domains.iter().map(dom).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
        .to_string();
    }
    let mut t = Table::new(["IF LOST", "UNSERVED RPS", "MAX UTIL", "HOTTEST"]);
    for s in &r.scenarios {
        let hottest = s
            .domains
            .iter()
            .max_by(|a, b| a.utilization.total_cmp(&b.utilization))
            .map_or_else(
                || "-".to_owned(),
                |d| format!("{} {}", d.domain, pct(d.utilization)),
            );
        t.row([
            s.lost.clone(),
            format!("{:.0}", s.unserved_rps),
            pct(s.max_utilization),
            hottest,
        ]);
    }
    format!(
        "N-1 report for routing version {}\n{}",
        r.version,
        t.render()
    )
}

fn show_status(r: &pb::StatusResponse, json: bool) -> String {
    if json {
        return json!({
            "replica": r.replica,
            "replicas": r.replicas.iter().map(|x| json!({"id": x.id, "address": x.address,
                "leader": x.leader, "software": x.software})).collect::<Vec<_>>(),
            "store": {"kind": r.store_kind, "health": r.store_health, "revision": r.store_revision},
            "routing_version": r.routing_version,
            "fleet_generation": r.fleet_generation,
            "active_drains": r.active_drains,
            "subscribers": r.subscribers.iter().map(|s| json!({"node_id": s.node_id, "kind": s.kind,
                "site": s.site, "connected": s.connected, "version_applied": s.version_applied,
                "version_sent": s.version_sent, "last_contact": rfc3339(s.last_contact_unix_ms),
                "last_nack_version": s.last_nack_version, "last_nack_reason": s.last_nack_reason,
                "stale": s.stale})).collect::<Vec<_>>(),
            "alarms": r.alarms,
            "software": r.software,
            "started_at": rfc3339(r.started_at_unix_ms),
            "auth": r.auth_mode,
            "insecure": r.insecure,
        })
        .to_string();
    }
    let mut out = format!(
        "replica {} (sextant {}), up since {}, auth {}\nstore: {} ({}), revision {}\nrouting version {}, fleet generation {}, {} active drains\n",
        r.replica,
        r.software,
        rfc3339(r.started_at_unix_ms),
        if r.insecure {
            "INSECURE (plaintext, no authentication)"
        } else {
            r.auth_mode.as_str()
        },
        r.store_kind,
        r.store_health,
        r.store_revision,
        r.routing_version,
        r.fleet_generation,
        r.active_drains
    );
    let mut t = Table::new(["REPLICA", "ADDRESS", "LEADER"]);
    for x in &r.replicas {
        t.row([x.id.clone(), x.address.clone(), x.leader.to_string()]);
    }
    out.push_str(&t.render());
    if !r.subscribers.is_empty() {
        let mut t = Table::new([
            "SUBSCRIBER",
            "KIND",
            "CONNECTED",
            "APPLIED",
            "SENT",
            "STALE",
            "LAST NACK",
        ]);
        for x in &r.subscribers {
            t.row([
                x.node_id.clone(),
                x.kind.clone(),
                x.connected.to_string(),
                x.version_applied.to_string(),
                x.version_sent.to_string(),
                if x.stale { "STALE".into() } else { "-".into() },
                if x.last_nack_reason.is_empty() {
                    "-".into()
                } else {
                    format!("v{}: {}", x.last_nack_version, x.last_nack_reason)
                },
            ]);
        }
        out.push_str("\n\n");
        out.push_str(&t.render());
    }
    if r.alarms.is_empty() {
        out.push_str("\nno alarms");
    } else {
        for a in &r.alarms {
            out.push_str(&format!("\nALARM: {a}"));
        }
    }
    out
}

/// A plain text table with columns sized to their content.
#[derive(Debug)]
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new<const N: usize>(headers: [&str; N]) -> Self {
        Self {
            rows: vec![headers.iter().map(|h| (*h).to_owned()).collect()],
        }
    }

    pub fn row<const N: usize>(&mut self, cells: [String; N]) {
        self.rows.push(cells.to_vec());
    }

    pub fn render(&self) -> String {
        let cols = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..cols)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|s| s.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in &self.rows {
            let line: Vec<String> = row
                .iter()
                .enumerate()
                .map(|(i, cell)| {
                    if i + 1 == row.len() {
                        cell.clone()
                    } else {
                        format!("{cell:<w$}", w = widths[i])
                    }
                })
                .collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
        }
        out.pop();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let mut t = Table::new(["A", "LONGER", "C"]);
        t.row(["xyz".into(), "1".into(), "end".into()]);
        assert_eq!(t.render(), "A    LONGER  C\nxyz  1       end");
    }

    #[test]
    fn fraction_and_reason_are_checked_by_the_parser() {
        let missing = Cli::try_parse_from(["sextantctl", "drain", "region/eu"]);
        assert!(missing.is_err());
        let ok = Cli::try_parse_from([
            "sextantctl",
            "drain",
            "region/eu",
            "--reason",
            "x",
            "-o",
            "json",
        ]);
        assert!(ok.is_ok());
    }
}
