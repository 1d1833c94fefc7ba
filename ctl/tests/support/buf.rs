//! `buf curl`, the stand-in for grpcurl in tests: `@bufbuild/buf` at a pinned version, installed with npm into
//! `target/tmp` on first use. Test processes racing to install it are serialised by a file lock; the install goes to
//! a scratch directory that is renamed into place only once complete, so a killed install leaves nothing half-done.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;

const BUF_VERSION: &str = "1.75.0";

/// The `buf` executable, installed if needed.
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
    let scratch = cache.join(format!("buf-{BUF_VERSION}.installing-{}", std::process::id()));
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

/// `buf curl` over plaintext HTTP/2 with reflection (no proto files): `ARGS…` then `url`. Returns stdout after
/// asserting success.
pub fn curl(buf: &Path, args: &[&str], url: &str) -> String {
    let output = Command::new(buf)
        .args(["curl", "--protocol", "grpc", "--http2-prior-knowledge"])
        .args(args)
        .arg(url)
        .output()
        .expect("running buf curl");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "buf curl {args:?} {url} failed: {stderr}{stdout}");
    stdout
}

/// Calls `method` (`jobbroker.v1.AdminService/PauseQueue`) with the JSON `body`; returns the JSON answer.
pub fn call(buf: &Path, base: &str, method: &str, body: &Value) -> Value {
    let stdout = curl(buf, &["--data", &body.to_string()], &format!("{base}/{method}"));
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{method} answered no JSON ({e}): {stdout}"))
}
