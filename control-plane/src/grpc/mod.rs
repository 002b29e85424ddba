//! The gRPC services: proto ⇄ model conversion, and errors → `Status` with a
//! message an operator can act on. No decision logic lives here.

use sextant_proto::v1 as pb;
use tonic::Status;

use crate::control_loop::{Intent, OpError, Outcome};
use sextant_core::diff::{RowChange, Shift};
use sextant_core::routing::EdgeWeight;

pub mod cluster;
pub mod fleet;
pub mod operations;
pub mod steering;
pub mod unimplemented;

impl From<OpError> for Status {
    fn from(e: OpError) -> Self {
        let msg = e.to_string();
        match e {
            OpError::InvalidFleet(_) | OpError::Drain(_) => Status::invalid_argument(msg),
            OpError::NoFleet | OpError::GenerationMismatch { .. } => {
                Status::failed_precondition(msg)
            }
            OpError::NotDrained(_) => Status::not_found(msg),
            OpError::State(_) | OpError::Stopped => Status::unavailable(msg),
        }
    }
}

/// The acting identity of a request. Until authentication exists, this is
/// the name the client claims.
pub(crate) fn intent(actor: Option<pb::Actor>, reason: String) -> Intent {
    let actor = actor
        .map(|a| a.name)
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    Intent { actor, reason }
}

pub(crate) fn weights(ws: &[EdgeWeight]) -> Vec<pb::EdgeWeight> {
    ws.iter()
        .map(|w| pb::EdgeWeight {
            edge: w.edge.to_string(),
            weight: w.weight,
        })
        .collect()
}

pub(crate) fn row_changes(changes: &[RowChange]) -> Vec<pb::RoutingChange> {
    changes
        .iter()
        .map(|c| pb::RoutingChange {
            service: c.service.to_string(),
            group: c.group.to_string(),
            before: weights(&c.before),
            after: weights(&c.after),
            unserved_before: c.unserved_before,
            unserved_after: c.unserved_after,
        })
        .collect()
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

/// Versions before/after of an outcome.
pub(crate) fn versions(o: &Outcome) -> (u64, u64) {
    (o.version_before, o.version_after)
}
