"""Every sampler from its options: `prepare` gives the checked, prepared call, `sample` runs it,
and `kernel_call` gives the jitted kernel and its arguments for inputs already prepared (what a
caller that jits or shards the sampler itself runs)."""

from __future__ import annotations

from collections.abc import Callable

import jax

from sigma_jax.config import ModelConfig
from sigma_jax.sampling.ar import _sample_ar, ar_args, prepare_ar
from sigma_jax.sampling.burst import _sample_burst, burst_args, prepare_burst
from sigma_jax.sampling.call import SamplerCall, SampleStats
from sigma_jax.sampling.options import SampleOptions, check_options


def prepare(cfg: ModelConfig, params: dict, key: jax.Array, tokens, known,
            options: SampleOptions, order=None, lengths=None) -> SamplerCall:
    """The sampler of `options` on (key, tokens [B, N], known [B, N]) checked and prepared, not
    yet run: call it to sample, `.lower()` to compile ahead of time. order: an explicit int32
    [B, N] order listing each row's known positions first (None: `options.order`'s kind).
    key: one typed key or one per row [B]. lengths: int32 [B], each row's length (None: N).
    Bad input raises a one-line ValueError first."""
    check_options(options)
    prepare_call = prepare_burst if options.is_burst else prepare_ar
    return prepare_call(cfg, params, key, tokens, known, options, order, lengths)


def sample(cfg: ModelConfig, params: dict, key: jax.Array, tokens, known, options: SampleOptions,
           order=None, lengths=None) -> tuple[jax.Array, SampleStats]:
    """Run the sampler of `options`: (tokens [B, N] with the known tokens unchanged,
    SampleStats). Arguments as in `prepare`."""
    return prepare(cfg, params, key, tokens, known, options, order, lengths)()


def kernel_call(cfg: ModelConfig, params: dict, keys: jax.Array, tokens: jax.Array,
                known: jax.Array, order: jax.Array, lengths: jax.Array, options: SampleOptions
                ) -> tuple[Callable, tuple]:
    """(kernel, args) of the sampler of `options` for prepared inputs: keys [B], the sampling
    streams of `inputs.generation_order`; tokens int32 [B, N] (0 at unknown positions); known
    bool [B, N]; order int32 [B, N]; lengths int32 [B]. Works under tracing (nothing is checked
    here)."""
    args = (cfg, params, keys, tokens, known, order, lengths, options)
    if options.is_burst:
        return _sample_burst, burst_args(*args)
    return _sample_ar, ar_args(*args)
