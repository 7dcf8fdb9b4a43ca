#!/usr/bin/env bash
# Dataset index time and peak memory: a generated COCO-like instances json with 118,287
# images and annotation bulk of train2017's order (≈450 MB), read by
# `worker data-check --index-only` (streamed: only `images` is kept) in a release build.
# Peak RSS is measured by /usr/bin/time -v; the binary's own baseline (libtorch loaded,
# nothing read: `worker devices`) is printed next to it so the reader's share shows.
#
# Usage: bench/coco-index.sh [IMAGES]   (default 118287; the json is cached under
# target/tmp/coco-index and regenerated when IMAGES changes)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-libtorch >/dev/null
N=${1:-118287}
DIR=target/tmp/coco-index
JSON=$DIR/annotations/instances_train2017.json
cargo build --locked -q --release -p worker
BIN=target/release/worker
echo "# $(date -u +%F) $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
if [ ! -f "$JSON" ] || [ "$(cat "$DIR/.images" 2>/dev/null)" != "$N" ]; then
  "$BIN" synth-coco --index-only --images "$N" --out "$DIR"
  echo "$N" > "$DIR/.images"
fi
echo "json: $N images, $(du -m "$JSON" | cut -f1) MiB"
peak() { grep 'Maximum resident' "$1" | awk '{printf "%.1f MiB", $NF / 1024}'; }
wall() { grep 'Elapsed (wall' "$1" | awk '{print $NF}'; }
T=$(mktemp)
trap 'rm -f "$T"' EXIT
/usr/bin/time -v "$BIN" devices --device cpu >/dev/null 2>"$T"
echo "baseline (worker devices): peak RSS $(peak "$T"), wall $(wall "$T")"
for round in 1 2 3; do
  /usr/bin/time -v "$BIN" data-check --index-only \
    --set 'data.source="coco"' --set "data.coco_root=\"$DIR\"" >"$T.out" 2>"$T"
  echo "round $round: $(grep -E '^annotations' "$T.out" | sed 's/.*: //'), process peak RSS $(peak "$T"), wall $(wall "$T")"
done
grep -E '^(memory|index)' "$T.out"
rm -f "$T.out"
