//! Generates Rust types (prost), their protobuf-JSON serde impls (pbjson) and the
//! gRPC clients (tonic) from proto/.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "pymesh/config/v1/proxy.proto",
    "pymesh/mesh/v1/discovery.proto",
    "pymesh/mesh/v1/identity.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptors = out.join("descriptors.bin");
    // A vendored protoc keeps the build free of system packages.
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);

    let files: Vec<PathBuf> = PROTOS.iter().map(|p| root.join(p)).collect();
    let mut prost = prost_build::Config::new();
    prost
        .file_descriptor_set_path(&descriptors)
        .compile_well_known_types()
        .extern_path(".google.protobuf", "::pbjson_types");
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_with_config(prost, &files, std::slice::from_ref(&root))?;

    let set = std::fs::read(&descriptors)?;
    pbjson_build::Builder::new()
        .register_descriptors(&set)?
        .build(&[".pymesh"])?;

    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    Ok(())
}
