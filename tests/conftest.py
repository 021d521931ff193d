"""Test-wide JAX setup (before the backend starts): CPU, 8 fake devices, strict ranks, and fast
compilation.

The test models are tiny, so compiling dominates: XLA's backend optimization level 0 compiles the
sampler kernels about 3x faster at the same run time, and the persistent compilation cache lets
the pytest-xdist workers and later runs reuse each other's executables
(SIGMA_JAX_TEST_CACHE names its folder; default: sigma_jax_jit_cache in the temp dir). Launcher
subprocesses inherit both through the environment."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                                   "--xla_backend_optimization_level=0")
os.environ.setdefault("SIGMA_JAX_DATA", os.path.join(os.path.dirname(__file__), "..", "..",
                                                     "shared", "data"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ.get(
    "SIGMA_JAX_TEST_CACHE", os.path.join(tempfile.gettempdir(), "sigma_jax_jit_cache")))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
