#!/usr/bin/env bash
# On a CUDA host with PyTorch 2.11 (no Rust, no network): the packaged cellfleet (scripts/package.sh of a
# --features cuda build) run through its launcher, with nothing set by hand: libtorch, the CUDA wheels and
# libtorch's own NCCL found by the launcher; the NCCL round trip; `cellfleet worker --gpus all` starting
# one supervised worker per GPU, which trains a short job through the coordinator, reports its device on
# /metrics, and stops on SIGTERM.
#
#   bash scripts/gpu/deploy_check.sh DIST CORPUS     (DIST: the packaged tree; CORPUS: a small corpus)
set -uo pipefail
dist=$1
corpus=$2
out=${OUT:-$(mktemp -d)}
bin="$dist/bin/cellfleet"
unset LD_LIBRARY_PATH LD_PRELOAD
export CELLFLEET_QUIET=1
status=0
check() {
  local name=$1
  shift
  echo "== $name"
  if "$@" > "$out/$name.log" 2>&1; then echo "   ok"; else echo "   FAILED"; status=1; fi
  tail -n 8 "$out/$name.log" | sed 's/^/   /'
}
# shellcheck disable=SC2317 # called through check
metrics_have() {
  python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' "$1" |
    grep -E "$2"
}

check version "$bin" --version
check nccl "$bin" bench nccl-check --device 0 --mib 64 --timeout 5
"$dist/bin/cellfleet-coordinator" --listen 127.0.0.1:7070 --metrics-listen 127.0.0.1:9464 > "$out/coordinator.log" 2>&1 &
coordinator=$!
sleep 1
"$bin" worker --coordinator http://127.0.0.1:7070 --gpus all --metrics-listen 127.0.0.1:9465 > "$out/gpus.log" 2>&1 &
supervisor=$!
for _ in $(seq 60); do
  "$bin" job --coordinator http://127.0.0.1:7070 workers 2>/dev/null | grep -q "cuda:0" && break
  sleep 1
done
check workers "$bin" job --coordinator http://127.0.0.1:7070 workers
check metrics metrics_have http://127.0.0.1:9465/metrics 'worker_info|connected'

check train "$bin" train --coordinator http://127.0.0.1:7070 --corpus "$corpus" --out "$out/model" --preset tiny \
  --steps 40 --batch-size 64 --min-workers 1 --max-workers 1
check metrics-after metrics_have http://127.0.0.1:9465/metrics '^cellfleet_train_(step|tokens_total) '
kill -TERM "$supervisor"
for _ in $(seq 20); do kill -0 "$supervisor" 2>/dev/null || break; sleep 0.5; done
if kill -0 "$supervisor" 2>/dev/null || pgrep -f "cellfleet-bin worker --coordinator http://127.0.0.1:7070 --device cuda:0" >/dev/null; then
  echo "== stop: FAILED, workers still running"; status=1
else
  echo "== stop: the supervisor and its workers exited on SIGTERM"
fi
tail -n 5 "$out/gpus.log" | sed 's/^/   /'
kill "$coordinator" 2>/dev/null
exit $status
