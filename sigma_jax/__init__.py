"""sigma_jax: σ-GPT in JAX/Flax — any-order generation, any-subset densities, burst sampling."""

from sigma_jax import orders
from sigma_jax.cache import KVCache
from sigma_jax.config import ModelConfig
from sigma_jax.likelihood import conditionals, log_prob
from sigma_jax.model import count_params, forward, init_params
from sigma_jax.sampling import (
    SampleOptions,
    SamplerCall,
    SampleStats,
    burst_states,
    sample_ar,
    sample_ar_call,
    sample_burst,
    sample_burst_call,
)

__all__ = [
    "KVCache",
    "ModelConfig",
    "SampleOptions",
    "SampleStats",
    "SamplerCall",
    "burst_states",
    "conditionals",
    "count_params",
    "forward",
    "init_params",
    "log_prob",
    "orders",
    "sample_ar",
    "sample_ar_call",
    "sample_burst",
    "sample_burst_call",
]
