#!/usr/bin/env bash
# The GPU check, in two halves, for a CUDA host that has PyTorch 2.11 but no Rust toolchain and no
# network (never part of CI):
#
#   bash scripts/gpu-check.sh pack [DIR]   # here: build with --features cuda and pack what the host needs
#   bash scripts/gpu-check.sh run  [DIR]   # there: run every check, print one table, exit non-zero on a failure
#
# DIR (default gpu-check/, git-ignored) holds the binary (64 MiB at most), the PyTorch baseline script,
# a 4,096-gene SYNTHETIC corpus resampled from real Kang cells, and a small Kang model with its corpus for a
# screen. `run` writes its logs and the table to $OUT when set (the device tool's output folder), else DIR.
#
# The checks: NCCL through PyTorch and alone (scripts/gpu/, controls), then cellfleet's single-rank
# NCCL all-reduce in each communicator mode and a communicator that must abort when its peer never
# comes; a CUDA pretraining run in bf16 in the expressed layout; `bench train` against eager PyTorch on
# the same GPU (bf16 autocast) in the expressed layout, and the full layout for the layout ratio; a
# small knockout screen on a GPU worker, and a 4,096-gene one on the model just trained.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
dir=${2:-gpu-check}

pack() {
  bash scripts/setup.sh
  export CELLFLEET_QUIET=1
  cargo build --release --features cuda -p cellfleet-worker
  rm -rf "$dir" && mkdir -p "$dir/bench"
  cp "${CARGO_TARGET_DIR:-target}/release/cellfleet" "$dir/cellfleet"
  strip "$dir/cellfleet"
  cp bench/train_baseline.py "$dir/bench/"
  local size
  size=$(stat -c %s "$dir/cellfleet")
  if (( size > 60 * 1024 * 1024 )); then
    echo "the stripped binary is $size bytes, over the carry limit" >&2
    exit 1
  fi
  local data=${CELLFLEET_DATA:-../shared/data}
  "$dir/cellfleet" synth --cells 4000 --from "$data/kang_ifnb_pbmc.h5ad" --hvg 4096 --label-col condition \
    --out "$dir/synth4k" --threads 2
  # A Kang model for the screen: 256 most expressed genes, tiny preset, expressed layout.
  python3 scripts/top_expressed.py "$data/kang_ifnb_pbmc.h5ad" 256 > "$dir/genes.txt"
  "$dir/cellfleet" ingest "$data/kang_ifnb_pbmc.h5ad" --out "$dir/kang-corpus" --genes "$dir/genes.txt" \
    --label-col condition --label-col cell_type
  "$dir/cellfleet" train --corpus "$dir/kang-corpus" --local --preset tiny --layout expressed --steps 300 \
    --batch-size 32 --lr 3e-3 --threads 2 --out "$dir/kang-model" --checkpoint "$dir/kang-ckpt"
  cat > "$dir/screen.toml" <<'TOML'
checkpoint = "./kang-ckpt"
corpus = "./kang-corpus"
out = "./screen-out"
seed = 0
genes = "all"
[perturbation]
kind = "knockout"
[cells]
filter = { condition = "stimulated" }
max_cells = 40
[goal]
column = "condition"
value = "control"
max_cells = 40
[null]
genes = 20
[execution]
gene_block = 64
cell_block = 40
batch = 256
TOML
  du -sh "$dir"
  echo "packed $dir; on the GPU host: bash scripts/gpu-check.sh run $dir"
}

# The host's PyTorch libraries on the loader path, for the binary built here (sets $site too).
device_env() {
  local torch_lib
  torch_lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
  site=$(dirname "$(dirname "$torch_lib")")
  # libtorch from the host's PyTorch, and the NCCL / CUDA runtime wheels beside it.
  local extra
  extra=$(ls -d "$site"/nvidia/*/lib "$site"/nvidia/cu*/lib 2>/dev/null | sort -u | paste -sd:)
  # cudarc looks for libnccl.so; the wheel ships libnccl.so.2, the copy libtorch links. Without this
  # link cudarc may open another NCCL, which cellfleet refuses (NCCL_LINK=0 shows that).
  local nccl_link
  nccl_link=$(mktemp -d)
  if [[ "${NCCL_LINK:-1}" != 0 && -f "$site/nvidia/nccl/lib/libnccl.so.2" ]]; then
    ln -sf "$site/nvidia/nccl/lib/libnccl.so.2" "$nccl_link/libnccl.so"
  fi
  export LD_LIBRARY_PATH="$torch_lib:$extra:$nccl_link:${LD_LIBRARY_PATH:-}"
  # The binary was linked on a machine without libtorch_cuda; preloading it registers the CUDA backend
  # (otherwise libtorch sees 0 CUDA devices).
  if [[ -f "$torch_lib/libtorch_cuda.so" ]]; then
    export LD_PRELOAD="$torch_lib/libtorch_cuda.so${LD_PRELOAD:+:$LD_PRELOAD}"
  fi
  export CELLFLEET_QUIET=1
}

run() {
  # Logs go to one folder; with $OUT set (the device tool's output folder, which takes few files) they
  # come back as one archive beside the table.
  local out=${OUT:-$dir}
  local logs=$out
  if [[ -n "${OUT:-}" ]]; then
    logs=$(mktemp -d)
  fi
  mkdir -p "$out" "$logs"
  device_env
  local bin
  bin=$(realpath "$dir/cellfleet")
  chmod +x "$bin"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
  local failed=0
  step() {
    local name=$1
    shift
    echo "== $name" | tee -a "$out/table.txt"
    local t0=$SECONDS
    if "$@" > "$logs/$name.log" 2>&1; then
      echo "   ok in $((SECONDS - t0)) s" | tee -a "$out/table.txt"
    else
      echo "   FAILED (exit $?) in $((SECONDS - t0)) s; tail of $name.log:" | tee -a "$out/table.txt"
      failed=1
    fi
    tail -n "${TAIL:-12}" "$logs/$name.log" | sed 's/^/   /' | tee -a "$out/table.txt"
  }
  # NCCL first: PyTorch's own path and NCCL alone as controls, then cellfleet's, with NCCL's own log.
  step nccl-torch bash -c "python3 scripts/gpu/nccl_torch_control.py process-group \
    && python3 scripts/gpu/nccl_torch_control.py process-group --non-blocking \
    && python3 scripts/gpu/nccl_torch_control.py direct"
  step nccl-probe bash -c "nvcc -O2 -o '$logs/nccl_probe' scripts/gpu/nccl_probe.c -I'$site/nvidia/nccl/include' \
    -L'$site/nvidia/nccl/lib' -l:libnccl.so.2 && '$logs/nccl_probe'"
  NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,COLL,ENV NCCL_DEBUG_FILE="$logs/nccl-debug.%p.txt" TAIL=16 \
    step nccl "$bin" bench nccl-check --device 0 --mib 256 --timeout 5
  step train-cuda-bf16 "$bin" train --corpus "$dir/synth4k" --local --device cuda --preset cellxpert \
    --layout expressed --steps "${TRAIN_STEPS:-60}" --batch-size 64 --threads 4 --out "$logs/train-model" \
    --checkpoint "$logs/train-ckpt"
  TAIL=16 step bench-train "$bin" bench train --corpus "$dir/synth4k" --genes 4096 --preset cellxpert \
    --device cuda --batch-size "${BENCH_BATCH:-128}" --steps "${BENCH_STEPS:-10}" --warmup-steps 3 \
    --rounds "${ROUNDS:-3}" --threads 4
  # A genome-scale screen: every gene of the 4,096 knocked out where expressed, in stimulated cells,
  # on the cellxpert model just trained.
  cat > "$logs/screen-4096.toml" <<TOML
checkpoint = "$logs/train-ckpt"
corpus = "$(realpath "$dir/synth4k")"
out = "$logs/screen-4096-out"
seed = 0
genes = "all"
[perturbation]
kind = "knockout"
[cells]
filter = { condition = "stimulated" }
max_cells = ${SCREEN_CELLS:-64}
[null]
genes = 20
[execution]
gene_block = 4116
cell_block = 16
batch = 256
TOML
  (
    cd "$dir"
    port=$((20000 + RANDOM % 20000))
    "$bin" coordinator --listen "127.0.0.1:$port" > "$logs/coordinator.log" 2>&1 &
    coordinator=$!
    sleep 2
    "$bin" worker --coordinator "http://127.0.0.1:$port" --device cuda:0 > "$logs/worker.log" 2>&1 &
    worker=$!
    sleep 3
    TAIL=6 step screen-cuda timeout 150 "$bin" screen submit screen.toml --coordinator "http://127.0.0.1:$port" --follow
    TAIL=8 step screen-4096 timeout 240 "$bin" screen submit "$logs/screen-4096.toml" \
      --coordinator "http://127.0.0.1:$port" --follow
    kill "$worker" "$coordinator" 2>/dev/null || true
    tail -n 12 "$logs/worker.log" | sed 's/^/   worker: /' | tee -a "$out/table.txt"
    exit $failed
  ) || failed=1
  echo
  echo "GPU check table ($(cat "$out/gpu.txt")):"
  cat "$out/table.txt"
  if [[ "$logs" != "$out" ]]; then
    rm -rf "$logs/train-ckpt" "$logs/train-model" "$logs/screen-4096-out" "$logs/nccl_probe"
    tar czf "$out/logs.tgz" -C "$logs" .
  fi
  return $failed
}

# Only the NCCL libraries this host has and nccl-check, with and without the libnccl.so link.
nccl_only() {
  local bin
  bin=$(realpath "$dir/cellfleet")
  chmod +x "$bin"
  echo "== NCCL libraries on this host"
  { ldconfig -p | grep -i nccl; find / -xdev -name 'libnccl*.so*' 2>/dev/null; } | sort -u | head -20 || true
  echo "== nccl-check with no link (NCCL_LINK=0): cudarc opens whatever libnccl.so the loader finds"
  (NCCL_LINK=0 device_env && "$bin" bench nccl-check --device 0 --mib 256 --timeout 5) || true
  echo "== nccl-check with libnccl.so linked to libtorch's NCCL"
  device_env
  "$bin" bench nccl-check --device 0 --mib 256 --timeout 5
}

case "$mode" in
  pack) pack ;;
  run) run ;;
  nccl) nccl_only ;;
  *)
    echo "usage: bash scripts/gpu-check.sh pack|run|nccl [DIR]" >&2
    exit 2
    ;;
esac
