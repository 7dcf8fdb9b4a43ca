#!/usr/bin/env bash
# The GPU check, for a machine with one H100/H200 and PyTorch 2.11 (cu130) installed.
# Builds nothing: runs the stripped binaries bench/gpu-build.sh made (dist/gpu/), with
# libtorch, CUDA and NCCL from the torch wheel's site-packages. Writes everything to
# $OUT (default ./gpu-out). Budget: well under 8 minutes (each stage has a timeout).
#   1. CUDA through the dlopen path       (worker devices --device cuda)
#   2. a 1-rank NCCL communicator, 100 MB all-reduce bandwidth
#   3. 20 training steps of B/16 at 560 (configs/eva02-b16-coco.toml, random weights,
#      synthetic images, batch 4, online teachers) with NCCL in the loop:
#      images/s, time split, peak GPU memory
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-dist/gpu}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu.log") 2>&1
echo "# $(date -u '+%F %H:%M') UTC $(hostname)"
ldd --version | head -1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

torch_init=$(python3 -c 'import importlib.util as u; print(u.find_spec("torch").origin)')
site=$(dirname "$(dirname "$torch_init")")
shim=$(mktemp -d)
trap 'rm -rf "$shim"' EXIT
# cudarc looks for libnccl.so; the NCCL wheel ships libnccl.so.2 only.
ln -s "$site/nvidia/nccl/lib/libnccl.so.2" "$shim/libnccl.so"
# The driver is often only installed as libcuda.so.1.
if ! ldconfig -p | grep -q 'libcuda\.so '; then
  cuda1=$(ldconfig -p | awk '/libcuda\.so\.1 /{print $NF; exit}')
  [[ -n "$cuda1" ]] && ln -s "$cuda1" "$shim/libcuda.so"
fi
nvidia_libs=$(ls -d "$site"/nvidia/*/lib 2>/dev/null | paste -sd: -)
export LD_LIBRARY_PATH="$site/torch/lib:$shim:$nvidia_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export DECLIP_BENCH_CONFIG="$PWD/configs/eva02-b16-coco.toml"

echo "## 1. CUDA through dlopen"
timeout 60 "$BIN/worker" devices --device cuda | tee "$OUT/devices.txt"
echo "## 2-3. NCCL communicator, all-reduce, training steps"
timeout 400 "$BIN/gpu-bench" --steps 20 --batch 4 --allreduce-mb 100 | tee "$OUT/gpu.jsonl"
