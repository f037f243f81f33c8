#!/usr/bin/env bash
# Set up .venv for qlora-ray on a fresh machine (idempotent; a second run is quick).
#   scripts/setup.sh          runtime + dev dependencies
#   scripts/setup.sh --test   also the system packages the test suite drives (root only):
#                             chromium (report.html check), podman/runc/debootstrap (image build)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
  echo "qlora-ray needs Python >= 3.10 (found $("$PY" --version)); set PYTHON=/path/to/python3.11" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)

# torch first, pinned: a bare `torch` requirement pulls a multi-GB CUDA build on machines
# where the CPU build is what we want (CI, laptops). GPU users install the package normally.
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  "${PIP[@]}" install "torch==2.13.0"
fi
# constraints.txt is the lock the container image and CI use; pyproject keeps honest ranges.
"${PIP[@]}" install -c constraints.txt -e ".[dev]"

if [ "${1:-}" = "--test" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  need=()
  [ -x /usr/bin/chromium ] || need+=(chromium)
  command -v podman >/dev/null || need+=(podman)
  command -v runc >/dev/null || need+=(runc)
  command -v debootstrap >/dev/null || need+=(debootstrap)
  if [ ${#need[@]} -gt 0 ]; then
    echo "installing system packages for the tests: ${need[*]}"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi
