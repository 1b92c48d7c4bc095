#!/usr/bin/env bash
# Sets up the machine, then runs the main job on the embedded default (local files, this machine):
# ingest the real Kang IFN-beta PBMC data into a tokenized corpus, inspect and verify it, and stream
# augmented, masked pretraining batches from it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -p cellfleet-worker --bin cellfleet
CELLFLEET=target/release/cellfleet
DATA=${CELLFLEET_DATA:-../shared/data}
OUT=${CELLFLEET_OUT:-runs/kang-corpus}
rm -rf "$OUT"
"$CELLFLEET" ingest "$DATA/kang_ifnb_pbmc.h5ad" --out "$OUT" --label-col condition --label-col cell_type
"$CELLFLEET" corpus inspect "$OUT"
"$CELLFLEET" corpus verify "$OUT"
"$CELLFLEET" corpus stream "$OUT" --batch-size 8 --batches 3
