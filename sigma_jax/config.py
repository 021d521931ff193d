"""Frozen, hashable configs: the model (`ModelConfig`) and one training run (`TrainConfig`).

They are static pytrees: pass them to `jax.jit` as ordinary arguments.

Every config validates itself on construction: a wrong value raises `ValueError` naming the field
and what is allowed, before any work starts.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sigma_jax.checks import (
    INT32_MAX,
    check_bool,
    check_choice,
    check_float,
    check_int,
    short_repr,
)

POS_ENCODINGS = ("learned", "sinusoidal")
DTYPES = ("float32", "bfloat16")
ATTENTIONS = ("auto", "blocked", "fused")
# vocab_size and block_size: the start-token id (vocab_size) and the rows of a learned position
# table (block_size + 1) fit int32.
MAX_SIZE = INT32_MAX - 1
# TrainConfig.seed: the largest seed `jax.random.key` accepts (an int64).
MAX_SEED = 2**63 - 1

# Position id of the start slot (the "previous position" of the first generated token). Learned
# tables map it to their extra last row; the sinusoidal encoding evaluates PE(-1).
START_POS = -1


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The σ-GPT architecture.

    vocab_size: number of real token ids; logits have this width. With `bos`, one more embedding
      row holds the start token, whose id is `vocab_size` (see `bos_id`). At most MAX_SIZE
      (2^31 - 2): every id fits int32.
    block_size: the longest sequence N the model handles; positions are 0..block_size-1. At most
      MAX_SIZE (2^31 - 2): every position fits int32.
    d_ff: MLP hidden width; None means 4 * n_embd.
    pos_encoding: 'learned' (one table of width n_embd/2 used for both positions, as the published
      text code) or 'sinusoidal' (the published non-text formula with len_max 1e5).
    sinusoidal_scale: amplitude of the sinusoidal encoding (1.0 = published). Against token
      embeddings of std 0.02, amplitude 1 drowns the token content, and random-order training then
      stays at the unigram loss for a long time (docs/training_dynamics.md); 0.1 leaves it within
      a few hundred steps at CPU scale.
    bos: reserve a start token and a start position, so every token of a sequence is predicted and
      unconditional generation works. False is the published text convention (first token unscored).
    dtype / param_dtype: compute and storage dtypes, 'float32' or 'bfloat16'. Logits, softmax and
      log-probabilities are always float32.
    attention: the kernel of the cache-free causal pass (training, and the prefill of the
      samplers and densities): 'blocked' (sigma_jax.attention.causal_attention, query blocks that
      skip the masked keys), 'fused' (jax.nn.dot_product_attention with is_causal, which an
      accelerator backend may map to a fused kernel such as cuDNN's) or 'auto' (fused when JAX's
      default backend is gpu or tpu, blocked on CPU; resolved when the model is traced). Passes
      with dropout active use the blocked kernel whatever the setting. Cached passes always use
      the cached kernels.

    Every field is checked on construction (one-line ValueError naming it); numeric fields are
    stored as Python ints and floats (numpy scalars are accepted and converted).
    """

    vocab_size: int
    block_size: int
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    d_ff: int | None = None
    dropout: float = 0.0
    bias: bool = True
    pos_encoding: str = "learned"
    sinusoidal_scale: float = 1.0
    bos: bool = True
    tie_embeddings: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "auto"

    def __post_init__(self):
        for name in ("vocab_size", "block_size"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), 1, MAX_SIZE))
        for name in ("n_layer", "n_head", "n_embd"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), 1, MAX_SIZE))
        if self.d_ff is not None:
            object.__setattr__(self, "d_ff", check_int("d_ff", self.d_ff, 1, MAX_SIZE))
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_embd % 4:
            raise ValueError(
                f"n_embd must be a multiple of 4 (two position halves of even width), "
                f"got {self.n_embd}")
        object.__setattr__(self, "dropout",
                           check_float("dropout", self.dropout, 0.0, 1.0, high_open=True))
        for name in ("bias", "bos", "tie_embeddings"):
            object.__setattr__(self, name, check_bool(name, getattr(self, name)))
        check_choice("pos_encoding", self.pos_encoding, POS_ENCODINGS)
        scale = check_float("sinusoidal_scale", self.sinusoidal_scale, 0.0, low_open=True)
        object.__setattr__(self, "sinusoidal_scale", scale)
        if scale != 1.0 and self.pos_encoding != "sinusoidal":
            raise ValueError("sinusoidal_scale only applies to pos_encoding='sinusoidal'; "
                             f"got sinusoidal_scale={scale!r} with {self.pos_encoding!r}")
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("param_dtype", self.param_dtype, DTYPES)
        check_choice("attention", self.attention, ATTENTIONS)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden_dim(self) -> int:
        return 4 * self.n_embd if self.d_ff is None else self.d_ff

    @property
    def bos_id(self) -> int:
        """Token id of the start token (only meaningful with `bos`)."""
        return self.vocab_size

    @property
    def input_vocab_size(self) -> int:
        """Rows of the token embedding: the real ids, plus the start token with `bos`."""
        return self.vocab_size + int(self.bos)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def storage_dtype(self):
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def parse_order_policy(policy: str) -> tuple[str, float]:
    """'left_to_right' | 'random' | 'fractal' | 'curriculum' | 'randcur:P' -> (kind, start).

    kind is the policy name ('randcur' for randcur:P); start is the probability of a random-order
    batch at step 0 (P/100 for randcur, 0 for curriculum). Anything else, a non-string included:
    one-line ValueError naming order_policy."""
    if not isinstance(policy, str):
        raise ValueError(_bad_policy(policy))
    if policy in ("left_to_right", "random", "fractal", "curriculum"):
        return policy, 0.0
    if policy.startswith("randcur:"):
        try:
            percent = float(policy.split(":", 1)[1])
        except ValueError:
            percent = -1.0
        if 0.0 <= percent <= 100.0:
            return "randcur", percent / 100.0
    raise ValueError(_bad_policy(policy))


def _bad_policy(policy) -> str:
    return ("order_policy must be 'left_to_right', 'random', 'fractal', 'curriculum' or "
            f"'randcur:P' with 0 <= P <= 100; got {short_repr(policy)}")


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. Validated on construction (ValueError naming the field).

    task, data_path, seq_len: passed to `sigma_jax.data.load_task` (seq_len None = the task's
      default; for text tasks it is the window length and should equal the model's block_size).
    max_steps: optimizer updates; the cosine schedule and the curriculum both end here.
    batch_size: sequences per micro-batch; one update sees batch_size * grad_accum sequences.
    learning_rate, min_lr, warmup_steps: linear warmup to learning_rate, cosine to min_lr.
    weight_decay: decoupled (AdamW), applied to dense kernels only (see `decay_mask`).
    grad_clip: global-norm clipping threshold; 0 turns clipping off.
    order_policy: 'left_to_right' | 'random' | 'fractal' | 'curriculum' | 'randcur:P'.
    per_row_curriculum: draw left-to-right vs random per row instead of per micro-batch.
    keep_prompt_first: the task's prompt positions stay first, in index order, in every
      training order (the published non-text code meant to do this but shuffled the prompt).
    eval_every / checkpoint_every: in steps; 0 = only at the end. Both also happen at max_steps.
    eval_batches: validation batches (of batch_size sequences) per evaluation.
    keep_checkpoints: how many of the latest checkpoints to keep.
    log_every: steps between metric rows (the only per-step host syncs).
    seed: in [0, MAX_SEED] (2^63 - 1, the largest seed `jax.random.key` takes).

    Numeric fields are stored as Python ints and floats (numpy scalars are accepted and
    converted).
    """

    task: str = "product"
    data_path: str | None = None
    seq_len: int | None = None
    max_steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    order_policy: str = "random"
    per_row_curriculum: bool = False
    keep_prompt_first: bool = False
    eval_every: int = 250
    eval_batches: int = 20
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.task, str) or not self.task:
            raise ValueError(f"task must be a non-empty task name, got {self.task!r}")
        if self.data_path is not None and not isinstance(self.data_path, str):
            raise ValueError(f"data_path must be a path string or None, got {self.data_path!r}")
        if self.seq_len is not None:
            object.__setattr__(self, "seq_len", check_int("seq_len", self.seq_len, 1))
        for name in ("max_steps", "batch_size", "grad_accum", "eval_batches", "keep_checkpoints",
                     "log_every"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), 1))
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), 0))
        object.__setattr__(self, "seed", check_int("seed", self.seed, 0, MAX_SEED))
        set_float = lambda name, *bounds, **kw: object.__setattr__(
            self, name, check_float(name, getattr(self, name), *bounds, **kw))
        set_float("learning_rate", 0.0, low_open=True)
        set_float("min_lr", 0.0, self.learning_rate)
        set_float("weight_decay", 0.0)
        set_float("beta1", 0.0, 1.0, high_open=True)
        set_float("beta2", 0.0, 1.0, high_open=True)
        set_float("grad_clip", 0.0)
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must not exceed max_steps "
                             f"({self.max_steps})")
        parse_order_policy(self.order_policy)  # ValueError naming order_policy
        for name in ("per_row_curriculum", "keep_prompt_first"):
            object.__setattr__(self, name, check_bool(name, getattr(self, name)))

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer update: batch_size * grad_accum."""
        return self.batch_size * self.grad_accum

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)
