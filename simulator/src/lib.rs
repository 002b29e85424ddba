//! `sextant-sim`: DR drills and failure scenarios against a model of a
//! fleet, driving the decision code of `sextant-core` with simulated time.
//!
//! Empty for now: it arrives with the simulator issue. Nothing in this crate
//! runs yet.

#![forbid(unsafe_code)]
