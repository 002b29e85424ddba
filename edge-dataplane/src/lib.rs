//! The Sextant data plane: the edge proxy agent (`sextant-edge`) and the
//! GeoDNS server (`sextant-dns`).
//!
//! Empty for now: both arrive with the config-distribution and GeoDNS
//! issues. Nothing in this crate runs yet.

#![forbid(unsafe_code)]
