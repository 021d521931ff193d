"""sigma_jax: σ-GPT in JAX/Flax — any-order generation, any-subset densities, burst sampling."""

from sigma_jax import orders
from sigma_jax.cache import KVCache
from sigma_jax.config import ModelConfig
from sigma_jax.likelihood import conditionals, log_prob
from sigma_jax.model import forward, init_params

__all__ = [
    "KVCache",
    "ModelConfig",
    "conditionals",
    "forward",
    "init_params",
    "log_prob",
    "orders",
]
