//! `BgpService`: the prefix → origin ASN map from RIB dumps, and lookups.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use sextant_bgp::rib::{decode_mrt, RibMap};
use sextant_core::Fleet;
use sextant_proto::v1 as pb;
use sextant_proto::v1::bgp_service_client::BgpServiceClient;
use sextant_proto::v1::bgp_service_server::BgpService;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, instrument};

use crate::cluster::Node;
use crate::control_loop::NewRib;
use crate::state::LoadedRib;

/// Largest dump accepted (a full table is about 100 MB uncompressed).
pub const MAX_RIB_BYTES: usize = 1 << 30;
/// Pieces of a streamed dump.
pub const RIB_PIECE_BYTES: usize = 1 << 20;

/// Serves the BGP inputs.
#[derive(Clone)]
pub struct BgpApi {
    pub node: Node,
    /// The BMP station, when `--bmp-listen` is set.
    pub station: Option<Arc<crate::bmp::Station>>,
}

impl std::fmt::Debug for BgpApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BgpApi").finish_non_exhaustive()
    }
}

/// The RIB info on the wire.
pub(crate) fn rib_info(rib: &LoadedRib, fleet: Option<&Fleet>) -> pb::RibInfo {
    let m = &rib.meta;
    let grouped = fleet.map_or(0, |f| {
        let mut asns: Vec<u32> = f.groups.values().flat_map(|g| g.asns.clone()).collect();
        asns.sort_unstable();
        asns.dedup();
        asns.iter().map(|&a| rib.map.count_of(a) as u64).sum()
    });
    pb::RibInfo {
        generation: m.generation,
        source: m.source.clone(),
        loaded_unix_ms: u64::try_from(m.loaded_at_ms).unwrap_or(0),
        loaded_by: m.loaded_by.clone(),
        ipv4_prefixes: rib.map.v4_len() as u64,
        ipv6_prefixes: rib.map.v6_len() as u64,
        origin_asns: rib.map.origins() as u64,
        entries: m.entries,
        skipped: m.skipped,
        multi_origin: m.multi_origin,
        other_records: m.other_records,
        digest: m.digest.clone(),
        grouped_prefixes: grouped,
    }
}

/// The client group of `addr`, as GeoDNS resolves it: the longest explicit
/// group prefix first, then the first group (by id) that names the
/// address's origin ASN.
pub(crate) fn group_of(
    fleet: &Fleet,
    addr: IpAddr,
    origin: Option<u32>,
) -> Option<(String, String)> {
    let explicit = fleet
        .groups
        .values()
        .flat_map(|g| g.prefixes.iter().map(move |p| (g, p)))
        .filter(|(_, p)| p.contains(&addr))
        .max_by_key(|(_, p)| p.prefix_len());
    if let Some((g, p)) = explicit {
        return Some((g.id.to_string(), format!("prefix {p}")));
    }
    let origin = origin?;
    fleet
        .groups
        .values()
        .find(|g| g.asns.contains(&origin))
        .map(|g| (g.id.to_string(), format!("origin AS{origin} (BGP RIB)")))
}

async fn collect(
    mut stream: Streaming<pb::LoadRibRequest>,
) -> Result<(pb::LoadRibRequest, Bytes), Status> {
    let mut first: Option<pb::LoadRibRequest> = None;
    let mut data = BytesMut::new();
    while let Some(mut msg) = stream.message().await? {
        if first.is_none() {
            // Allocate once when the client says how much comes.
            let total = usize::try_from(msg.total_bytes).unwrap_or(usize::MAX);
            data.reserve(total.min(128 << 20));
        }
        if data.len() + msg.data.len() > MAX_RIB_BYTES {
            return Err(Status::invalid_argument(format!(
                "data: the dump is larger than the {} MiB limit",
                MAX_RIB_BYTES >> 20
            )));
        }
        data.extend_from_slice(&std::mem::take(&mut msg.data));
        if first.is_none() {
            first = Some(msg);
        }
    }
    let first = first.ok_or_else(|| Status::invalid_argument("data: the stream was empty"))?;
    Ok((first, data.freeze()))
}

#[tonic::async_trait]
impl BgpService for BgpApi {
    #[instrument(skip_all, fields(actor, source))]
    async fn load_rib(
        &self,
        request: Request<Streaming<pb::LoadRibRequest>>,
    ) -> Result<Response<pb::LoadRibResponse>, Status> {
        let who = super::principal(&request)?;
        let writer = super::writer(&self.node, &request)?;
        let (req, data) = collect(request.into_inner()).await?;
        let handle = match writer {
            super::Writer::Local(h) => h,
            super::Writer::Remote { leader, channel } => {
                tracing::debug!(%leader, "forwarding the RIB load to the leader");
                let mut first = Some(req);
                let pieces: Vec<pb::LoadRibRequest> = data
                    .chunks(RIB_PIECE_BYTES)
                    .map(|piece| pb::LoadRibRequest {
                        data: piece.to_vec(),
                        ..first.take().unwrap_or_default()
                    })
                    .collect();
                let r = BgpServiceClient::new(channel)
                    .load_rib(super::forwarded(
                        futures::stream::iter(pieces),
                        &self.node.me.id,
                        &who,
                    ))
                    .await?;
                return Ok(Response::new(r.into_inner()));
            }
        };
        let intent = super::intent(&who, req.actor, req.reason);
        let span = tracing::Span::current();
        span.record("actor", intent.actor.as_str());
        span.record("source", req.source.as_str());
        let source = if req.source.is_empty() {
            "(unnamed)".to_owned()
        } else {
            req.source
        };
        let size = data.len();
        let dump_digest = crate::blocking::heavy(|| sextant_bgp::rib::digest(&data));
        let snap = self.node.snapshot();
        if let Some(current) = snap
            .rib
            .as_ref()
            .filter(|r| r.meta.dump_digest == dump_digest)
        {
            // The same file again: nothing to decode, nothing changes.
            let version = snap.version();
            return Ok(Response::new(pb::LoadRibResponse {
                rib: Some(rib_info(current, snap.fleet.as_deref())),
                routing_version_before: version,
                routing_version_after: version,
                changed: false,
            }));
        }
        let (map, stats) = tokio::task::spawn_blocking(move || decode_mrt(data))
            .await
            .map_err(|e| Status::internal(format!("the RIB decoder failed: {e}")))?
            .map_err(|e| {
                Status::invalid_argument(format!("{source}: {e}; the loaded map is unchanged"))
            })?;
        info!(
            %source,
            bytes = size,
            ipv4 = map.v4_len(),
            ipv6 = map.v6_len(),
            origins = map.origins(),
            "RIB dump decoded"
        );
        let map = Arc::new(map);
        let out = handle
            .load_rib(
                NewRib {
                    map: map.clone(),
                    stats,
                    source,
                    dump_digest,
                },
                intent,
            )
            .await?;
        let snap = self.node.snapshot();
        let rib = out
            .rib
            .map(|meta| rib_info(&LoadedRib { meta, map }, snap.fleet.as_deref()));
        Ok(Response::new(pb::LoadRibResponse {
            rib,
            routing_version_before: out.version_before,
            routing_version_after: out.version_after,
            changed: out.changed,
        }))
    }

    async fn get_rib(
        &self,
        _request: Request<pb::GetRibRequest>,
    ) -> Result<Response<pb::RibInfo>, Status> {
        let snap = self.node.snapshot();
        Ok(Response::new(
            snap.rib
                .as_ref()
                .map_or_else(pb::RibInfo::default, |r| rib_info(r, snap.fleet.as_deref())),
        ))
    }

    async fn lookup(
        &self,
        request: Request<pb::LookupRequest>,
    ) -> Result<Response<pb::LookupResponse>, Status> {
        let text = request.into_inner().address;
        let addr: IpAddr = text.trim().parse().map_err(|_| {
            Status::invalid_argument(format!("address: {text:?} is not an IPv4 or IPv6 address"))
        })?;
        let snap = self.node.snapshot();
        let route = snap.rib.as_ref().and_then(|r| r.map.lookup(addr));
        let (group, matched_by) = snap
            .fleet
            .as_deref()
            .and_then(|f| group_of(f, addr, route.map(|r| r.origin)))
            .unwrap_or_default();
        Ok(Response::new(pb::LookupResponse {
            prefix: route.map(|r| r.prefix.to_string()).unwrap_or_default(),
            origin_asn: route.map_or(0, |r| r.origin),
            group,
            matched_by,
        }))
    }

    async fn list_bmp_sessions(
        &self,
        _request: Request<pb::ListBmpSessionsRequest>,
    ) -> Result<Response<pb::ListBmpSessionsResponse>, Status> {
        let snap = self.node.snapshot();
        let sessions = self
            .station
            .as_ref()
            .map(|s| s.list(snap.fleet.as_deref()))
            .unwrap_or_default();
        Ok(Response::new(pb::ListBmpSessionsResponse { sessions }))
    }
}

/// The prefixes of `asn` in `map` as the DNS config carries them, cut in
/// parts of at most `per_part` prefixes (one resource must fit a message).
pub(crate) fn asn_parts(map: &RibMap, asn: u32, per_part: usize) -> Vec<pb::AsnPrefixes> {
    let packed = map.packed(asn);
    if packed.is_empty() {
        return vec![];
    }
    let per_part = per_part.max(1);
    let mut out = Vec::new();
    let (mut v4, mut v6) = (packed.v4, packed.v6);
    let mut part = 0;
    while !v4.is_empty() || !v6.is_empty() {
        let a = v4.split_to(v4.len().min(per_part * 5));
        let room = per_part - a.len() / 5;
        let b = v6.split_to(v6.len().min(room * 17));
        out.push(pb::AsnPrefixes {
            asn,
            part,
            v4: a,
            v6: b,
        });
        part += 1;
    }
    out
}
