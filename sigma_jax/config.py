"""Frozen, hashable configs. They are static pytrees: pass them to `jax.jit` as ordinary arguments.

Every config validates itself on construction: a wrong value raises `ValueError` naming the field
and what is allowed, before any work starts.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

POS_ENCODINGS = ("learned", "sinusoidal")
DTYPES = ("float32", "bfloat16")

# Position id of the start slot (the "previous position" of the first generated token). Learned
# tables map it to their extra last row; the sinusoidal encoding evaluates PE(-1).
START_POS = -1


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The σ-GPT architecture.

    vocab_size: number of real token ids; logits have this width. With `bos`, one more embedding
      row holds the start token, whose id is `vocab_size` (see `bos_id`).
    block_size: the longest sequence N the model handles; positions are 0..block_size-1.
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

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            _positive_int(name, getattr(self, name))
        if self.d_ff is not None:
            _positive_int("d_ff", self.d_ff)
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_embd % 4:
            raise ValueError(
                f"n_embd must be a multiple of 4 (two position halves of even width), "
                f"got {self.n_embd}")
        if not isinstance(self.dropout, int | float) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {self.dropout!r}")
        for name in ("bias", "bos", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        _choice("pos_encoding", self.pos_encoding, POS_ENCODINGS)
        scale = self.sinusoidal_scale
        if not isinstance(scale, int | float) or isinstance(scale, bool) or not scale > 0:
            raise ValueError(f"sinusoidal_scale must be a positive float, got {scale!r}")
        if scale != 1.0 and self.pos_encoding != "sinusoidal":
            raise ValueError("sinusoidal_scale only applies to pos_encoding='sinusoidal'; "
                             f"got sinusoidal_scale={scale!r} with {self.pos_encoding!r}")
        _choice("dtype", self.dtype, DTYPES)
        _choice("param_dtype", self.param_dtype, DTYPES)

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
