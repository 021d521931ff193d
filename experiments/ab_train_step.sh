#!/usr/bin/env bash
# Interleaved A/B of the reference train step: OLD commit vs the working tree, ROUNDS rounds.
#   bash experiments/ab_train_step.sh OLD_COMMIT [ROUNDS] [STEPS]
# Each run is a fresh process (compile excluded from the step times); run on an idle machine.
set -euo pipefail
old="$1"; rounds="${2:-3}"; steps="${3:-5}"
root="$(cd "$(dirname "$0")/.." && pwd)"
tree="$(mktemp -d)/old"
git -C "$root" worktree add --detach "$tree" "$old" >/dev/null
trap 'git -C "$root" worktree remove --force "$tree"' EXIT
timer="$root/experiments/time_train_step.py"
for round in $(seq "$rounds"); do
  (cd "$tree" && PYTHONPATH="$tree" python "$timer" "$steps" "old $old r$round")
  (cd "$root" && PYTHONPATH="$root" python "$timer" "$steps" "new r$round")
done
