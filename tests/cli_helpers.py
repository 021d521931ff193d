"""Running the project's command-line entry points in a subprocess, as a user would."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_module(*args, timeout=600, **env_changes):
    """`python *args` from the repository root on one CPU device (no fake-device XLA flags);
    returns the CompletedProcess with text stdout and stderr."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", **env_changes)
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
