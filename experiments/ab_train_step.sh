#!/usr/bin/env bash
# Interleaved A/B of the reference train step: OLD commit vs NEW (a commit; default: the working
# tree), ROUNDS rounds.
#   bash experiments/ab_train_step.sh OLD_COMMIT [ROUNDS] [STEPS] [NEW_COMMIT]
# Each run is a fresh process (compile excluded from the step times); run on an idle machine.
set -euo pipefail
old="$1"; rounds="${2:-3}"; steps="${3:-5}"; new="${4:-}"
root="$(cd "$(dirname "$0")/.." && pwd)"
tmp="$(mktemp -d)"
git -C "$root" worktree add --detach "$tmp/old" "$old" >/dev/null
new_tree="$root"
if [ -n "$new" ]; then
  git -C "$root" worktree add --detach "$tmp/new" "$new" >/dev/null
  new_tree="$tmp/new"
fi
cleanup() {
  git -C "$root" worktree remove --force "$tmp/old"
  if [ -n "$new" ]; then git -C "$root" worktree remove --force "$tmp/new"; fi
}
trap cleanup EXIT
timer="$root/experiments/time_train_step.py"
for round in $(seq "$rounds"); do
  (cd "$tmp/old" && PYTHONPATH="$tmp/old" python "$timer" "$steps" "old $old r$round")
  (cd "$new_tree" && PYTHONPATH="$new_tree" python "$timer" "$steps" "new ${new:-tree} r$round")
done
