#!/usr/bin/env bash
# Lays out cellfleet for installing on other machines (a Slurm node, a GPU host, a container image):
#
#   OUT/bin/cellfleet               the launcher: finds this machine's libtorch, then runs cellfleet-bin
#   OUT/bin/cellfleet-bin           the CLI and worker, with no build machine's path (RUNPATH $ORIGIN-relative)
#   OUT/bin/cellfleet-coordinator   the control plane alone (links no libtorch)
#
#   scripts/package.sh [--out DIR] [--bin-dir DIR]    (default: dist/cellfleet from target/release)
#
# Run-time needs on the target: glibc >= Debian 12's, libhdf5 (Debian libhdf5-103-1), libgloo (libgloo0),
# and PyTorch 2.11.0 (pip), or a libtorch directory named by CELLFLEET_LIBTORCH.
set -euo pipefail
cd "$(dirname "$0")/.."
out=dist/cellfleet
bin_dir=target/release
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --bin-dir) bin_dir=$2; shift 2 ;;
    *) echo "usage: scripts/package.sh [--out DIR] [--bin-dir DIR]" >&2; exit 2 ;;
  esac
done
command -v patchelf >/dev/null 2>&1 || { echo "patchelf is needed (Debian package patchelf)" >&2; exit 1; }
for b in cellfleet cellfleet-coordinator; do
  [ -x "$bin_dir/$b" ] || { echo "$bin_dir/$b is missing: cargo build --release first" >&2; exit 1; }
done
mkdir -p "$out/bin" "$out/lib/cellfleet"
install -m 0755 "$bin_dir/cellfleet" "$out/bin/cellfleet-bin"
install -m 0755 "$bin_dir/cellfleet-coordinator" "$out/bin/cellfleet-coordinator"
install -m 0755 deploy/cellfleet-launcher "$out/bin/cellfleet"
# The build machine's torch directory out, a bundle beside the binary in: libtorch otherwise comes
# through the launcher's LD_LIBRARY_PATH.
# shellcheck disable=SC2016 # $ORIGIN is for the dynamic loader, not the shell
patchelf --set-rpath '$ORIGIN/../lib/cellfleet/torch' "$out/bin/cellfleet-bin"
echo "packaged into $out" >&2
