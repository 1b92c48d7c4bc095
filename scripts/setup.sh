#!/usr/bin/env bash
# Installs everything cellfleet needs on a fresh Debian machine. Idempotent: each step checks first, so a
# second run costs seconds. Heavy downloads (the torch wheel) are cached by pip between runs.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# Debian packages: HDF5 for h5ad, protoc for gRPC code generation, pkg-config for -sys crates, Gloo (CPU
# collectives; the worker compiles a small C++ shim against it) and etcd (membership; tests start their own).
DEB_PACKAGES=(pkg-config libhdf5-dev protobuf-compiler g++ libgloo-dev etcd-server)
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
if ! cargo nextest --version >/dev/null 2>&1; then
  say "installing cargo-nextest (test runner)"
  cargo install cargo-nextest --locked --quiet
fi

# Python packages: anndata/h5py/numpy for the independent reference checks in tests and the ingest
# baseline; torch 2.11.0, the libtorch the model links against (tch 0.24 is built for it), and safetensors to
# check that weight files load in PyTorch; pyarrow so tests read screen results the way pandas users do.
PYTHON=${PYTHON:-python3}
py_ok() { "$PYTHON" - <<'PY' 2>/dev/null
import importlib, sys
need = {"numpy": None, "h5py": None, "anndata": None, "safetensors": None, "pyarrow": None, "pandas": None,
        "torch": "2.11.0"}
for mod, version in need.items():
    m = importlib.import_module(mod)
    if version and not m.__version__.startswith(version):
        sys.exit(1)
PY
}
if ! py_ok; then
  say "installing Python packages (numpy, h5py, anndata, safetensors, pyarrow, pandas, torch==2.11.0; the torch download is large but cached)"
  "$PYTHON" -m pip install -q --disable-pip-version-check numpy h5py anndata safetensors pyarrow pandas "torch==2.11.0" 2>&1 | grep -v "Running pip as the 'root' user" || true
  py_ok || { say "Python packages did not install; see the pip output above"; exit 1; }
fi
# Garage, a real S3-compatible server for the object-store tests. A large Rust build (about 10 minutes),
# so it is built once with only the features a single-node test server needs and cached.
TOOLS=${CELLFLEET_TOOLS:-$HOME/.cache/cellfleet/tools}
GARAGE_VERSION=2.5.0
if ! "$TOOLS/bin/garage" --version 2>/dev/null | grep -q "$GARAGE_VERSION"; then
  say "building Garage $GARAGE_VERSION (S3 server for tests; cached in $TOOLS, takes ~10 minutes once)"
  cargo install garage --version "$GARAGE_VERSION" --locked --no-default-features \
    --features bundled-libs,lmdb --root "$TOOLS" --quiet
fi
say "ready"
