"""Named training presets: `get_preset(name)` (or `PRESETS[name]`) -> Preset(model fields,
TrainConfig, description).

The model's vocabulary comes from the task: a preset leaves `vocab_size` out (the launcher takes
`task.vocab_size`) or sets a padded size >= the task's (GPT-2: 50304 for the 50257-token BPE).
`build_model_config` applies that rule. Sources for the published settings: the σ-GPT paper
(arXiv 2404.09562), its text and non-text experiments; every deviation is noted next to the preset.

Choices that apply to all presets:
- bos=True: sigma_jax's start token, so every token is scored and unconditional generation works
  (the published text code has none; `--set bos=False` gives the published convention).
- Weight decay only on dense kernels (train.decay_mask), not on embeddings as nanoGPT does.
- Non-text presets: sinusoidal positions, no weight tying, dropout 0.1, lr 1e-4 with cosine decay
  (the published step schedule 1e-4 -> 2e-5 -> 4e-6 becomes a cosine to 2e-5), no weight decay,
  no clipping, no warmup, as published.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from sigma_jax.checks import check_int, short_repr
from sigma_jax.config import MAX_SIZE, ModelConfig, TrainConfig


@dataclasses.dataclass(frozen=True)
class Preset:
    """model: ModelConfig fields (vocab_size optional, see module doc); train: a TrainConfig."""

    model: Mapping[str, Any]
    train: TrainConfig
    description: str = ""


def build_model_config(model_fields: Mapping[str, Any], task_vocab_size: int) -> ModelConfig:
    """ModelConfig from preset fields: vocab_size None/absent -> the task's; a set vocab_size must
    be >= the task's (padding); numpy integers are accepted. Raises ValueError (one line)
    otherwise or for invalid fields."""
    fields = dict(model_fields)
    vocab = fields.pop("vocab_size", None)
    if vocab is None:
        vocab = task_vocab_size
    elif check_int("vocab_size", vocab, 1, MAX_SIZE) < task_vocab_size:
        raise ValueError(f"vocab_size {vocab} is smaller than the task's vocabulary "
                         f"{task_vocab_size}; leave it unset to use the task's")
    return ModelConfig(vocab_size=vocab, **fields)


# The 4M non-text model of the σ-GPT paper: D 256, 4 heads of 64 (published key dim 32), d_ff 1024.
_NON_TEXT_4M = dict(n_layer=6, n_head=4, n_embd=256, d_ff=1024, dropout=0.1, bias=True,
                    pos_encoding="sinusoidal", tie_embeddings=False)
_NON_TEXT_TRAIN = dict(learning_rate=1e-4, min_lr=2e-5, warmup_steps=0, weight_decay=0.0,
                       beta1=0.9, beta2=0.999, grad_clip=0.0, order_policy="random",
                       eval_every=2000, eval_batches=40, checkpoint_every=2000, log_every=100)

# The CPU character models: 4 x 128, random order, sinusoidal positions at amplitude 0.1.
_TEXT_CPU_MODEL = dict(block_size=256, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False,
                       pos_encoding="sinusoidal", sinusoidal_scale=0.1)
_TEXT_CPU_TRAIN = TrainConfig(task="shakespeare_char", seq_len=256, max_steps=400, batch_size=16,
                              learning_rate=3e-3, min_lr=3e-4, warmup_steps=30, weight_decay=0.1,
                              beta1=0.9, beta2=0.99, grad_clip=1.0, order_policy="random",
                              eval_every=100, eval_batches=16, checkpoint_every=100,
                              keep_checkpoints=4, log_every=25)

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        model=dict(block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0),
        train=TrainConfig(task="product", seq_len=32, max_steps=50, batch_size=16,
                          learning_rate=1e-2, min_lr=1e-3, warmup_steps=5, weight_decay=0.1,
                          beta2=0.99, order_policy="random", eval_every=25, eval_batches=2,
                          checkpoint_every=25, keep_checkpoints=3, log_every=5),
        description="tests and smoke runs: product law, 32 tokens, 2x32 model, 50 steps",
    ),
    "shakespeare_char": Preset(
        model=dict(block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2, bias=False,
                   pos_encoding="learned"),
        train=TrainConfig(task="shakespeare_char", seq_len=256, max_steps=5000, batch_size=64,
                          learning_rate=1e-3, min_lr=1e-4, warmup_steps=100, weight_decay=0.1,
                          beta1=0.9, beta2=0.99, grad_clip=1.0, order_policy="random",
                          eval_every=250, eval_batches=200, checkpoint_every=250,
                          keep_checkpoints=3, log_every=10),
        description="the published shakespeare-char demo (10.7M params, random order)",
    ),
    "shakespeare_char_cpu": Preset(
        # Sized by measurement on a 2-core CPU: ~4.5k tokens/s, so 400 updates of 16 x 256 tokens
        # take about 6 minutes; small and dropout-free (6 minutes cannot overfit 1M characters).
        # Random order with sinusoidal positions at amplitude 0.1: at this budget learned
        # positions and the published amplitude 1 stay at the unigram loss in random order, and
        # the curriculum learns left to right only (docs/training_dynamics.md). Batch 8 x 600
        # steps left the plateau later (step ~450, 3.26 nats). Block 256: 256-character burst
        # sampling fits.
        model=_TEXT_CPU_MODEL,
        train=_TEXT_CPU_TRAIN,
        description="random-order shakespeare-char in about 6 minutes on 2 CPU cores",
    ),
    "shakespeare_char_ref": Preset(
        # The shipped reference model (sigma_jax.pretrained): the CPU model at batch 32 for
        # 4000 updates (about 70 minutes on 2 idle CPU cores at ~1 s per update); everything else
        # as shakespeare_char_cpu. experiments/results/reference_model/ has the run.
        model=_TEXT_CPU_MODEL,
        train=_TEXT_CPU_TRAIN.replace(max_steps=4000, batch_size=32, warmup_steps=100,
                                      eval_every=250, eval_batches=8, checkpoint_every=250,
                                      keep_checkpoints=3),
        description="the shipped random-order reference model, about 70 minutes on 2 CPU cores",
    ),
    "maze": Preset(
        # The 37M model: D 512, 8 heads, 12 blocks, d_ff 2048; 546 tokens (273 maze + 273 path).
        model=dict(block_size=546, **{**_NON_TEXT_4M, "n_layer": 12, "n_head": 8,
                                      "n_embd": 512, "d_ff": 2048}),
        # 25 epochs of 100k mazes at batch 5; the maze prompt stays first (the published intent).
        train=TrainConfig(task="maze", max_steps=500_000, batch_size=5, keep_prompt_first=True,
                          **_NON_TEXT_TRAIN),
        description="maze path solving (13x21 grids), 37M model",
    ),
    "product": Preset(
        model=dict(block_size=100, **_NON_TEXT_4M),
        train=TrainConfig(task="product", max_steps=250_000, batch_size=25, **_NON_TEXT_TRAIN),
        description="product law (i.i.d. Bernoulli(0.1), 100 tokens), 4M model",
    ),
    "step": Preset(
        model=dict(block_size=100, **_NON_TEXT_4M),
        train=TrainConfig(task="step", max_steps=250_000, batch_size=25, **_NON_TEXT_TRAIN),
        description="step function (one run of 10 ones in 100 bits), 4M model",
    ),
    "permutation": Preset(
        model=dict(block_size=100, **_NON_TEXT_4M),
        train=TrainConfig(task="permutation", max_steps=250_000, batch_size=25,
                          **_NON_TEXT_TRAIN),
        description="uniform permutations of 0..99, 4M model",
    ),
    "flights": Preset(
        # The public ADS-B substitute: 256-point altitude profiles, V = 450 flight levels, the
        # first quarter known (the published private set had 1001 tokens and 502 known).
        model=dict(block_size=256, **_NON_TEXT_4M),
        train=TrainConfig(task="flights", max_steps=50_000, batch_size=25,
                          keep_prompt_first=True, **_NON_TEXT_TRAIN),
        description="aircraft altitude profiles (public ADS-B substitute), 4M model",
    ),
    "gpt2_small": Preset(
        model=dict(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768,
                   dropout=0.0, bias=False, pos_encoding="learned", dtype="bfloat16",
                   param_dtype="float32"),
        train=TrainConfig(task="text_bpe", seq_len=1024, max_steps=600_000, batch_size=12,
                          grad_accum=40, learning_rate=6e-4, min_lr=6e-5, warmup_steps=2000,
                          weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0,
                          order_policy="random", eval_every=2000, eval_batches=200,
                          checkpoint_every=2000, keep_checkpoints=3, log_every=10),
        description="GPT-2 small (124M) on GPT-2 BPE text, nanoGPT's OpenWebText settings",
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called `name`. Raises ValueError (one line, listing the presets) for any other
    name."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"unknown preset {short_repr(name)}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]
