//! Generates the `sextant.v1` code with a vendored protoc, so that building
//! needs nothing but the Rust toolchain.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "sextant/v1/common.proto",
    "sextant/v1/fleet.proto",
    "sextant/v1/steering.proto",
    "sextant/v1/operations.proto",
    "sextant/v1/signals.proto",
    "sextant/v1/distribution.proto",
    "sextant/v1/cluster.proto",
    "sextant/v1/bgp.proto",
    "sextant/v1/tokens.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // Build scripts are single-threaded; tonic-prost-build reads PROTOC.
    std::env::set_var("PROTOC", protoc);
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        // Shared, reference-counted bytes: one encoding, many subscribers.
        .bytes(".sextant.v1.ConfigUpdate.config_bytes")
        .bytes(".sextant.v1.AsnPrefixes")
        .file_descriptor_set_path(out.join("sextant_v1_descriptor.bin"))
        .compile_protos(PROTOS, &["."])?;
    Ok(())
}
