//! The Sextant data plane.
//!
//! - `sextant-edge`, the edge proxy agent: subscribes to the control
//!   plane's config stream ([`subscriber`]), forwards HTTP to origins by the
//!   pushed weights ([`proxy`], [`upstream`]), reports its load
//!   ([`reporter`]) and serves `/healthz` and `/metrics` ([`admin`]).
//! - `sextant-dns` (GeoDNS) arrives with its own issue and will share the
//!   subscriber.

#![forbid(unsafe_code)]

pub mod admin;
pub mod edge;
pub mod proxy;
pub mod reporter;
pub mod subscriber;
pub mod upstream;
