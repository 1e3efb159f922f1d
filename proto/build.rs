//! Compiles the contracts with protox (pure Rust, no system `protoc`), generates tonic clients and servers with
//! tonic-prost-build and serde impls (canonical proto JSON) with pbjson-build, and writes the file descriptor set
//! that server reflection serves.

use std::path::PathBuf;

const PROTO_FILES: &[&str] = &[
    "smartfarm/common/v1/common.proto",
    "smartfarm/device/v1/device.proto",
    "smartfarm/ingestion/v1/ingestion.proto",
    "smartfarm/ingestion/v1/telemetry.proto",
    "smartfarm/image/v1/image.proto",
    "smartfarm/inference/v1/inference.proto",
    "smartfarm/alert/v1/alert.proto",
    "smartfarm/command/v1/command.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=smartfarm");

    let file_descriptor_set = protox::compile(PROTO_FILES, ["."])?;
    let descriptor_bytes = prost::Message::encode_to_vec(&file_descriptor_set);
    std::fs::write(out_dir.join("smartfarm_descriptor.bin"), &descriptor_bytes)?;

    tonic_prost_build::configure()
        // Well-known types come from pbjson-types so that they, too, serialise as canonical proto JSON.
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        // The edge link's RPC is called `Connect`, which would collide with the generated `Client::connect(dst)`
        // constructor; clients are built with `Client::new(channel)` instead.
        .build_transport(false)
        .compile_fds(file_descriptor_set)?;

    pbjson_build::Builder::new().register_descriptors(&descriptor_bytes)?.build(&[".smartfarm"])?;
    Ok(())
}
