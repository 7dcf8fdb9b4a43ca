#!/usr/bin/env bash
# CPU ring all-reduce bandwidth between 2 worker processes on loopback: 4, 64 and
# 256 MiB f32 buffers, median of ROUNDS timed rounds each (after one warm-up), for
# BENCHMARKS.md. Baseline, same processes, same run: after every ring round a plain
# TCP copy of the bytes one all-reduce moves per rank (2(W-1)/W of the buffer) over
# separate loopback connections (`comm-bench --baseline`); `ring_over_copy` is the
# ring's share of that wire ceiling. WORKER=path/to/worker uses a prebuilt binary;
# otherwise a release build is made. Prints one JSON line per size (rank 0's view),
# and the load average before and after.
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
echo "# $(date -u '+%F %H:%M') UTC, $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $WORKER, chunk ${CHUNK_KIB} KiB, load average $(cut -d' ' -f1-3 /proc/loadavg)"
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
for rank in 1 0; do
  "$WORKER" comm-bench --rank "$rank" --world 2 --rendezvous "$dir" \
    --sizes-mib "$SIZES" --rounds "$ROUNDS" --chunk-kib "$CHUNK_KIB" --timeout-s 60 --baseline 2>/dev/null \
    | grep -v '^ready' &
done
wait
echo "# done $(date -u '+%H:%M') UTC, load average $(cut -d' ' -f1-3 /proc/loadavg)"
