#!/usr/bin/env bash
# Coverage-guided fuzzing (libFuzzer) of the decoders that read bytes from outside, on the stable
# toolchain (no cargo-fuzz, no nightly: the coverage instrumentation is passed to rustc directly).
#
#   scripts/fuzz.sh TARGET [SECONDS]     fuzz one target (default 300 s); TARGET is one of
#                                        shard unit_result manifests safetensors configs, or "all"
#
# Seeds come from real files (a corpus ingested from ../shared/data, the example configs) made once under
# fuzz/corpus, and from fuzz/seeds (a screen plan and a checkpoint manifest of real runs). A crashing
# input lands in fuzz/artifacts/TARGET; copy it to fuzz/regressions/TARGET/ and the workspace test
# `fuzz_regressions` replays it from then on.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGETS=(shard unit_result manifests safetensors configs)
target=${1:?usage: scripts/fuzz.sh TARGET [SECONDS] (TARGET: ${TARGETS[*]} or all)}
seconds=${2:-300}
say() { printf '\033[1m[fuzz]\033[0m %s\n' "$*" >&2; }

if [ "$target" = all ]; then
  for t in "${TARGETS[@]}"; do "$0" "$t" "$seconds"; done
  exit
fi
case " ${TARGETS[*]} " in *" $target "*) ;; *) say "unknown target $target (one of: ${TARGETS[*]})"; exit 2 ;; esac

# sancov's inline 8-bit counters, PC table and comparison tracing are what libFuzzer's coverage reads.
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks --cfg fuzzing"
say "building $target (instrumented, fuzz/target)"
# An explicit --target keeps the instrumentation out of build scripts and proc macros (RUSTFLAGS then
# apply to the target's artifacts only), as cargo-fuzz does.
triple=$(rustc -vV | sed -n 's/^host: //p')
cargo build --manifest-path fuzz/Cargo.toml --release --bin "$target" --target-dir fuzz/target --target "$triple" --quiet
binary=fuzz/target/$triple/release/$target

seeds=fuzz/corpus/$target
if [ ! -d "$seeds" ]; then
  say "making seeds for $target from real files"
  mkdir -p "$seeds"
  # The ordinary build (the instrumentation flags are for the fuzz targets only); a test build's binary
  # will do, and rebuilding under it would replace the binary its tests run.
  [ -x target/release/cellfleet ] || env -u RUSTFLAGS cargo build --release --bin cellfleet --quiet
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  data=../shared/data/kang_ifnb_pbmc.h5ad
  case "$target" in
    shard|manifests)
      target/release/cellfleet ingest "$data" --out "$work/corpus" --hvg 64 --shard-cells 256 --block-cells 32 --threads 1 >/dev/null
      if [ "$target" = shard ]; then
        # Small shards: libFuzzer mutates whole inputs, and a few blocks reach every branch.
        find "$work/corpus" -name '*.cfs' -size -200k | head -4 | xargs -I{} cp {} "$seeds/"
      else
        cp "$work/corpus/manifest.json" "$seeds/corpus-manifest.json"
      fi ;;
    unit_result) printf '{"format":1}\n' > "$seeds/header" ;;
    safetensors) python3 - "$seeds" <<'PY'
import struct, json, sys
header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
                     "__metadata__": {"step": "1"}}).encode()
open(sys.argv[1] + "/tiny.safetensors", "wb").write(struct.pack("<Q", len(header)) + header + bytes(16))
PY
      ;;
    configs) cp deploy/configs/*.toml "$seeds/" 2>/dev/null || true; cp deploy/configs/*.json "$seeds/" 2>/dev/null || true ;;
  esac
fi
# Checked-in seeds of what no quick command writes (a screen plan, a checkpoint manifest).
if [ -d "fuzz/seeds/$target" ]; then cp fuzz/seeds/"$target"/* "$seeds/"; fi
mkdir -p "fuzz/artifacts/$target" "fuzz/regressions/$target"
say "fuzzing $target for $seconds s (seeds $seeds, crashes to fuzz/artifacts/$target)"
"$binary" "$seeds" "fuzz/regressions/$target" -max_total_time="$seconds" -rss_limit_mb=4096 -timeout=10 \
  -max_len=262144 -print_final_stats=1 -artifact_prefix="fuzz/artifacts/$target/" 2>&1 | tail -25
