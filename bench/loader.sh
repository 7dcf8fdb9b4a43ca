#!/usr/bin/env bash
# Loader throughput (issue #5), ours and Pillow in the same run:
# - per core: decode + letterbox 560 + CLIP normalise of 640x480 JPEGs, one thread (ours)
#   against one Python process (Pillow + numpy);
# - the full loader with 2 threads: student path (560 + VFM 490) and crop path (224).
# Three rounds; prints every JSON line, then the medians and the ratio to Pillow.
# Creates its own venv (.venv-bench, gitignored) with Pillow and numpy.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-libtorch >/dev/null
venv=.venv-bench
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q pillow numpy
fi
py="$venv/bin/python"
images=$(mktemp -d)
trap 'rm -rf "$images"' EXIT
"$py" bench/loader_pil.py make "$images" 50
cargo bench --locked -q -p worker --bench loader --no-run 2>/dev/null
echo "# $(date -u +%FT%TZ) $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); load average $(cut -d' ' -f1-3 /proc/loadavg)"
results=$(mktemp)
for round in 1 2 3; do
  cargo bench --locked -q -p worker --bench loader -- "$images" 2>/dev/null | tee -a "$results"
  "$py" bench/loader_pil.py bench "$images" | tee -a "$results"
done
"$py" - "$results" <<'EOF'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    if line.startswith("{"):
        r = json.loads(line)
        runs.setdefault(r["case"], []).append(r)
def median(case, key):
    return statistics.median(r[key] for r in runs[case])
print("\n| case | images/s, wall | images per CPU-second | runs |")
print("| --- | --- | --- | --- |")
for case, rs in runs.items():
    print(f"| {case} | {median(case, 'images_per_s'):.1f} | "
          f"{median(case, 'images_per_cpu_s'):.1f} | {len(rs)} |")
ours, pil = "student_per_core", "pil.student_per_core"
print(f"\nper core, ours / Pillow: {median(ours, 'images_per_cpu_s') / median(pil, 'images_per_cpu_s'):.2f}x "
      f"by CPU time, {median(ours, 'images_per_s') / median(pil, 'images_per_s'):.2f}x by wall time")
print(f"ours per image (ms): decode {median(ours, 'decode_ms'):.2f}, "
      f"letterbox {median(ours, 'letterbox_ms'):.2f}, normalise {median(ours, 'normalise_ms'):.2f}")
for case in ("loader.student", "loader.crops"):
    print(f"{case}: consumer waiting {median(case, 'waiting_s'):.2f} s of "
          f"{median(case, 'seconds'):.2f} s, utilisation {median(case, 'utilisation'):.2f}, "
          f"{runs[case][0]['crops_per_image']} crops/image")
EOF
rm -f "$results"
