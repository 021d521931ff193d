#!/usr/bin/env bash
# The main job: fill in a Shakespeare prompt with the shipped random-order model, by exact burst
# sampling (burst_jacobi along the spread order) and by cached AR, printing model calls and wall
# time for each (no data, no training).
#
#   bash launch/demo.sh                    # sample from the shipped model (about a minute on 2 cores)
#   bash launch/demo.sh --train [WORKDIR]  # retrain it from scratch (shakespeare_char_ref, about
#                                          # 70 min on 2 cores; resumes if interrupted), sample from it
# Training data: $SIGMA_JAX_DATA/tinyshakespeare/input.txt, else downloaded (sha256-checked) once.
set -euo pipefail
if [[ "${1:-}" == "--train" ]]; then
  workdir="${2:-workdirs/shakespeare_char_ref}"
  python -m launch.train --config=shakespeare_char_ref --workdir="$workdir"
  model=(--workdir="$workdir")
elif [[ $# -gt 0 ]]; then
  echo "usage: bash launch/demo.sh [--train [WORKDIR]]" >&2
  exit 2
else
  model=(--pretrained=shakespeare_char)
fi
prompt='ROMEO:
<missing>100</missing>
JULIET:
<missing>60</missing>
'
# Exact burst sampling with one model call per iteration along the spread order, then cached AR:
# the same law up to the order, many fewer sequential model calls.
for sampler in "burst_jacobi --order=spread" "ar"; do
  echo "=== sampler: $sampler ==="
  # shellcheck disable=SC2086  # the sampler string holds its own flags
  python -m launch.sample "${model[@]}" --sampler=$sampler --prompt="$prompt" --length=192 \
    --num_samples=2 --batch_size=1 --temperature=0.8
done
