#!/usr/bin/env bash
# Installs the pinned tooling of the Python and Node examples (and of their tests) into one cache directory,
# $JOBBROKER_POLYGLOT_DIR (default: <repo>/target/polyglot):
#
#   python/venv         a venv with examples/python/requirements.txt (exact pins, from PyPI)
#   python/stubs        Python stubs generated from proto/ with grpcio-tools; a .pth file puts them on the venv's path
#   node/node_modules   `npm ci` of examples/node/package-lock.json (from npm)
#   buf/                @bufbuild/buf $BUF_VERSION, for `buf lint`
#   env.sh              `. target/polyglot/env.sh` puts the venv's python, buf and the Node modules on your paths
#
# Needs python3 (3.9+, with venv) and node (18.3+, with npm) on PATH. Idempotent: a stamp records a hash of the pins,
# the protos and this script, and a second run with the same inputs does nothing. Several processes may call it at
# once: they queue on a lock file, and the later ones find the work done.
set -euo pipefail

BUF_VERSION=1.75.0

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${JOBBROKER_POLYGLOT_DIR:-$repo/target/polyglot}"
mkdir -p "$cache"
cache="$(cd "$cache" && pwd)"

exec 9>"$cache/.lock"
flock 9

cd "$repo"
protos=$(find proto -name '*.proto' | sort)
stamp=$({
    echo "$BUF_VERSION"
    python3 --version
    node --version
    cat "${BASH_SOURCE[0]}" examples/python/requirements.txt examples/node/package-lock.json $protos
} | sha256sum | cut -d' ' -f1)
if [[ -f "$cache/.stamp" && "$(cat "$cache/.stamp")" == "$stamp" ]]; then
    exit 0
fi
rm -f "$cache/.stamp"
echo "setting up client tooling in $cache" >&2

# Python: a fresh venv with exactly the pinned packages.
rm -rf "$cache/python"
python3 -m venv "$cache/python/venv"
py="$cache/python/venv/bin/python"
"$py" -m pip install --quiet --disable-pip-version-check --no-input -r examples/python/requirements.txt

# Stubs for `import jobbroker.v1.broker_pb2` (python -m grpc_tools.protoc adds the well-known types' include path).
mkdir -p "$cache/python/stubs"
# shellcheck disable=SC2086 # one argument per proto file
"$py" -m grpc_tools.protoc -I proto --python_out="$cache/python/stubs" --pyi_out="$cache/python/stubs" \
    --grpc_python_out="$cache/python/stubs" $protos
echo "$cache/python/stubs" >"$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/jobbroker-stubs.pth"

# Node: exactly the lock file's packages. Install scripts are not needed by any of them, so none run.
rm -rf "$cache/node"
mkdir -p "$cache/node"
cp examples/node/package.json examples/node/package-lock.json "$cache/node/"
(cd "$cache/node" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >&2)

# buf: its npm package pins its platform binaries to the same exact version.
rm -rf "$cache/buf"
mkdir -p "$cache/buf"
npm install --prefix "$cache/buf" --ignore-scripts --no-save --no-package-lock --no-audit --no-fund \
    --loglevel=error "@bufbuild/buf@$BUF_VERSION" >&2

cat >"$cache/env.sh" <<EOF
# Source me: . $cache/env.sh
export PATH="$cache/python/venv/bin:$cache/buf/node_modules/.bin:\$PATH"
export NODE_PATH="$cache/node/node_modules"
EOF

echo "$stamp" >"$cache/.stamp"
echo "client tooling ready: . $cache/env.sh" >&2
