#!/usr/bin/env bash
# Run every benchmarks/*.py that exists at run time, at GPU sizes, and print one table of their results.
#
#   bash benchmarks/gpu.sh                 # on the GPU machine, from anywhere
#   BENCH_TIMEOUT=120 bash benchmarks/gpu.sh
#
# Each benchmark prints ONE JSON line last; this script keeps that line, writes all of them to
# ${OUT:-results/gpu}/gpu_bench.jsonl (plus each log), and prints a table (name, status, seconds, the JSON's
# scalar fields). Benchmarks without GPU sizes below run with their defaults; missing ones are skipped; a
# failing or timed-out one is reported and the rest still run. Python: $PYTHON, else .venv/bin/python if
# present, else python3. On a bare GPU image, carry genjax and blackjax as wheels (see docs) — without
# them peer_tempered reports only the peers it can import.
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"; elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export XLA_PYTHON_CLIENT_PREALLOCATE=false
DEST="${OUT:-results/gpu}"
mkdir -p "$DEST"
: > "$DEST/gpu_bench.jsonl"
TIMEOUT="${BENCH_TIMEOUT:-150}"

# GPU sizes per benchmark (module name -> arguments). Unknown benchmarks run with their defaults.
gpu_args() {
  case "$1" in
    peer_tempered)   echo "--dim 50 --particles 65536 --repeats 5 --mcmc-steps 2 --leapfrog 5" ;;
    smc_overhead)    echo "--vocab 1024 --steps 128 --particles 16384 --repeats 5" ;;
    lm_smc_overhead) echo "--num-particles 1024 --steps 128 --d-model 512 --layers 6 --heads 8 --repeats 3" ;;
    compile_time)    echo "--steps 16 64 256 1024 --particles 4096" ;;
    diffusers_smc_overhead) echo "--particles 256 --steps 100 --repeats 3" ;;  # CIFAR-10 DDPM UNet, random weights
    weak_scaling)    echo "--in-process --devices 1 2 4 8 --particles-per-device 65536 --vocab 256 --steps 64" ;;
    *)               echo "" ;;
  esac
}

"$PY" -c "import jax; print('jax', jax.__version__, 'backend', jax.default_backend(), jax.devices())" || exit 1
declare -a ROWS=()
# run_bench LABEL MODULE ARGS...: run benchmarks.MODULE, keep its last JSON line, add a table row
run_bench() {
  local name="$1" module="$2"; shift 2
  echo "=== $name $*"
  local start=$SECONDS rc secs last status
  timeout "$TIMEOUT" "$PY" -m "benchmarks.$module" "$@" > "$DEST/$name.log" 2>&1
  rc=$?
  secs=$((SECONDS - start))
  tail -n 3 "$DEST/$name.log"
  last="$(tail -n 1 "$DEST/$name.log")"
  if [[ $rc -eq 0 && "$last" == \{* ]]; then
    status=ok
    echo "$last" >> "$DEST/gpu_bench.jsonl"
  elif [[ $rc -eq 124 ]]; then status="timeout(${TIMEOUT}s)"; last="{}"
  else status="failed(rc=$rc)"; last="{}"
  fi
  ROWS+=("$name|$status|$secs|$last")
}

for file in benchmarks/*.py; do
  [[ -e "$file" ]] || continue
  name="$(basename "$file" .py)"
  [[ "$name" == _* ]] && continue
  # shellcheck disable=SC2046
  run_bench "$name" "$name" $(gpu_args "$name")
done

# Extra rows: a benchmark again at another setting. A real architecture with random weights (issue 11):
# Llama-3.2-1B's shape in bfloat16, N = 64, T = 256.
[[ -e benchmarks/lm_smc_overhead.py ]] && run_bench lm_smc_overhead_llama1b lm_smc_overhead \
  --random-config llama-1b --dtype bfloat16 --num-particles 64 --steps 256 --repeats 3

echo
"$PY" - "${ROWS[@]}" <<'PY'
import json, sys
rows = [r.split("|", 3) for r in sys.argv[1:]]
print(f"{'benchmark':18s} {'status':16s} {'wall s':>7s}  results")
for name, status, secs, js in rows:
    try:
        data = json.loads(js)
    except json.JSONDecodeError:
        data = {}
    fields = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in data.items()
        if isinstance(v, (int, float, str)) and k not in ("benchmark",)
    )
    print(f"{name:18s} {status:16s} {secs:>7s}  {fields}")
PY
