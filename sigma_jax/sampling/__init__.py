"""The sampling wing: every sampler of σ-GPT behind one options value.

    options.py      SampleOptions (validated once; static and traced fields), KernelOptions,
                    the sampler names and the model-call count
    draws.py        per-row keys, logits -> sampling probabilities, token draws, uniforms
    call.py         SampleStats and the prepared call SamplerCall
    inputs.py       the inputs checked and prepared; generation orders resolved before kernels
    ar.py           any-order AR sampling, cached or not (`sample_ar`)
    burst.py        burst rejection sampling, exact, jacobi or paper (`sample_burst`,
                    `burst_states`)
    burst_steps.py  one iteration of each burst mode over the loop state
    dispatch.py     `prepare` / `sample` from a SampleOptions, `kernel_call` for prepared inputs
    sharded.py      `sample_sharded`: any sampler on a device mesh
    engine.py       the step-wise engine: init / insert / step / finished / result over one
                    state pytree (continuous batching)
    serving.py      the serving loop over the engine: `serve(cfg, params, requests, ...)`
"""

from sigma_jax.sampling.ar import sample_ar, sample_ar_call
from sigma_jax.sampling.burst import burst_states, sample_burst, sample_burst_call
from sigma_jax.sampling.call import SamplerCall, SampleStats
from sigma_jax.sampling.dispatch import kernel_call, prepare, sample
from sigma_jax.sampling.options import BURST_MODES, SAMPLERS, KernelOptions, SampleOptions
from sigma_jax.sampling.serving import Request, Result, serve
from sigma_jax.sampling.sharded import sample_sharded

__all__ = [
    "BURST_MODES",
    "SAMPLERS",
    "KernelOptions",
    "Request",
    "Result",
    "SampleOptions",
    "SampleStats",
    "SamplerCall",
    "burst_states",
    "kernel_call",
    "prepare",
    "sample",
    "sample_ar",
    "sample_ar_call",
    "sample_burst",
    "sample_burst_call",
    "sample_sharded",
    "serve",
]
