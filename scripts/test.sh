#!/usr/bin/env bash
# Set up .venv (if needed) and run the whole test suite: unit/statistical tests, 8-device runs, notebooks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYTHONHASHSEED=0 MPLBACKEND=Agg
.venv/bin/python -m pytest tests notebooks --nbmake --nbmake-timeout=600 -q "$@"
