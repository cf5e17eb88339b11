#!/usr/bin/env bash
# Set up .venv (if needed) and run the main job: IS, SMC and twisted SMC on the exact Markov LM testbed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MPLBACKEND=Agg
exec .venv/bin/python -m experiments.main_job "$@"
