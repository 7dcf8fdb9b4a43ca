#!/usr/bin/env bash
# Creates tools/reference/.venv and installs the pinned reference libraries.
# torch 2.11.0 from PyPI is the CUDA build (~2 GB with its nvidia wheels); it runs fine on CPU.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
if [ ! -x "$here/.venv/bin/python" ]; then
  "$python" -m venv "$here/.venv"
fi
"$here/.venv/bin/python" -m pip install --upgrade pip
"$here/.venv/bin/python" -m pip install -r "$here/requirements.txt"
"$here/.venv/bin/python" -m pip freeze > "$here/.venv/freeze.txt"
echo "ok: $here/.venv ready (pip freeze in $here/.venv/freeze.txt)"
