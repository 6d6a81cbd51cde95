//! Compiles the proto with protox (pure Rust: no system protoc) and tonic's generator, and keeps
//! the descriptor set for gRPC server reflection.
use prost::Message as _;

fn main() -> anyhow::Result<()> {
    let proto = "fulgur/dataplane/v1/dataplane.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["."])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("fulgur_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
