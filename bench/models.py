"""The benchmarked models: preset configs for random weights, weight variants, and size figures.

- `preset_model_config`: a preset's ModelConfig without reading its task's data (`TASK_VOCAB`).
- `variant_params` / `WEIGHTS_NOTES`: the weight kinds a run measures (init, peaked, product,
  checkpoint) and what each one says about burst acceptance.
- `param_bytes`, `matmul_params`, `model_flops_per_token` (`FLOPS_FORMULA`),
  `kv_bytes`: the sizes that turn times into FLOP/s and bytes/s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sigma_jax.config import ModelConfig
from sigma_jax.data import flights, maze, text_bpe
from sigma_jax.model import count_params
from sigma_jax.presets import build_model_config, get_preset

# Vocabulary sizes of the tasks, known without their data files (a benchmark machine may not
# have them): the library's constants, the binary alphabet of the synthetic tasks, and the
# character set of the shakespeare_char text. A permutation task's vocabulary is its length.
TASK_VOCAB = {"product": 2, "step": 2, "maze": maze.VOCAB_SIZE, "flights": flights.VOCAB_SIZE,
              "shakespeare_char": 65, "text_bpe": text_bpe.VOCAB_SIZE}
UNKNOWN_TASK_VOCAB = 256

WEIGHTS_NOTES = {
    "init": "random init of the preset: weak, nearly context-free conditionals, so burst "
            "acceptance is unrepresentative of a trained model",
    "peaked": "random init with matrices scaled x6: peaked, context-dependent conditionals (a "
              "low-acceptance stress case for burst)",
    "product": "context-free product law (final LayerNorm scale 0): q == p, so burst accepts "
               "every candidate (best case)",
    "checkpoint": "trained checkpoint weights",
}

FLOPS_FORMULA = ("6*N_matmul + 12*L*d*T per token (nanoGPT; attention term not halved for "
                 "causality; N_matmul = params less the position table and an untied input "
                 "embedding; T = tokens per sequence)")


def task_vocab_size(task: str, seq_len: int) -> int:
    """The vocabulary of `task` at `seq_len` tokens (TASK_VOCAB; UNKNOWN_TASK_VOCAB otherwise)."""
    if task == "permutation":
        return seq_len
    return TASK_VOCAB.get(task, UNKNOWN_TASK_VOCAB)


def preset_model_config(name: str, min_block: int = 0) -> ModelConfig:
    """The preset's ModelConfig for random weights: the task's vocabulary (`task_vocab_size` at
    the preset's block_size) unless the preset sets one, and block_size raised to `min_block`
    (harmless for random weights). Raises ValueError (one line) for an unknown preset."""
    preset = get_preset(name)
    fields = dict(preset.model)
    vocab = task_vocab_size(preset.train.task, fields["block_size"])
    fields["block_size"] = max(fields["block_size"], min_block)
    return build_model_config(fields, vocab)


def cast_model(cfg: ModelConfig, params: dict, dtype: str | None) -> tuple[ModelConfig, dict]:
    """Inference copy in `dtype` (compute and storage), or unchanged for None."""
    if dtype is None:
        return cfg, params
    cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
    return cfg, jax.tree.map(lambda x: x.astype(dtype), params)


def variant_params(kind: str, cfg: ModelConfig, params: dict, seed: int = 0) -> dict:
    """Weights of the given kind (WEIGHTS_NOTES) derived from `params`: 'init' / 'checkpoint'
    unchanged; 'peaked' scales every matrix x6; 'product' zeroes the final LayerNorm scale so
    every conditional is one fixed distribution (ln_f bias @ wte when the model has biases, else
    uniform). Raises ValueError for another kind."""
    if kind in ("init", "checkpoint"):
        return params
    if kind == "peaked":
        return jax.tree.map(lambda x: x * 6 if x.ndim >= 2 else x, params)
    if kind == "product":
        params = jax.tree.map(lambda x: x, params)  # a copy of the nested dicts
        ln_f = dict(params["ln_f"])
        ln_f["scale"] = jnp.zeros_like(ln_f["scale"])
        if "bias" in ln_f:
            noise = jax.random.normal(jax.random.key(seed + 1), ln_f["bias"].shape)
            ln_f["bias"] = (3.0 * noise).astype(ln_f["bias"].dtype)
        params["ln_f"] = ln_f
        return params
    raise ValueError(f"weights must be one of init, peaked, product, checkpoint; got {kind!r}")


def param_bytes(params: dict) -> int:
    """Bytes of the parameters as stored."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)))


def matmul_params(cfg: ModelConfig, params: dict) -> int:
    """Parameters that take part in matmuls: all, less the position table and, when the head is
    untied, the input token embedding (a lookup). A tied embedding counts once, as the head."""
    n = count_params(params)
    if "wpe" in params.get("pos", {}):
        n -= params["pos"]["wpe"].size
    if not cfg.tie_embeddings:
        n -= params["wte"]["embedding"].size
    return n


def model_flops_per_token(cfg: ModelConfig, params: dict, seq_len: int) -> float:
    """Training FLOPs per token, forward + backward (FLOPS_FORMULA)."""
    return 6.0 * matmul_params(cfg, params) + 12.0 * cfg.n_layer * cfg.n_embd * seq_len


def kv_bytes(cfg: ModelConfig, batch: int, slots: int) -> int:
    """Bytes of K and V for `slots` cache slots of `batch` rows."""
    return 2 * cfg.n_layer * batch * slots * cfg.n_embd * cfg.compute_dtype.itemsize
