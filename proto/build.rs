//! Generates the tonic/prost code for `proto/*.proto` (needs `protoc`, which the set-up script installs).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/cellfleet.proto");
    tonic_prost_build::configure().compile_protos(&["proto/cellfleet.proto"], &["proto"])?;
    Ok(())
}
