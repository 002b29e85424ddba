//! Sextant's brain: the fleet model and the decision logic.
//!
//! Everything here is pure and deterministic: functions take state and a
//! time (`now_ms`) and return a decision. Nothing reads a clock, a socket or
//! the store (DESIGN.md, principle 1); the control plane and the simulator are
//! shells around this crate. Collections that are iterated are `BTreeMap`s so
//! that no hash order leaks into a decision.

#![forbid(unsafe_code)]

pub mod diff;
pub mod domain;
pub mod drain;
pub mod fleet;
pub mod ids;
pub mod routing;
pub mod signals;
pub mod solver;

pub use domain::{DomainKind, DomainPath};
pub use drain::{Drain, DrainSet};
pub use fleet::{Fleet, FleetSpec};
pub use ids::{ConfigVersion, EdgeId, GroupId, OriginId, ServiceId};
pub use routing::{GroupRouting, Routing, RoutingTable};
