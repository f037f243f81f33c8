#!/usr/bin/env bash
# The whole test suite: set up (with the system packages the tests drive), then pytest.
# CPU-only and offline; a real local Ray, real bitsandbytes layers, real Parquet.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
exec .venv/bin/python -m pytest "$@"
