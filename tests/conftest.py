"""Test-wide JAX setup: CPU, 8 fake devices (set before the backend starts), strict ranks."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("SIGMA_JAX_DATA", os.path.join(os.path.dirname(__file__), "..", "..",
                                                     "shared", "data"))

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
