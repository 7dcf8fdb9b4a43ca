#!/usr/bin/env bash
# Forward time and peak memory on CPU, batch 1: EVA02-CLIP-B/16 student (decoupled
# forward) at 560 and DINOv2-B/14-reg at 490, ours (tch) and PyTorch/timm in the
# same run. Creates the reference venv (tools/reference/setup.sh) if needed.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-libtorch >/dev/null
[ -x tools/reference/.venv/bin/python ] || tools/reference/setup.sh
echo "# $(date -u +%F) $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for round in 1 2 3; do
  cargo bench --locked -q -p worker --bench model_forward 2>/dev/null
  tools/reference/.venv/bin/python bench/model_forward_pytorch.py
done
