//! `buf curl`, the stand-in for grpcurl in tests: the `@bufbuild/buf` that `examples/setup.sh` pins and installs
//! (with the rest of the client tooling) into `target/polyglot/`. The script is idempotent and serialises concurrent
//! callers on a lock file, so every test process of the workspace shares one install.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

/// The `buf` executable, installed if needed. Blocks (call it from `spawn_blocking`).
pub fn install() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root");
    let cache = repo.join("target/polyglot");
    let output = Command::new("bash")
        .arg(repo.join("examples/setup.sh"))
        .env("JOBBROKER_POLYGLOT_DIR", &cache)
        .output()
        .expect("running examples/setup.sh (needs bash, python3 and node with npm)");
    assert!(
        output.status.success(),
        "examples/setup.sh failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    cache.join("buf/node_modules/.bin/buf")
}

/// Runs `buf curl --protocol grpc --http2-prior-knowledge ARGS…`.
pub async fn curl(buf: &Path, args: &[String]) -> Output {
    let mut command = tokio::process::Command::new(buf);
    command.args(["curl", "--protocol", "grpc", "--http2-prior-knowledge"]).args(args);
    command.output().await.expect("running buf curl")
}
