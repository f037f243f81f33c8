#!/usr/bin/env bash
# GPU acceptance run (docs/gpu-check.md): on a machine with one NVIDIA GPU and qlora-ray
# installed (or inside the image), a ~5 minute grid on the built-in model that checks on
# real CUDA what the test suite can only fake. Prints one JSON summary; exit 0 = all passed.
#   scripts/gpu-check.sh [--results DIR]
#   PYTHON=/path/to/python scripts/gpu-check.sh     # another interpreter than .venv's
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x "$here/../.venv/bin/python" ]; then PY="$here/../.venv/bin/python"; else PY=python3; fi
fi
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader >&2
else
  echo "gpu-check: no nvidia-smi on PATH; the check needs an NVIDIA GPU and its driver" >&2
fi
# One card, the first, unless the caller picked one: the embedded Ray offers what it sees.
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
exec "$PY" "$here/gpu_check.py" "$@"
