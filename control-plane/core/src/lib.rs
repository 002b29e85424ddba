//! Sextant's brain: the fleet model and the decision logic.
//!
//! - [`fleet`]: the fleet file, its checks, steering policies;
//! - [`signals`], [`drain`]: what the solver is told about edges;
//! - [`solver`]: the routing decision (min-cost flow by network simplex);
//! - [`explain`]: why each weight is what it is;
//! - [`n_minus_one`]: what losing a region or provider would do;
//! - [`diff`]: what a change moves;
//! - [`lpm`]: longest-prefix match over client prefixes (GeoDNS, BGP);
//! - [`timefmt`]: RFC 3339 times.
//!
//! Everything here is pure and deterministic: functions take state and a
//! time (`now_ms`) and return a decision. Nothing reads a clock, a socket or
//! the store (DESIGN.md, principle 1); the control plane and the simulator are
//! shells around this crate. Collections that are iterated are `BTreeMap`s so
//! that no hash order leaks into a decision.

#![forbid(unsafe_code)]

pub mod automation;
pub mod diff;
pub mod domain;
pub mod drain;
pub mod drill;
pub mod explain;
pub mod failover;
pub mod fleet;
pub mod health;
pub mod ids;
pub mod impact;
pub mod lpm;
pub mod n_minus_one;
pub mod operate;
pub mod routing;
pub mod schedule;
pub mod signals;
pub mod solver;
pub mod timefmt;

pub use domain::{DomainKind, DomainPath};
pub use drain::{Drain, DrainSet};
pub use fleet::{Fleet, FleetSpec};
pub use ids::{ConfigVersion, EdgeId, GroupId, OriginId, ServiceId};
pub use routing::{GroupRouting, Routing, RoutingTable};
