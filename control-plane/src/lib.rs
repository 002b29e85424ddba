//! The Sextant control plane: the server (`sextant-cp`) and the operator
//! CLI (`sextantctl`) as a library; the binaries only parse arguments and
//! call [`server::run`] or [`cli::run`].
//!
//! Layout: [`state`] is how state sits in the store; [`control_loop`] is the
//! one owner of change; [`grpc`] converts between the wire contract and the
//! model; [`auth`] says who may do what; [`metrics`] exposes Prometheus text.

#![forbid(unsafe_code)]

pub mod audit;
pub mod auth;
pub mod blocking;
pub mod bmp;
pub mod cli;
pub mod cluster;
pub mod control_loop;
pub mod grpc;
pub mod inbox;
pub mod metrics;
pub mod push;
pub mod server;
pub mod state;
pub mod timefmt;
pub mod workflow;
