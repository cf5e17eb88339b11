#!/usr/bin/env bash
# Set up .venv (if needed) and run the whole test suite: unit/statistical tests, 8-device runs, experiments'
# quick modes, notebooks. Two pytest workers: JAX compiles, which dominate here, are single-threaded.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYTHONHASHSEED=0 MPLBACKEND=Agg
.venv/bin/python -m pytest tests notebooks --nbmake --nbmake-timeout=900 -n "${PYTEST_WORKERS:-2}" --dist loadfile -q --durations=25 "$@"
