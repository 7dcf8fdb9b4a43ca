#!/usr/bin/env bash
# Teacher cache (issue 8): VFM feature compression fidelity on the fixture photos with
# DINOv2-B/14-reg at 490 px (seeded random weights), teacher images/s on CPU (demo job),
# and the demo trainer's step time with online teachers vs from the cache, same process.
# Pass `fidelity`, `teacher` or `steps` to run one part. Several minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-libtorch >/dev/null
echo "# $(date -u +%F) $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
cargo bench --locked -q -p worker --bench teacher_cache -- "$@" 2>/dev/null
