//! `buf curl`, the stand-in for grpcurl in tests: the `@bufbuild/buf` that `examples/setup.sh` pins and installs
//! (with the rest of the client tooling) into `target/polyglot/`. The script is idempotent and serialises concurrent
//! callers on a lock file, so every test process of the workspace shares one install.

use std::{
    path::{Path, PathBuf},
    process::Output,
};

#[path = "../../../broker/tests/common/polyglot.rs"]
mod polyglot;

/// The `buf` executable, installed if needed. Blocks (call it from `spawn_blocking`).
pub fn install() -> PathBuf {
    polyglot::install().join("buf/node_modules/.bin/buf")
}

/// Runs `buf curl --protocol grpc --http2-prior-knowledge ARGS…`.
pub async fn curl(buf: &Path, args: &[String]) -> Output {
    let mut command = tokio::process::Command::new(buf);
    command.args(["curl", "--protocol", "grpc", "--http2-prior-knowledge"]).args(args);
    command.output().await.expect("running buf curl")
}
