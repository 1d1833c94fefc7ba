//! The client tooling `examples/setup.sh` pins and installs into `target/polyglot/` (Python with grpcio, Node with
//! @grpc/grpc-js, and `buf`), shared by every test crate that drives a real client. The script is quick when nothing
//! changed and serialises concurrent callers on a lock file, so every test process shares one install.

use std::path::{Path, PathBuf};

/// Runs `examples/setup.sh` (blocking) and returns the directory it installed into.
pub fn install() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root");
    let cache = repo.join("target/polyglot");
    let output = std::process::Command::new("bash")
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
    cache
}
