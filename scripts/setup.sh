#!/usr/bin/env bash
# Installs what cellfleet needs on a fresh Debian machine.
#
#   scripts/setup.sh              what running needs: building `cellfleet`, the main job, `cellfleet bench`
#   scripts/setup.sh --for-tests  that, plus what only the tests need: etcd, cargo-nextest, the Python
#                                 packages of the reference checks and Garage (an S3 server, built once)
#
# Idempotent: each step checks first, so a second run costs seconds. Heavy downloads (the torch wheel) are
# cached by pip between runs, the Garage build in ~/.cache/cellfleet/tools.
set -euo pipefail
cd "$(dirname "$0")/.."

for_tests=
case "${1:-}" in
  "") ;;
  --for-tests) for_tests=1 ;;
  *) echo "usage: scripts/setup.sh [--for-tests]" >&2; exit 2 ;;
esac

say() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# Debian packages: HDF5 for h5ad, protoc for gRPC code generation, pkg-config for -sys crates, Gloo (CPU
# collectives; the worker compiles a small C++ shim against it). Tests add etcd-server (membership; they
# start their own etcd; the embedded default keeps membership in memory).
DEB_PACKAGES=(pkg-config libhdf5-dev protobuf-compiler g++ libgloo-dev)
if [ -n "$for_tests" ]; then DEB_PACKAGES+=(etcd-server); fi
missing=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Rust toolchain: must already be on the machine (nothing else can fetch one here).
if ! command -v cargo >/dev/null 2>&1; then
  [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || { say "cargo not found: install a Rust toolchain (rustup) first"; exit 1; }
if [ -n "$for_tests" ] && ! cargo nextest --version >/dev/null 2>&1; then
  say "installing cargo-nextest (test runner)"
  cargo install cargo-nextest --locked --quiet
fi

# Python packages, as "module" or "module==version" (the pip name is the module name). For running: torch
# 2.11.0, the libtorch the model links against (tch 0.24 is built for it); anndata, numpy and scipy for
# the main job's vocabulary choice and the ingest baseline; safetensors for the screen baseline. For tests:
# h5py to write test inputs, pandas and pyarrow to read screen results the way pandas users do.
PYTHON=${PYTHON:-python3}
PY_PACKAGES=(numpy scipy anndata safetensors "torch==2.11.0")
if [ -n "$for_tests" ]; then PY_PACKAGES+=(h5py pandas pyarrow); fi
py_ok() { "$PYTHON" - "${PY_PACKAGES[@]}" <<'PY' 2>/dev/null
import importlib, sys
for package in sys.argv[1:]:
    module, _, version = package.partition("==")
    m = importlib.import_module(module)
    if version and not m.__version__.startswith(version):
        sys.exit(1)
PY
}
if ! py_ok; then
  say "installing Python packages (${PY_PACKAGES[*]}; the torch download is large but cached)"
  "$PYTHON" -m pip install -q --disable-pip-version-check "${PY_PACKAGES[@]}" 2>&1 | grep -v "Running pip as the 'root' user" || true
  py_ok || { say "Python packages did not install; see the pip output above"; exit 1; }
fi

# Garage, a real S3-compatible server for the object-store tests (and scripts/bench-ckpt.sh). A large Rust
# build (about 10 minutes), so it is built once with only the features a single-node test server needs and
# cached.
if [ -n "$for_tests" ]; then
  TOOLS=${CELLFLEET_TOOLS:-$HOME/.cache/cellfleet/tools}
  GARAGE_VERSION=2.5.0
  if ! "$TOOLS/bin/garage" --version 2>/dev/null | grep -q "$GARAGE_VERSION"; then
    say "building Garage $GARAGE_VERSION (S3 server for tests; cached in $TOOLS, takes ~10 minutes once)"
    cargo install garage --version "$GARAGE_VERSION" --locked --no-default-features \
      --features bundled-libs,lmdb --root "$TOOLS" --quiet
  fi
fi
say "ready${for_tests:+ (with the test tools)}"
