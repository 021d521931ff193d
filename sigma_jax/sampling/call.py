"""What a sampler returns and prepares: `SampleStats` and the prepared call `SamplerCall`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SampleStats:
    """Counters returned by the samplers (arrays, so they stay on device until read).

    iterations: int32[B], loop iterations in which the row was still generating (AR: one per
      generated token; burst: draft + verify rounds, or verify calls in jacobi mode).
    generated: int32[B], tokens generated (the unknown positions filled).
    forward_passes: int32[], sequential model calls of the whole kernel, prefill included
      (`options.model_calls`: AR 1 + steps; burst 1 + 2 x iterations; jacobi 2 + iterations).
    finished: bool[B], every unknown position filled (False only when max_iters stopped the row).
    """

    iterations: jax.Array
    generated: jax.Array
    forward_passes: jax.Array
    finished: jax.Array

    @property
    def tokens_per_iteration(self) -> jax.Array:
        return self.generated / jnp.maximum(self.iterations, 1)


@dataclasses.dataclass(frozen=True)
class SamplerCall:
    """A sampler's jitted kernel with its prepared arguments (inputs checked, keys split per row,
    the generation order resolved, scalars as arrays): `call()` samples, `call.lower()` gives the
    AOT `jax.stages.Lowered` (compile it once, time it apart, or read its cost analysis). Built
    by `sampling.prepare` (and `sample_ar_call` / `sample_burst_call`); every public sampler is
    exactly `prepare(...)()`."""

    kernel: Callable
    args: tuple
    static: dict

    def __call__(self) -> tuple[jax.Array, SampleStats]:
        return self.kernel(*self.args, **self.static)

    def lower(self) -> jax.stages.Lowered:
        return self.kernel.lower(*self.args, **self.static)
