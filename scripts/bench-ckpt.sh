#!/usr/bin/env bash
# Checkpoint save/restore throughput against raw PUT/GET of the same bytes, on a throwaway single-node
# Garage S3 server (the binary `scripts/setup.sh --for-tests` caches), configured like the tests'
# GarageServer. Extra arguments go to `cellfleet bench ckpt` (e.g. --preset small --rounds 5), or, after a
# first argument `ckpt-training`, to `cellfleet bench ckpt-training` (e.g. ckpt-training --corpus
# runs/kang-corpus).
set -euo pipefail
cd "$(dirname "$0")/.."

GARAGE="${CELLFLEET_GARAGE:-$HOME/.cache/cellfleet/tools/bin/garage}"
if [ ! -x "$GARAGE" ]; then
  echo "the Garage S3 server is missing at $GARAGE: run scripts/setup.sh --for-tests" \
    "(or set CELLFLEET_GARAGE)" >&2
  exit 1
fi

cargo build --release --quiet --bin cellfleet
CELLFLEET=target/release/cellfleet

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
hex() { head -c "$1" /dev/urandom | od -An -tx1 | tr -d ' \n'; }

dir=$(mktemp -d -t cellfleet-bench-garage-XXXXXX)
rpc=$(free_port)
s3=$(free_port)
cat >"$dir/garage.toml" <<EOF
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "lmdb"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$(hex 32)"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3"
root_domain = ".s3.garage.localhost"
EOF

bucket=cellfleet-bench
key_id="GK$(hex 12)"
secret="$(hex 32)"
GARAGE_DEFAULT_ACCESS_KEY="$key_id" GARAGE_DEFAULT_SECRET_KEY="$secret" GARAGE_DEFAULT_BUCKET="$bucket" \
  RUST_LOG=garage=warn "$GARAGE" -c "$dir/garage.toml" server --single-node --default-bucket \
  >"$dir/garage.log" 2>&1 &
garage_pid=$!
stop_garage() {
  kill "$garage_pid" 2>/dev/null || true
  wait "$garage_pid" 2>/dev/null || true
  rm -rf "$dir"
}
trap stop_garage EXIT

export AWS_ENDPOINT_URL="http://127.0.0.1:$s3" AWS_ACCESS_KEY_ID="$key_id" AWS_SECRET_ACCESS_KEY="$secret"
export AWS_REGION=garage AWS_ALLOW_HTTP=true CELLFLEET_QUIET=1

# Ready once a request through cellfleet's own client gets a real answer (no corpus there; the command
# fails, so its output is tested rather than a pipeline's status).
for _ in $(seq 150); do
  answer=$("$CELLFLEET" corpus inspect "s3://$bucket/readiness-probe" 2>&1 || true)
  if grep -q "no corpus at" <<<"$answer"; then
    ready=1
    break
  fi
  sleep 0.2
done
if [ -z "${ready:-}" ]; then
  echo "Garage did not become ready within 30 s; last answer: $answer; its log:" >&2
  cat "$dir/garage.log" >&2
  exit 1
fi

# `bench-ckpt.sh ckpt-training --corpus URL ...` runs the training-side benchmark against the same server.
if [ "${1:-}" = "ckpt-training" ]; then
  shift
  "$CELLFLEET" bench ckpt-training --store "s3://$bucket/training" "$@"
else
  "$CELLFLEET" bench ckpt --store "s3://$bucket/bench" "$@"
fi
