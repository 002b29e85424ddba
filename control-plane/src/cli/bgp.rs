//! `sextantctl bgp ...`: load a RIB dump, show the loaded map, look up an
//! address, list the BMP sessions.

use std::path::PathBuf;

use clap::Subcommand;
use serde_json::{json, Value};
use sextant_proto::v1 as pb;
use sextant_proto::v1::bgp_service_client::BgpServiceClient;

use super::{CliError, Table};
use crate::grpc::bgp::RIB_PIECE_BYTES;
use crate::timefmt::rfc3339;

#[derive(Debug, Subcommand)]
pub enum BgpCmd {
    /// Replace the prefix → origin ASN map with an MRT RIB dump
    /// (TABLE_DUMP_V2, e.g. from BIRD's `mrt` protocol or RouteViews).
    /// A dump that cannot be read is refused and the loaded map stays.
    #[command(name = "load-rib")]
    LoadRib {
        file: PathBuf,
        /// Why (recorded in the audit log).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Show the loaded map: source, counts, digest.
    Show,
    /// Which prefix, origin ASN and client group ADDRESS maps to.
    Lookup { address: String },
    /// The BMP sessions of the control plane's station.
    Sessions,
}

fn rib_json(r: &pb::RibInfo) -> Value {
    json!({
        "generation": r.generation, "source": r.source,
        "loaded_unix_ms": r.loaded_unix_ms, "loaded_by": r.loaded_by,
        "ipv4_prefixes": r.ipv4_prefixes, "ipv6_prefixes": r.ipv6_prefixes,
        "origin_asns": r.origin_asns, "entries": r.entries, "skipped": r.skipped,
        "multi_origin": r.multi_origin, "other_records": r.other_records,
        "digest": r.digest, "grouped_prefixes": r.grouped_prefixes,
    })
}

fn rib_text(r: &pb::RibInfo) -> String {
    if r.generation == 0 {
        return "no RIB loaded (sextantctl bgp load-rib FILE)".into();
    }
    format!(
        "RIB generation {} from {} (loaded {} by {})\n\
         {} IPv4 and {} IPv6 prefixes, {} origin ASNs; {} in client groups by ASN\n\
         {} RIB entries read, {} prefixes skipped (no single origin), {} with disagreeing origins, {} other records\n\
         digest {}",
        r.generation,
        r.source,
        rfc3339(i64::try_from(r.loaded_unix_ms).unwrap_or(0)),
        r.loaded_by,
        r.ipv4_prefixes,
        r.ipv6_prefixes,
        r.origin_asns,
        r.grouped_prefixes,
        r.entries,
        r.skipped,
        r.multi_origin,
        r.other_records,
        r.digest
    )
}

pub(super) async fn run(
    channel: super::Conn,
    cmd: BgpCmd,
    actor: Option<pb::Actor>,
    json: bool,
) -> Result<String, CliError> {
    let mut client = BgpServiceClient::new(channel);
    Ok(match cmd {
        BgpCmd::LoadRib { file, reason } => {
            let data = std::fs::read(&file).map_err(|source| CliError::Read {
                path: file.clone(),
                source,
            })?;
            let source = file.file_name().map_or_else(
                || file.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            );
            let mut first = Some(pb::LoadRibRequest {
                source,
                actor,
                reason,
                total_bytes: data.len() as u64,
                ..pb::LoadRibRequest::default()
            });
            let mut messages: Vec<pb::LoadRibRequest> = data
                .chunks(RIB_PIECE_BYTES)
                .map(|piece| pb::LoadRibRequest {
                    data: piece.to_vec(),
                    ..first.take().unwrap_or_default()
                })
                .collect();
            // An empty file still sends its name (and is refused as empty).
            messages.extend(first);
            let r = client
                .load_rib(futures::stream::iter(messages))
                .await?
                .into_inner();
            let info = r.rib.unwrap_or_default();
            if json {
                json!({"changed": r.changed, "rib": rib_json(&info),
                       "routing_version_before": r.routing_version_before,
                       "routing_version_after": r.routing_version_after})
                .to_string()
            } else if r.changed {
                format!(
                    "RIB loaded: routing version {} -> {}\n{}",
                    r.routing_version_before,
                    r.routing_version_after,
                    rib_text(&info)
                )
            } else {
                format!(
                    "RIB unchanged (the loaded map is the same)\n{}",
                    rib_text(&info)
                )
            }
        }
        BgpCmd::Show => {
            let r = client.get_rib(pb::GetRibRequest {}).await?.into_inner();
            if json {
                rib_json(&r).to_string()
            } else {
                rib_text(&r)
            }
        }
        BgpCmd::Lookup { address } => {
            let r = client
                .lookup(pb::LookupRequest {
                    address: address.clone(),
                })
                .await?
                .into_inner();
            if json {
                json!({"address": address, "prefix": r.prefix, "origin_asn": r.origin_asn,
                       "group": r.group, "matched_by": r.matched_by})
                .to_string()
            } else {
                let route = if r.prefix.is_empty() {
                    "no prefix of the RIB covers it".to_owned()
                } else {
                    format!("{} from AS{}", r.prefix, r.origin_asn)
                };
                let group = if r.group.is_empty() {
                    "no client group (the service's default group answers)".to_owned()
                } else {
                    format!("group {} by {}", r.group, r.matched_by)
                };
                format!("{address}: {route}; {group}")
            }
        }
        BgpCmd::Sessions => {
            let r = client
                .list_bmp_sessions(pb::ListBmpSessionsRequest {})
                .await?
                .into_inner();
            if json {
                Value::Array(
                    r.sessions
                        .iter()
                        .map(|s| {
                            json!({"peer": s.peer, "sys_name": s.sys_name, "site": s.site,
                                   "router": s.router, "bgp_id": s.bgp_id, "up": s.up,
                                   "connected_unix_ms": s.connected_unix_ms, "messages": s.messages,
                                   "bgp_peers_up": s.bgp_peers_up, "announced": s.announced,
                                   "missing": s.missing, "last_error": s.last_error,
                                   "ended_unix_ms": s.ended_unix_ms, "ended_reason": s.ended_reason})
                        })
                        .collect(),
                )
                .to_string()
            } else if r.sessions.is_empty() {
                "no BMP sessions".into()
            } else {
                let mut t = Table::new([
                    "ROUTER",
                    "PEER",
                    "SYSNAME",
                    "SITE",
                    "STATE",
                    "SINCE",
                    "MESSAGES",
                    "PEERS UP",
                    "ANNOUNCED",
                    "MISSING",
                ]);
                let mut notes = Vec::new();
                for s in &r.sessions {
                    let (state, since) = if s.up {
                        ("up", s.connected_unix_ms)
                    } else {
                        ("down", s.ended_unix_ms)
                    };
                    if !s.up && !s.ended_reason.is_empty() {
                        notes.push(format!("{}: {}", s.peer, s.ended_reason));
                    } else if !s.last_error.is_empty() {
                        notes.push(format!("{}: {}", s.peer, s.last_error));
                    }
                    t.row([
                        if s.router.is_empty() {
                            "-".to_owned()
                        } else {
                            s.router.clone()
                        },
                        s.peer.clone(),
                        s.sys_name.clone(),
                        s.site.clone(),
                        state.to_owned(),
                        rfc3339(i64::try_from(since).unwrap_or(0)),
                        s.messages.to_string(),
                        s.bgp_peers_up.to_string(),
                        s.announced.join(","),
                        s.missing.join("; "),
                    ]);
                }
                let mut out = t.render();
                for n in notes {
                    out.push_str(&format!("\n{n}"));
                }
                out
            }
        }
    })
}
