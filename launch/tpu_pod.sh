#!/usr/bin/env bash
# sigma_jax on a Cloud TPU VM slice (single host or pod): every worker runs the same command.
#
# One process per TPU host; each sees its own host's chips, and jax.distributed.initialize()
# (--distributed=on) reads the slice layout from the TPU metadata server, so no coordinator
# flags are needed. Process 0 (worker 0) prints and writes the metrics; all workers write the
# checkpoints together, so WORKDIR must be a directory that every worker sees at the same path
# (e.g. a Filestore/NFS mount). See docs/scaling.md.
#
# Usage:
#   TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh setup
#   TPU_NAME=my-v4-32 ZONE=us-central2-b WORKDIR=/mnt/shared/runs/sc \
#       CONFIG=shakespeare_char MESH=4:4:1 launch/tpu_pod.sh train [--set max_steps=2000 ...]
#   TPU_NAME=my-v4-32 ZONE=us-central2-b WORKDIR=/mnt/shared/runs/sc \
#       launch/tpu_pod.sh sample --sampler=burst --num_samples=8
#   TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh run 'python3 -c "import jax; print(jax.devices())"'
#
# Steps:
#   setup   copy this checkout (git archive of HEAD, so commit first) to ~/sigma_jax on every
#           worker, and install it with jax[tpu] (JAX_SPEC overrides the jax requirement);
#   train   python3 -m launch.train --config=$CONFIG --mesh=$MESH --workdir=$WORKDIR on all workers;
#   sample  python3 -m launch.sample --workdir=$WORKDIR --mesh=$MESH on all workers;
#   run     any command, in ~/sigma_jax, on all workers.
# Extra arguments are passed to the launcher (quoted safely). Rerunning `train` resumes.
#
# Environment: TPU_NAME, ZONE (required); PROJECT (optional gcloud project); CONFIG (default
# shakespeare_char); MESH (default auto: every chip on data); WORKDIR (train, sample);
# JAX_SPEC (default "jax[tpu]"); SIGMA_JAX_DATA (optional data folder on the workers; without
# it each worker downloads the data it needs into ~/.cache/sigma_jax).
set -euo pipefail

step="${1:?usage: launch/tpu_pod.sh setup|train|sample|run [args...]}"
shift
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
CONFIG="${CONFIG:-shakespeare_char}"
MESH="${MESH:-auto}"
JAX_SPEC="${JAX_SPEC:-jax[tpu]}"
gcloud_args=(--zone="$ZONE")
if [[ -n "${PROJECT:-}" ]]; then gcloud_args+=(--project="$PROJECT"); fi

on_all_workers() {  # $1: a shell command line, run in ~/sigma_jax on every worker
  local env_prefix=""
  if [[ -n "${SIGMA_JAX_DATA:-}" ]]; then
    env_prefix="export SIGMA_JAX_DATA=$(printf '%q' "$SIGMA_JAX_DATA"); "
  fi
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_args[@]}" --worker=all \
    --command "cd ~/sigma_jax && ${env_prefix}$1"
}

extra=""
if (($#)); then extra="$(printf ' %q' "$@")"; fi

case "$step" in
  setup)
    repo_root="$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
    archive="$(mktemp -d)/sigma_jax.tar.gz"
    git -C "$repo_root" archive --format=tar.gz -o "$archive" HEAD
    gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME":~/sigma_jax.tar.gz \
      "${gcloud_args[@]}" --worker=all
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_args[@]}" --worker=all --command \
      "mkdir -p ~/sigma_jax && tar -xzf ~/sigma_jax.tar.gz -C ~/sigma_jax && cd ~/sigma_jax \
       && python3 -m pip install -U $(printf '%q' "$JAX_SPEC") && python3 -m pip install -e '.[data]' \
       && python3 -c 'import jax, sigma_jax; print(\"jax\", jax.__version__)'"
    ;;
  train)
    : "${WORKDIR:?set WORKDIR to a directory that every worker sees}"
    on_all_workers "python3 -m launch.train --config=$(printf '%q' "$CONFIG") \
--mesh=$(printf '%q' "$MESH") --workdir=$(printf '%q' "$WORKDIR") --distributed=on${extra}"
    ;;
  sample)
    : "${WORKDIR:?set WORKDIR to the training run directory}"
    on_all_workers "python3 -m launch.sample --workdir=$(printf '%q' "$WORKDIR") \
--mesh=$(printf '%q' "$MESH") --distributed=on${extra}"
    ;;
  run)
    on_all_workers "$*"
    ;;
  *)
    echo "unknown step $step: use setup, train, sample or run" >&2
    exit 2
    ;;
esac
