#!/usr/bin/env bash
# The benchmark suite at GPU size on one GPU (written for one H200): GPT-2 small (124M) with
# random weights in bfloat16, lengths 64..1024, batches 1..256, the train step and the decode
# roofline, in under 5 minutes.
#
#   bash launch/bench_gpu.sh [OUT_DIR]      # default experiments/results/bench_gpu
#
# Needs jax with a GPU backend, flax, optax and orbax-checkpoint; grain is not needed (nothing
# here imports it) and matplotlib is optional (without it no PNGs are drawn). Results:
# OUT_DIR/{sampling,training,roofline}.jsonl, env.json, PNG plots, and bench.log (the tables).
#
# Time: configurations are measured in priority order (device baselines, train step, decode
# roofline, then the sampling grid and sweeps); none starts after BUDGET_S seconds (default 180;
# skipped ones are recorded as such), and a hard stop at HARD_LIMIT_S (default 285) interrupts
# the run, which still writes its tables and plots. PYTHON overrides the interpreter.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${1:-experiments/results/bench_gpu}"
PYTHON="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-180}"
HARD_LIMIT_S="${HARD_LIMIT_S:-285}"
# Preallocate 90% of device memory (default 75%): the largest sampler configurations need it;
# the sampling suite skips configurations estimated to need more than 70% of the limit.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
mkdir -p "$OUT"
start=$(date +%s)

run() {
  printf '+ %s\n' "$*"
  "$@"
}

run "$PYTHON" -c 'import jax, sys; print("backend", jax.default_backend(), jax.devices()[0].device_kind); sys.exit(jax.default_backend() == "cpu")' \
  || { echo "error: no GPU backend; use python -m launch.bench for CPU sizes" >&2; exit 2; }

cmd=("$PYTHON" -m launch.bench
  --preset=gpt2_small --dtype=bfloat16
  --lengths=64,256,1024 --batches=1,16,256 --grid=axes
  --samplers=ar,ar_nocache,burst,burst_jacobi,burst_paper --orders=random,spread
  --batch_samplers=ar,ar_nocache,burst,burst_jacobi,burst_paper
  --burst_window=64 --windows=16,64,none --n_orders=1,5
  --weights=init,product,peaked
  --repeats=3 --max_uncached_tokens=4300000
  --train_batch=16 --train_length=1024
  --budget_s="$BUDGET_S" --out="$OUT")
printf '+ XLA_PYTHON_CLIENT_MEM_FRACTION=%s timeout -s INT -k 15 %s %s\n' \
  "$XLA_PYTHON_CLIENT_MEM_FRACTION" "$HARD_LIMIT_S" "${cmd[*]}"
status=0
timeout -s INT -k 15 "$HARD_LIMIT_S" "${cmd[@]}" 2>&1 | tee "$OUT/bench.log" || status=$?
echo "total wall time $(( $(date +%s) - start )) s (exit status $status); results in $OUT"
exit "$status"
