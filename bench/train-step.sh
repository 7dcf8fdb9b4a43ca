#!/usr/bin/env bash
# Training-step time and peak memory on CPU with online teachers: the tiny demo
# models and the B recipe (EVA02-CLIP-B/16 at 560, DINOv2-B/14-reg at 490, crops at
# 224), batch 1 and 4. The B/16 batch-4 case takes several minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-libtorch >/dev/null
echo "# $(date -u +%F) $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
cargo bench --locked -q -p worker --bench train_step 2>/dev/null
