//! The gRPC services: proto ⇄ model conversion, and errors → `Status` with a
//! message an operator can act on. No decision logic lives here.

use sextant_proto::v1 as pb;
use tonic::Status;

use crate::auth::{AuthError, Principal};
use crate::cluster::{Node, Role};
use crate::control_loop::{Intent, LoopHandle, OpError};
use sextant_core::diff::{RowChange, Shift};
use sextant_core::routing::EdgeWeight;

pub mod authn;
pub mod bgp;
pub mod cluster;
pub mod distribution;
pub mod fleet;
pub mod operations;
pub mod signals;
pub mod steering;
pub mod tokens;

impl From<OpError> for Status {
    fn from(e: OpError) -> Self {
        let msg = e.to_string();
        match e {
            OpError::InvalidFleet(_)
            | OpError::Drain(_)
            | OpError::Schedule(_)
            | OpError::BadDrill(_)
            | OpError::ForceNeedsReason => Status::invalid_argument(msg),
            OpError::NoFleet
            | OpError::GenerationMismatch { .. }
            | OpError::OwnedByDrill { .. }
            | OpError::Refused { .. }
            | OpError::DrillRefused { .. } => Status::failed_precondition(msg),
            OpError::NotDrained(_) | OpError::UnknownDrill(_) => Status::not_found(msg),
            OpError::State(_) | OpError::Stopped => Status::unavailable(msg),
        }
    }
}

/// The authenticated principal of a request, put there by the
/// [`authn`] layer. A request without one never reached a handler through
/// the server; refuse it rather than guess.
pub(crate) fn principal<T>(request: &tonic::Request<T>) -> Result<Principal, Status> {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("the request carries no authenticated identity"))
}

/// The acting identity recorded for a request: the authenticated
/// principal; only with `--insecure` the name the client claims, marked as
/// unverified.
pub(crate) fn intent(who: &Principal, claimed: Option<pb::Actor>, reason: String) -> Intent {
    let claimed = claimed.map(|a| a.name).filter(|n| !n.trim().is_empty());
    let actor = match who {
        Principal::Insecure => claimed.unwrap_or_else(|| "unknown".to_owned()),
        who => who.to_string(),
    };
    Intent { actor, reason }
}

/// Maps an authorization refusal to its gRPC status.
impl From<AuthError> for Status {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Unauthenticated | AuthError::BadToken(_) => {
                Status::unauthenticated(e.to_string())
            }
            AuthError::Denied(_) => Status::permission_denied(e.to_string()),
            AuthError::BadRole(_) => Status::invalid_argument(e.to_string()),
        }
    }
}

pub(crate) fn weights(ws: &[EdgeWeight]) -> Vec<pb::EdgeWeight> {
    ws.iter()
        .map(|w| pb::EdgeWeight {
            edge: w.edge.to_string(),
            weight: w.weight,
        })
        .collect()
}

/// Metadata set on a write forwarded by a follower to the leader.
pub const FORWARDED_BY: &str = "x-sextant-forwarded-by";

/// Where a write goes on this replica.
pub(crate) enum Writer {
    /// This replica leads: its own loop.
    Local(LoopHandle),
    /// Another replica leads: forward to it.
    Remote {
        leader: String,
        channel: tonic::transport::Channel,
    },
}

/// The writer for a request: this replica's loop, or the leader. A request
/// that a follower already forwarded is not forwarded again (leadership
/// moved in between): the client retries.
pub(crate) fn writer<T>(node: &Node, request: &tonic::Request<T>) -> Result<Writer, Status> {
    let forwarded = request.metadata().contains_key(FORWARDED_BY);
    match node.role() {
        Role::Leader(handle) => Ok(Writer::Local(handle)),
        Role::Follower { .. } if forwarded => Err(Status::unavailable(
            "leadership moved while the write was forwarded; retry",
        )),
        Role::Follower { leader } => {
            let channel = node
                .peer_endpoint(&leader.url)?
                .connect_timeout(std::time::Duration::from_secs(3))
                .timeout(std::time::Duration::from_secs(30))
                .connect_lazy();
            Ok(Writer::Remote {
                leader: leader.id,
                channel,
            })
        }
        Role::NoLeader { reason } => Err(Status::unavailable(format!(
            "writes are refused: no leader ({reason}); reads still work; retry shortly"
        ))),
    }
}

/// A request to forward to the leader, marked as forwarded by `me` on
/// behalf of `who` (believed by the leader only from a replica).
pub(crate) fn forwarded<T>(msg: T, me: &str, who: &Principal) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Ok(v) = me.parse() {
        r.metadata_mut().insert(FORWARDED_BY, v);
    }
    if let Some(v) = serde_json::to_string(who).ok().and_then(|j| j.parse().ok()) {
        r.metadata_mut().insert(crate::auth::ON_BEHALF_OF, v);
    }
    r
}

/// Routing rows returned in one response at most; the total is reported.
pub const MAX_CHANGED_ROWS: usize = 1000;
/// Largest page of a List call.
pub const MAX_PAGE: usize = 1000;
/// Largest fleet document accepted.
pub const MAX_DOCUMENT_BYTES: usize = 64 * 1024 * 1024;
/// Pieces of a streamed document.
pub const DOCUMENT_PIECE_BYTES: usize = 1024 * 1024;

/// One page of `items` (sorted by `key`, ascending) after `token`, and the
/// token of the next page (empty on the last).
pub(crate) fn page<T>(
    items: impl IntoIterator<Item = T>,
    key: impl Fn(&T) -> String,
    page_size: u32,
    token: &str,
) -> (Vec<T>, String) {
    let size = match page_size as usize {
        0 => MAX_PAGE,
        n => n.min(MAX_PAGE),
    };
    let mut rest = items
        .into_iter()
        .filter(|i| token.is_empty() || key(i).as_str() > token);
    let out: Vec<T> = rest.by_ref().take(size).collect();
    let next = match (rest.next(), out.last()) {
        (Some(_), Some(last)) => key(last),
        _ => String::new(),
    };
    (out, next)
}

/// Concatenates the document pieces of a client stream; the first message
/// is returned for its other fields.
pub(crate) async fn collect_document<M: Default>(
    mut stream: tonic::Streaming<M>,
    piece: impl Fn(&mut M) -> String,
) -> Result<(M, String), Status> {
    let mut first: Option<M> = None;
    let mut document = String::new();
    while let Some(mut msg) = stream.message().await? {
        let text = piece(&mut msg);
        if document.len() + text.len() > MAX_DOCUMENT_BYTES {
            return Err(Status::invalid_argument(format!(
                "document: larger than the {} MiB limit",
                MAX_DOCUMENT_BYTES >> 20
            )));
        }
        document.push_str(&text);
        if first.is_none() {
            first = Some(msg);
        }
    }
    let first = first.ok_or_else(|| Status::invalid_argument("document: the stream was empty"))?;
    Ok((first, document))
}

/// Splits a document into pieces of at most [`DOCUMENT_PIECE_BYTES`], on
/// character boundaries.
pub fn split_document(doc: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = doc;
    while !rest.is_empty() {
        let mut cut = rest.len().min(DOCUMENT_PIECE_BYTES);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        out.push(rest[..cut].to_owned());
        rest = &rest[cut..];
    }
    if out.is_empty() {
        out.push(String::new());
    }
    out
}

/// An impact preview on the wire (latency changes capped at 100).
pub(crate) fn impact(
    i: &sextant_core::impact::Impact,
    violations: &[sextant_core::impact::Violation],
) -> pb::Impact {
    pb::Impact {
        scopes: i
            .scopes
            .iter()
            .map(|s| pb::ScopeImpact {
                scope: s.scope.clone(),
                load_before_rps: s.load_before_rps,
                load_after_rps: s.load_after_rps,
                utilization_before: s.utilization_before,
                utilization_after: s.utilization_after,
            })
            .collect(),
        latency: i
            .latency
            .iter()
            .take(100)
            .map(|l| pb::LatencyChange {
                service: l.service.clone(),
                group: l.group.clone(),
                latency_before_ms: l.latency_before_ms,
                latency_after_ms: l.latency_after_ms,
            })
            .collect(),
        unserved_before_rps: i.unserved_before_rps,
        unserved_after_rps: i.unserved_after_rps,
        overage_before: i.overage_before,
        overage_after: i.overage_after,
        moved_share: i.moved_share,
        violations: violations.iter().map(|v| v.to_string()).collect(),
    }
}

/// An audit record on the wire.
pub(crate) fn audit_record(r: crate::audit::AuditRecord) -> pb::AuditRecord {
    pb::AuditRecord {
        seq: r.seq,
        at_unix_ms: r.at_ms,
        actor: r.actor,
        action: r.action,
        target: r.target,
        reason: r.reason,
        routing_version_before: r.routing_version_before,
        routing_version_after: r.routing_version_after,
        details: r.details,
    }
}

/// The first [`MAX_CHANGED_ROWS`] row changes, and how many there are.
pub(crate) fn row_changes(changes: &[RowChange]) -> (Vec<pb::RoutingChange>, u32) {
    let total = u32::try_from(changes.len()).unwrap_or(u32::MAX);
    let rows = changes
        .iter()
        .take(MAX_CHANGED_ROWS)
        .map(|c| pb::RoutingChange {
            service: c.service.to_string(),
            group: c.group.to_string(),
            before: weights(&c.before),
            after: weights(&c.after),
            unserved_before: c.unserved_before,
            unserved_after: c.unserved_after,
        })
        .collect();
    (rows, total)
}

pub(crate) fn shifts(shifts: &[Shift]) -> Vec<pb::TrafficShift> {
    shifts
        .iter()
        .map(|s| pb::TrafficShift {
            scope: s.scope.clone(),
            rps_before: s.rps_before,
            rps_after: s.rps_after,
            moved_share: s.moved_share,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_walk_every_item_once() {
        let items: Vec<u32> = (0..2500).collect();
        let key = |i: &u32| format!("{i:06}");
        let mut token = String::new();
        let mut seen = Vec::new();
        loop {
            let (page, next) = page(items.iter().copied(), key, 0, &token);
            assert!(page.len() <= MAX_PAGE);
            seen.extend(page);
            if next.is_empty() {
                break;
            }
            token = next;
        }
        assert_eq!(seen, items);
        let (small, next) = page(items.iter().copied(), key, 10, "");
        assert_eq!(small.len(), 10);
        assert_eq!(next, "000009");
        let (none, next) = page(Vec::<u32>::new(), key, 10, "");
        assert!(none.is_empty() && next.is_empty());
    }

    #[test]
    fn documents_split_on_char_boundaries_and_rejoin() {
        let doc = "é".repeat(DOCUMENT_PIECE_BYTES);
        let pieces = split_document(&doc);
        assert!(pieces.len() >= 2);
        assert!(pieces.iter().all(|p| p.len() <= DOCUMENT_PIECE_BYTES));
        assert_eq!(pieces.concat(), doc);
        assert_eq!(split_document(""), vec![String::new()]);
    }
}
