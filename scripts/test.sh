#!/usr/bin/env bash
# Sets up the machine with the test tools, then runs every check CI runs: formatting, lints (also of the
# `cuda` feature), and the whole test suite (unit, property and end-to-end tests against the real datasets
# in ../shared/data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --for-tests
export CELLFLEET_QUIET=1
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release -- -D warnings
# The NCCL path (feature `cuda`; cudarc loads CUDA at run time, so it builds without it).
cargo clippy -p cellfleet-worker --all-targets --release --features cuda -- -D warnings
cargo nextest run --workspace --release --no-fail-fast
