//! BGP inputs of the control plane, as pure decoders (no sockets, no
//! clock): [`rib`] turns an MRT RIB dump (TABLE_DUMP_V2) into a prefix →
//! origin ASN map with longest-prefix lookup; [`bmp`] turns a BMP
//! (RFC 7854) byte stream into route events. Both refuse malformed input
//! with an error that says where, and never panic on it. [`synth`] writes
//! synthetic dumps for benches and tests.

pub mod bmp;
pub mod rib;
pub mod synth;
