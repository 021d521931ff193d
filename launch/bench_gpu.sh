#!/usr/bin/env bash
# The benchmark suite at GPU size on one GPU (written for one H200): GPT-2 small (124M) with
# random weights in bfloat16, lengths 64..1024, batches 1..256, the train step and the decode
# roofline, in under 5 minutes.
#
#   bash launch/bench_gpu.sh [OUT_DIR]            # default experiments/results/bench_gpu
#   bash launch/bench_gpu.sh --dry-run [OUT_DIR]  # default: a fresh temporary directory
#
# Needs jax with a GPU backend, flax, optax and orbax-checkpoint; grain is not needed (nothing
# here imports it) and matplotlib is optional (without it no PNGs are drawn). Results:
# OUT_DIR/{sampling,training,roofline}.jsonl, env.json, PNG plots, bench.log (the tables), and
# projection.{jsonl,log} (launch.projection: projected pass times with the measured ones beside).
#
# --dry-run checks the script before its first GPU: the same command, flags, suites, samplers,
# orders, weights and output files, at tiny sizes (the `tiny` preset: 2 x 32, block 32) and one
# timed call per configuration, on whatever backend JAX has (CPU allowed), in under a minute.
#
# Time: configurations are measured in priority order (device baselines, train step, decode
# roofline, then the sampling grid and sweeps); none starts after BUDGET_S seconds (default 180;
# dry run inf; skipped ones are recorded as such), and a hard stop at HARD_LIMIT_S (default 285;
# dry run 180) interrupts the run, which still writes its tables and plots. PYTHON overrides the
# interpreter. A dry run fails (exit status 1) unless it wrote every output file and every
# configuration ran: no error rows, no skipped ones.
set -euo pipefail

cd "$(dirname "$0")/.."
DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=1
  shift
fi
if (( DRY_RUN )); then
  OUT="${1:-$(mktemp -d)}"
  BUDGET_S="${BUDGET_S:-inf}"
  HARD_LIMIT_S="${HARD_LIMIT_S:-180}"
  # The tiny preset in place of GPT-2 small; one length, so each sampler compiles a few times;
  # no fixed reference train step (it is CPU-sized: 15 s on a CPU, for a row the benchmarked
  # model's step already exercises).
  sizes=(--preset=tiny --lengths=16 --batches=1,2 --burst_window=8 --windows=8,none
    --repeats=1 --train_batch=2 --train_length=32 --notrain_reference)
else
  OUT="${1:-experiments/results/bench_gpu}"
  BUDGET_S="${BUDGET_S:-180}"
  HARD_LIMIT_S="${HARD_LIMIT_S:-285}"
  sizes=(--preset=gpt2_small --lengths=64,256,1024 --batches=1,16,256 --burst_window=64
    --windows=16,64,none --repeats=3 --train_batch=16 --train_length=1024)
fi
PYTHON="${PYTHON:-python3}"
# Preallocate 90% of device memory (default 75%): the largest sampler configurations need it;
# the sampling suite skips configurations estimated to need more than 70% of the limit.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
mkdir -p "$OUT"
start=$(date +%s)

run() {
  printf '+ %s\n' "$*"
  "$@"
}

# Exit status 1 on CPU: an error for the real run, allowed in a dry run.
run "$PYTHON" -c 'import jax, sys; print("backend", jax.default_backend(), jax.devices()[0].device_kind); sys.exit(jax.default_backend() == "cpu")' \
  || (( DRY_RUN )) \
  || { echo "error: no GPU backend; use python -m launch.bench for CPU sizes" >&2; exit 2; }

cmd=("$PYTHON" -m launch.bench
  "${sizes[@]}" --dtype=bfloat16 --grid=axes
  --samplers=ar,ar_nocache,burst,burst_jacobi,burst_paper --orders=random,spread
  --batch_samplers=ar,ar_nocache,burst,burst_jacobi,burst_paper
  --n_orders=1,5
  --weights=init,product,peaked
  --max_uncached_tokens=4300000
  --budget_s="$BUDGET_S" --out="$OUT")
printf '+ XLA_PYTHON_CLIENT_MEM_FRACTION=%s timeout -s INT -k 15 %s %s\n' \
  "$XLA_PYTHON_CLIENT_MEM_FRACTION" "$HARD_LIMIT_S" "${cmd[*]}"
status=0
timeout -s INT -k 15 "$HARD_LIMIT_S" "${cmd[@]}" 2>&1 | tee "$OUT/bench.log" || status=$?
if (( DRY_RUN && status == 0 )); then
  "$PYTHON" - "$OUT" <<'PY' || status=1
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
files = ["sampling.jsonl", "training.jsonl", "roofline.jsonl", "env.json"]
missing = [name for name in files if not (out / name).is_file()]
rows = [json.loads(line) for name in files[:3] if (out / name).is_file()
        for line in (out / name).read_text().splitlines() if line.strip()]
bad = [row for row in rows if row.get("error") or row.get("skipped")]
for row in bad:
    print("dry run:", row.get("error") or f"skipped ({row['skipped']})", row, file=sys.stderr)
if missing:
    print(f"dry run: missing {', '.join(missing)} in {out}", file=sys.stderr)
print(f"dry run: {len(rows)} rows, {len(bad)} failed or skipped")
sys.exit(1 if missing or bad or not rows else 0)
PY
fi
# The roofline projection of the sampler passes, with the times measured on this device beside.
if (( DRY_RUN )); then
  projection=(--preset=tiny --length=32 --window=8 --batches=1,2)
else
  projection=(--preset=gpt2_small --length=1024 --window=64 --batches=1,16)
fi
run "$PYTHON" -m launch.projection "${projection[@]}" --devices=h100,h200,tpu-v5e --measure \
  --out="$OUT/projection.jsonl" 2>&1 | tee "$OUT/projection.log" || status=1
echo "total wall time $(( $(date +%s) - start )) s (exit status $status); results in $OUT"
exit "$status"
