#!/usr/bin/env bash
# The quickstart: set up, then run experiments/quickstart.yaml on an embedded local Ray
# (CPU, the built-in tiny model, the shipped data). Extra arguments go to `qlora-ray run`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/qlora-ray run experiments/quickstart.yaml "$@"
