//! `buf curl`, the stand-in for grpcurl in tests: `@bufbuild/buf` at a pinned version, installed with npm into
//! `target/tmp` on first use. Test processes racing to install it are serialised by a file lock; the install goes to
//! a scratch directory that is renamed into place only once complete, so a killed install leaves nothing half-done.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Command, Output},
};

const BUF_VERSION: &str = "1.75.0";

/// The `buf` executable, installed if needed. Blocks (call it from `spawn_blocking`).
pub fn install() -> PathBuf {
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let home = cache.join(format!("buf-{BUF_VERSION}"));
    let bin = home.join("node_modules/.bin/buf");
    if bin.exists() {
        return bin;
    }
    std::fs::create_dir_all(cache).expect("creating target/tmp");
    let lock = File::create(cache.join(format!("buf-{BUF_VERSION}.lock"))).expect("creating the install lock");
    lock.lock().expect("locking the buf install");
    if bin.exists() {
        return bin; // another process installed it while we waited
    }
    // Ours alone while we hold the lock; whatever is there was left by an install that was killed.
    let scratch = cache.join(format!("buf-{BUF_VERSION}.installing"));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).expect("creating the install directory");
    let status = Command::new("npm")
        .args(["install", "--no-save", "--no-audit", "--no-fund", "--loglevel=error", "--prefix"])
        .arg(&scratch)
        .arg(format!("@bufbuild/buf@{BUF_VERSION}"))
        .status()
        .expect("running npm (Node.js must be installed)");
    assert!(status.success(), "npm install @bufbuild/buf@{BUF_VERSION} failed");
    std::fs::rename(&scratch, &home).expect("moving the buf install into place");
    bin
}

/// Runs `buf curl --protocol grpc --http2-prior-knowledge ARGS…`.
pub async fn curl(buf: &Path, args: &[String]) -> Output {
    let mut command = tokio::process::Command::new(buf);
    command.args(["curl", "--protocol", "grpc", "--http2-prior-knowledge"]).args(args);
    command.output().await.expect("running buf curl")
}
