#!/usr/bin/env bash
# sigma_jax and the published PyTorch σ-GPT, interleaved (experiments/side_by_side.py).
#   bash experiments/side_by_side.sh /path/to/sigma-gpt [ROUNDS] [more side_by_side.py flags]
# The checkout needs its nanoGPT submodule (text/nanoGPT). TORCH_PYTHON (default
# /work/torch_venv/bin/python) is a Python with torch and numpy; this project's Python runs ours.
set -euo pipefail
published="${1:?usage: side_by_side.sh /path/to/sigma-gpt [ROUNDS] [flags]}"
rounds="${2:-2}"
shift $(( $# >= 2 ? 2 : 1 ))
root="$(cd "$(dirname "$0")/.." && pwd)"
torch_python="${TORCH_PYTHON:-/work/torch_venv/bin/python}"
if ! "$torch_python" -c "import torch" 2>/dev/null; then
  echo "side_by_side: $torch_python cannot import torch (set TORCH_PYTHON)" >&2
  exit 1
fi
cd "$root"
PYTHONPATH="$root" python experiments/side_by_side.py --published="$published" \
  --torch_python="$torch_python" --rounds="$rounds" "$@"
