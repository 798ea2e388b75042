//! Generates the order.v1 gRPC code from `../proto` with the vendored `protoc`, so building
//! needs no system protobuf compiler.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("..");
    let proto_dir = root.join("proto");
    let proto = proto_dir.join("order/v1/order.proto");
    println!("cargo:rerun-if-changed={}", proto.display());

    let protoc = protoc_bin_vendored::protoc_bin_path()
        .map_err(|e| format!("the vendored protoc is not available for this platform: {e}"))?;
    let include = protoc_bin_vendored::include_path()
        .map_err(|e| format!("the vendored protobuf includes are missing: {e}"))?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_with_config(config, &[proto], &[proto_dir, include])?;
    Ok(())
}
