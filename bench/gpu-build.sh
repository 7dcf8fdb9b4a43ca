#!/usr/bin/env bash
# Builds (here, on a CPU machine) what bench/gpu.sh runs on a GPU machine: the worker
# binary and the gpu bench binary, stripped, into dist/gpu/. Dev profile (dependencies
# at opt-level 2, our crate at 1): the GPU work is libtorch's and NCCL's, not ours.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-libtorch >/dev/null
cargo build --locked -q -p worker --bin worker
bench=$(cargo test --locked -q -p worker --bench gpu --no-run --message-format=json 2>/dev/null \
  | grep -o '"executable":"[^"]*gpu-[^"]*"' | tail -1 | cut -d'"' -f4)
mkdir -p dist/gpu
strip -o dist/gpu/worker target/debug/worker
strip -o dist/gpu/gpu-bench "$bench"
ls -l dist/gpu
