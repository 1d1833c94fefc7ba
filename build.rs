//! Compiles `proto/` into Rust with the pure-Rust `protox` compiler, so `cargo build` needs no system `protoc`.
//! Also writes the encoded descriptor set that the broker serves through gRPC reflection.

use std::{env, fs, path::PathBuf};

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let files = ["jobbroker/v1/job.proto", "jobbroker/v1/broker.proto", "jobbroker/v1/admin.proto"];
    let descriptors = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("jobbroker_descriptor.bin"), descriptors.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
