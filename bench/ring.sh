#!/usr/bin/env bash
# CPU ring all-reduce bandwidth between 2 worker processes on loopback: 4, 64 and
# 256 MiB f32 buffers, median of ROUNDS timed rounds each (after one warm-up), for
# BENCHMARKS.md. WORKER=path/to/worker uses a prebuilt binary; otherwise a release
# build is made. Prints one JSON line per size (rank 0's view).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-7}
SIZES=${SIZES:-4,64,256}
CHUNK_KIB=${CHUNK_KIB:-1024}
if [[ -z "${WORKER:-}" ]]; then
  scripts/setup-libtorch >/dev/null
  cargo build --release --locked -q -p worker --bin worker
  WORKER=target/release/worker
fi
echo "# $(date -u '+%F %H:%M') UTC, $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $WORKER, chunk ${CHUNK_KIB} KiB"
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
for rank in 1 0; do
  "$WORKER" comm-bench --rank "$rank" --world 2 --rendezvous "$dir" \
    --sizes-mib "$SIZES" --rounds "$ROUNDS" --chunk-kib "$CHUNK_KIB" --timeout-s 60 2>/dev/null \
    | grep -v '^ready' &
done
wait
