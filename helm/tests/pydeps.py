"""Installs the pinned Python tools of the chart checks (requirements.txt) into the Cargo target directory.

Idempotent and safe under concurrent test processes: one process installs under an exclusive file lock into a
fresh directory and renames it into place; a marker holding the requirements' hash says the copy is complete and
current. Nothing is installed outside the target directory.
"""

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

REQUIREMENTS = Path(__file__).with_name("requirements.txt")
REPO = Path(__file__).resolve().parents[2]


def target_dir() -> Path:
    return Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")


def ensure() -> None:
    """Puts the pinned packages on sys.path, installing them first if needed."""
    if sys.version_info < (3, 10):
        sys.exit(f"the chart checks need Python 3.10 or newer (this is {sys.version.split()[0]})")
    root = target_dir()
    root.mkdir(parents=True, exist_ok=True)
    wanted = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    site = root / "helm-python"
    marker = site / ".requirements-sha256"
    if not (marker.exists() and marker.read_text() == wanted):
        with open(root / "helm-python.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (marker.exists() and marker.read_text() == wanted):
                install(site, marker, wanted)
    sys.path.insert(0, str(site))


def install(site: Path, marker: Path, wanted: str) -> None:
    fresh = site.with_name(f"helm-python.{os.getpid()}")
    shutil.rmtree(fresh, ignore_errors=True)
    command = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--quiet",
               "--target", str(fresh), "-r", str(REQUIREMENTS)]
    print(f"installing the chart tools: {' '.join(command)}", file=sys.stderr)
    result = subprocess.run(command)
    if result.returncode != 0:
        shutil.rmtree(fresh, ignore_errors=True)
        sys.exit(f"pip could not install {REQUIREMENTS} (exit {result.returncode}); is PyPI reachable?")
    (fresh / marker.name).write_text(wanted)
    shutil.rmtree(site, ignore_errors=True)
    fresh.rename(site)
