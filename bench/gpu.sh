#!/usr/bin/env bash
# The GPU check, for a machine with one H100/H200 and PyTorch 2.11 (cu130) in python3.
# Builds nothing: runs the stripped binaries bench/gpu-build.sh made (dist/gpu/), with
# libtorch, CUDA and NCCL from the torch wheel's site-packages. Writes everything to
# $OUT (default ./gpu-out): gpu.log (all of it), one .jsonl/.txt per stage, gpu-mem.csv.
#   1. CUDA through the dlopen path        (worker devices --device cuda)
#   2. a 1-rank NCCL communicator, 100 MB all-reduce; then 20 training steps of B/16 at
#      560 (configs/eva02-b16-coco.toml, random weights, synthetic images, batch 4,
#      online teachers) with NCCL in the loop: images/s, time split, peak GPU memory
#   3. teacher images/s: DINOv2-B/14-reg at 490 + the crop teacher at 224 on every
#      epoch's crop plan, as `worker teach` computes a shard
# Budget: at most 60 + 270 + 90 s of stage timeouts plus seconds of setup (< 8 min).
# dist/ is git-ignored: copy (carry) dist/gpu/ to the GPU machine with the checkout.
# A failed stage does not stop the later ones; the exit status says whether all passed.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-dist/gpu}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu.log") 2>&1
echo "# $(date -u '+%F %H:%M:%S') UTC $(hostname)"
ldd --version | head -1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

fail() { echo "gpu.sh: $*"; exit 1; }
torch_init=$(python3 -c 'import importlib.util as u; print(u.find_spec("torch").origin)') \
  || fail "python3 cannot find torch"
site=$(dirname "$(dirname "$torch_init")")
echo "torch $(python3 -c 'import importlib.metadata as m; print(m.version("torch"))') in $site"
shim=$(mktemp -d)
# cudarc looks for libnccl.so (or .so.1/.so.9-.13), never .so.2, the only name the
# NCCL wheel ships. (libcuda.so.1, the driver's usual name, is among its candidates.)
nccl=$(ls "$site"/nvidia/*/lib/libnccl.so.2 2>/dev/null | head -1)
[[ -n "$nccl" ]] || fail "no nvidia/*/lib/libnccl.so.2 under $site"
ln -s "$nccl" "$shim/libnccl.so"
# cu13 wheels keep most CUDA libraries in nvidia/cu13/lib; cuDNN, NCCL, ... in nvidia/X/lib.
nvidia_libs=$(ls -d "$site"/nvidia/*/lib 2>/dev/null | paste -sd: -)
export LD_LIBRARY_PATH="$site/torch/lib:$shim:$nvidia_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export DECLIP_BENCH_CONFIG="$PWD/configs/eva02-b16-coco.toml"
# NCCL says why it fails (init, transport) instead of only returning an error code.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# The issue's sizes; smaller ones only to try the script's logic on a CPU machine.
STEPS=${STEPS:-20} BATCH=${BATCH:-4} ALLREDUCE_MB=${ALLREDUCE_MB:-100}
TEACHER_IMAGES=${TEACHER_IMAGES:-16}
for b in worker gpu-bench; do
  [[ -x "$BIN/$b" ]] || fail "$BIN/$b missing: run bench/gpu-build.sh on the build machine"
  ldd "$BIN/$b" | grep 'not found' && fail "$BIN/$b: libraries not found"
done

# Device memory in use every 200 ms (every process; the peak is the last line's max).
nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader,nounits -lms 200 \
  >"$OUT/gpu-mem.csv" 2>/dev/null &
sampler=$!
trap 'kill "$sampler" 2>/dev/null; rm -rf "$shim"' EXIT

failed=()
# stage NAME SECONDS OUTFILE COMMAND...: runs under its timeout, stdout to $OUT/OUTFILE.
stage() {
  local name=$1 limit=$2 out=$3 started rc
  shift 3
  echo "## $name (timeout ${limit}s)"
  started=$(date +%s)
  timeout -k 10 "$limit" "$@" | tee "$OUT/$out"
  rc=${PIPESTATUS[0]}
  echo "## $name: exit $rc after $(($(date +%s) - started)) s"
  [[ $rc == 0 ]] || failed+=("$name (exit $rc)")
}

stage "1. CUDA through dlopen" 60 devices.txt "$BIN/worker" devices --device cuda
stage "2. NCCL, all-reduce, B/16 training steps" 270 gpu.jsonl \
  "$BIN/gpu-bench" --full nccl train --steps "$STEPS" --batch "$BATCH" --allreduce-mb "$ALLREDUCE_MB"
stage "3. teacher images/s" 90 teacher.jsonl \
  "$BIN/gpu-bench" --full teacher --teacher-images "$TEACHER_IMAGES"

kill "$sampler" 2>/dev/null
peak=$(awk -F', ' '$2 + 0 > m { m = $2 + 0 } END { print m + 0 }' "$OUT/gpu-mem.csv")
echo "peak device memory in use (nvidia-smi, 200 ms samples): ${peak} MiB"
if ((${#failed[@]})); then
  printf 'FAILED: %s\n' "${failed[@]}"
  exit 1
fi
echo "all stages passed"
