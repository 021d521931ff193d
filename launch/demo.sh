#!/usr/bin/env bash
# The main job on the embedded default: train the CPU Shakespeare preset (resumes if interrupted),
# then fill in a prompt with exact burst sampling and with cached AR, printing model calls.
# Data: $SIGMA_JAX_DATA/tinyshakespeare/input.txt, else downloaded (sha256-checked) on first use.
set -euo pipefail
workdir="${1:-workdirs/shakespeare_char_cpu}"
python -m launch.train --config=shakespeare_char_cpu --workdir="$workdir"
prompt='ROMEO:<missing>60</missing>
JULIET:'
python -m launch.sample --workdir="$workdir" --sampler=burst --prompt="$prompt" --length=128 \
  --num_samples=2 --temperature=0.8
python -m launch.sample --workdir="$workdir" --sampler=ar --prompt="$prompt" --length=128 \
  --num_samples=2 --temperature=0.8
