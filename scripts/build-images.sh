#!/usr/bin/env bash
# Builds cellfleet's container images with buildah, from Debian packages (mmdebstrap) and the packaged
# binaries (scripts/package.sh). No container registry or base image is needed: only Debian's package
# repository. Run it on your own machines too; push the images with `podman push IMAGE REGISTRY/...`.
#
#   scripts/build-images.sh [--bin-dir DIR] [--tag TAG] [--cuda]
#
#   localhost/cellfleet/coordinator:TAG   the control plane on a minimal Debian 12 (links no libtorch)
#   localhost/cellfleet/worker:TAG        the CLI and worker, CPU: libtorch's CPU libraries from the pinned
#                                         PyTorch wheel (found through python3), HDF5 and Gloo from Debian
#   localhost/cellfleet/worker-cuda:TAG   with --cuda: all of the wheel's torch/lib and its NVIDIA
#                                         libraries (CUDA, cuDNN, NCCL), for GPU nodes (several GB)
#
# Debian root filesystems are cached in ~/.cache/cellfleet/images by package list (about 1 minute each
# the first time). TAG defaults to the crate version.
set -euo pipefail
cd "$(dirname "$0")/.."
bin_dir=target/release
tag=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
cuda=
while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) bin_dir=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --cuda) cuda=1; shift ;;
    *) echo "usage: scripts/build-images.sh [--bin-dir DIR] [--tag TAG] [--cuda]" >&2; exit 2 ;;
  esac
done
say() { printf '\033[1m[images]\033[0m %s\n' "$*" >&2; }
for tool in mmdebstrap buildah patchelf; do
  command -v "$tool" >/dev/null 2>&1 || { say "$tool is missing: Debian packages mmdebstrap, buildah, patchelf"; exit 1; }
done
cache=${XDG_CACHE_HOME:-$HOME/.cache}/cellfleet/images
mkdir -p "$cache"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# A Debian 12 root filesystem with PACKAGES, cached by the package list.
rootfs() {
  local name=$1 packages=$2 key tar
  key=$(printf 'bookworm minbase %s' "$packages" | sha256sum | cut -c1-16)
  tar="$cache/$name-$key.tar"
  if [ ! -f "$tar" ]; then
    say "Debian 12 root filesystem for $name ($packages)"
    # --format: mmdebstrap otherwise reads the format from the file name, and .partial would be a folder.
    mmdebstrap --quiet --variant=minbase --format=tar --include="$packages" \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' bookworm "$tar.partial"
    mv "$tar.partial" "$tar"
  fi
  echo "$tar"
}

if [ -n "$cuda" ] && ! grep -q libnccl "$bin_dir/cellfleet"; then
  say "$bin_dir/cellfleet has no NCCL support: cargo build --release --features cuda first"
  exit 1
fi
scripts/package.sh --bin-dir "$bin_dir" --out "$work/dist" 2>/dev/null
dist=$work/dist

image() {
  local name=$1 base=$2
  shift 2
  local c
  c=$(buildah from scratch)
  buildah add --quiet "$c" "$base" / >/dev/null
  "$@" "$c"
  buildah config --label org.opencontainers.image.title="cellfleet $name" \
    --label org.opencontainers.image.version="$tag" --env CELLFLEET_QUIET=1 "$c"
  buildah commit --quiet --rm "$c" "localhost/cellfleet/$name:$tag" >/dev/null
  say "built localhost/cellfleet/$name:$tag"
}

coordinator_files() {
  buildah copy --quiet "$1" "$dist/bin/cellfleet-coordinator" /usr/local/bin/ >/dev/null
  # Nobody: the coordinator needs no privileges.
  buildah config --user 65534:65534 --entrypoint '["/usr/local/bin/cellfleet-coordinator"]' \
    --port 7070 --port 9464 "$1"
}
image coordinator "$(rootfs coordinator ca-certificates)" coordinator_files

# libtorch from the pinned wheel (the one the binary was built against).
torch_lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
site=$(dirname "$(dirname "$torch_lib")")
bundle=$work/torch
mkdir -p "$bundle"
for lib in libtorch_cpu.so libc10.so libtorch.so libtorch_global_deps.so libgomp.so.1 libshm.so; do
  cp -L "$torch_lib/$lib" "$bundle/"
done
# A CUDA wheel's libtorch_cpu also needs the CUDA runtime and CUPTI (loaded, never used, on a CPU node).
for lib in libcudart.so.13 libcupti.so.13; do
  found=$(find "$site/nvidia" -name "$lib" 2>/dev/null | head -1 || true)
  if [ -n "$found" ]; then cp -L "$found" "$bundle/"; fi
done
worker_packages=ca-certificates,libhdf5-103-1,libgloo0,libstdc++6
worker_files() {
  buildah copy --quiet "$1" "$dist/bin/cellfleet" "$dist/bin/cellfleet-bin" /usr/local/bin/ >/dev/null
  buildah copy --quiet "$1" "$bundle" /usr/local/lib/cellfleet/torch >/dev/null
  buildah config --entrypoint '["/usr/local/bin/cellfleet"]' --cmd worker --port 9465 "$1"
}
image worker "$(rootfs worker "$worker_packages")" worker_files

if [ -n "$cuda" ]; then
  cuda_files() {
    buildah copy --quiet "$1" "$dist/bin/cellfleet" "$dist/bin/cellfleet-bin" /usr/local/bin/ >/dev/null
    # The whole wheel layout, so that libtorch's own RUNPATHs ($ORIGIN/../../nvidia/...) resolve.
    buildah copy --quiet "$1" "$torch_lib" /usr/local/lib/cellfleet/site/torch/lib >/dev/null
    buildah copy --quiet "$1" "$site/nvidia" /usr/local/lib/cellfleet/site/nvidia >/dev/null
    buildah config --env CELLFLEET_LIBTORCH=/usr/local/lib/cellfleet/site/torch/lib \
      --entrypoint '["/usr/local/bin/cellfleet"]' --cmd worker --port 9465 "$1"
  }
  image worker-cuda "$(rootfs worker "$worker_packages")" cuda_files
fi
