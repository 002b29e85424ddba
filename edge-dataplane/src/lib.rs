//! The Sextant data plane.
//!
//! - `sextant-edge`, the edge proxy agent: subscribes to the control
//!   plane's config stream ([`subscriber`]), forwards HTTP to origins by the
//!   pushed weights ([`proxy`], [`upstream`]), reports its load
//!   ([`reporter`]) and serves `/healthz` and `/metrics` ([`admin`]).
//! - `sextant-dns`, the GeoDNS server ([`dns`]): the same subscriber, an
//!   authoritative server over UDP (fast path) and TCP (hickory-server)
//!   steering each query by client subnet and the pushed weights.
//! - `sextant-probe`, the active health prober ([`probe`]): probes every
//!   edge's health check from one vantage point each interval and streams
//!   the results to the control plane.

#![forbid(unsafe_code)]

pub mod access;
pub mod admin;
pub mod dns;
pub mod edge;
pub mod h1;
pub mod h1proxy;
pub mod probe;
pub mod process;
pub mod proxy;
pub mod reporter;
pub mod subscriber;
mod tunnel;
pub mod upstream;
