"""The JAX environment of the test processes, and running the project's command-line entry
points in a subprocess, as a user would.

The test models are tiny, so compiling dominates the test time. At backend optimization level 0
and without its fusion emitters, XLA's CPU backend compiles the test programs about 2.5x faster
and runs them about 3x slower (experiments/time_test_compile.py). Every test process (pytest,
its workers, the child runs and launcher subprocesses) uses these flags."""

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fast_compile_flags() -> str:
    flags = "--xla_backend_optimization_level=0"
    # XLA aborts on a flag it does not know: add the fusion-emitter switch only to the jaxlib
    # versions it was measured with.
    if tuple(int(part) for part in version("jaxlib").split(".")[:2]) <= (0, 10):
        flags += " --xla_cpu_use_fusion_emitters=false"
    return flags


FAST_COMPILE_FLAGS = _fast_compile_flags()


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a CPU process with `devices` fake devices and fast compilation."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE_FLAGS}"


def subprocess_env(devices: int = 1, **changes) -> dict[str, str]:
    """This process's environment (compile cache included) for a CPU subprocess with `devices`
    devices, fast compilation and the given variables changed."""
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices), **changes)


def run_module(*args, timeout=600, **env_changes):
    """`python *args` from the repository root on one CPU device; returns the CompletedProcess
    with text stdout and stderr."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=subprocess_env(**env_changes),
                          capture_output=True, text=True, timeout=timeout)
