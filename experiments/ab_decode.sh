#!/usr/bin/env bash
# Interleaved A/B of a sampler (cached AR by default): OLD commit vs the working tree, A B A B ...
#   bash experiments/ab_decode.sh OLD_COMMIT [ROUNDS] [LENGTH] [CALLS]
#   SAMPLER_ARGS="--sampler=burst_jacobi --order=spread --window=16" bash experiments/ab_decode.sh ...
# For each of batch 16 and batch 1, ROUNDS rounds (default 3) of one run of the old commit then
# one of the working tree, N = LENGTH (default 256), CALLS timed calls each (default 5). Each run is
# a fresh process timing experiments/time_decode.py (copied into the old tree, so both sides run
# the same script); compile is excluded from the times. Lines are prefixed "old" or "new".
set -euo pipefail
old="$1"; rounds="${2:-3}"; length="${3:-256}"; calls="${4:-5}"
root="$(cd "$(dirname "$0")/.." && pwd)"
tmp="$(mktemp -d)"
tree="$tmp/old"
git -C "$root" worktree add --detach "$tree" "$old" >/dev/null
trap 'git -C "$root" worktree remove --force "$tree"; rm -rf "$tmp"' EXIT
cp "$root/experiments/time_decode.py" "$tree/experiments/time_decode.py"
run() {  # run LABEL TREE BATCH ROUND
  local line
  line="$(cd "$2" && PYTHONPATH="$2" python experiments/time_decode.py --batch="$3" \
          --length="$length" --calls="$calls" --tag="$1 r$4" ${SAMPLER_ARGS:-})"
  echo "$1 $line"
}
for batch in 16 1; do
  for round in $(seq "$rounds"); do
    run old "$tree" "$batch" "$round"
    run new "$root" "$batch" "$round"
  done
done
