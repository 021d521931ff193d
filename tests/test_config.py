"""The configs and the shared checks: each invalid field has its one-line message naming it, numpy
integers are accepted and stored as ints, and the check helpers agree with their contracts."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from sigma_jax.checks import check_bool, check_choice, check_float, check_int, short_repr
from sigma_jax.config import MAX_SEED, MAX_SIZE, ModelConfig, TrainConfig
from sigma_jax.model import init_params

MODEL = dict(vocab_size=11, block_size=8)

BAD_MODEL = [
    (dict(vocab_size=0), "vocab_size must be an integer in \\[1, 2147483646\\]; got 0"),
    (dict(vocab_size=2**31 - 1),
     "vocab_size must be an integer in \\[1, 2147483646\\]; got 2147483647$"),
    (dict(block_size=2**40),
     "block_size must be an integer in \\[1, 2147483646\\]; got 1099511627776$"),
    (dict(block_size=2.0), "block_size must be an integer"),
    (dict(n_layer=True), "n_layer must be an integer"),
    (dict(d_ff=-1), "d_ff must be an integer in \\[1, 2147483646\\]"),
    (dict(n_layer=2**70), "n_layer must be an integer in \\[1, 2147483646\\]"),
    (dict(bias="yes"), "bias must be True or False; got 'yes'"),
    (dict(n_embd=30, n_head=4), "divisible by n_head"),
    (dict(n_embd=6, n_head=3), "multiple of 4"),
    (dict(dropout=1.0), "dropout must be a finite number in \\[0, 1\\)"),
    (dict(dropout=float("nan")), "dropout must be a finite number"),
    (dict(bias=1), "bias must be True or False"),
    (dict(pos_encoding="rope"), "pos_encoding must be one of"),
    (dict(pos_encoding="sinusoidal", sinusoidal_scale=0.0), "sinusoidal_scale must be"),
    (dict(sinusoidal_scale=0.5), "only applies to pos_encoding='sinusoidal'"),
    (dict(dtype="float16"), "dtype must be one of"),
]

BAD_TRAIN = [
    (dict(task=""), "task must be"),
    (dict(max_steps=0), "max_steps must be an integer >= 1"),
    (dict(warmup_steps=-1), "warmup_steps must be an integer >= 0"),
    (dict(learning_rate=0.0), "learning_rate must be a finite number in \\(0, inf\\)"),
    (dict(min_lr=0.1, learning_rate=0.01), "min_lr must be a finite number in \\[0, 0.01\\]"),
    (dict(beta2=1.0), "beta2 must be a finite number in \\[0, 1\\)"),
    (dict(grad_clip=float("inf")), "grad_clip must be a finite number"),
    (dict(order_policy="spiral"), "order_policy"),
    (dict(order_policy=None), "order_policy must be 'left_to_right', .*'randcur:P' .*; got None$"),
    (dict(order_policy=3), "order_policy must be 'left_to_right', .*; got 3$"),
    (dict(seed=2**64),
     "seed must be an integer in \\[0, 9223372036854775807\\]; got 18446744073709551616$"),
    (dict(keep_prompt_first="yes"), "keep_prompt_first must be True or False"),
    (dict(warmup_steps=20, max_steps=10), "must not exceed max_steps"),
]


@pytest.mark.parametrize("changes, message", BAD_MODEL)
def test_model_config_fields_fail_with_their_message(changes, message):
    with pytest.raises(ValueError, match=message) as err:
        ModelConfig(**{**MODEL, **changes})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("changes, message", BAD_TRAIN)
def test_train_config_fields_fail_with_their_message(changes, message):
    with pytest.raises(ValueError, match=message) as err:
        TrainConfig(**changes)
    assert "\n" not in str(err.value)


def test_numpy_integers_are_stored_as_ints():
    cfg = ModelConfig(vocab_size=np.int64(11), block_size=np.int32(8), n_layer=np.int64(1))
    assert cfg == ModelConfig(vocab_size=11, block_size=8, n_layer=1)
    assert type(cfg.vocab_size) is int and hash(cfg) == hash(ModelConfig(**{**MODEL,
                                                                            "n_layer": 1}))
    train = TrainConfig(max_steps=np.int64(50), warmup_steps=np.int32(5))
    assert (train.max_steps, train.warmup_steps) == (50, 5) and type(train.max_steps) is int


def test_numpy_floats_are_stored_as_python_floats():
    """What train() and pretrained.save write as JSON: plain Python numbers and bools."""
    cfg = ModelConfig(**MODEL, dropout=np.float32(0.5), pos_encoding="sinusoidal",
                      sinusoidal_scale=np.float64(0.25), bias=np.True_)
    train = TrainConfig(learning_rate=np.float32(0.5), min_lr=np.float16(0.25),
                        beta1=np.float64(0.5), seed=np.uint64(MAX_SEED),
                        keep_prompt_first=np.False_)
    assert cfg.bias is True and train.keep_prompt_first is False
    assert (cfg.dropout, cfg.sinusoidal_scale, train.learning_rate, train.min_lr) == (
        0.5, 0.25, 0.5, 0.25)
    for config in (cfg, train):
        values = dataclasses.asdict(config).values()
        assert all(type(v) in (int, float, str, bool, type(None)) for v in values)
        json.dumps(dataclasses.asdict(config))


def test_size_and_seed_bounds_are_what_jax_takes():
    """The largest vocabulary and block build their params (the start-token id and the learned
    table's start row fit int32); the largest seed is the largest jax.random.key takes."""
    cfg = ModelConfig(vocab_size=MAX_SIZE, block_size=MAX_SIZE, n_layer=1, n_head=1, n_embd=4)
    jax.eval_shape(init_params, cfg, jax.random.key(0))
    jax.random.key(TrainConfig(seed=MAX_SEED).seed)
    with pytest.raises(OverflowError):
        jax.random.key(MAX_SEED + 1)


def test_check_helpers():
    assert check_int("k", np.int16(3), 1, 3) == 3
    for bad in (0, 4, 2.0, True, "2", None):
        with pytest.raises(ValueError, match="k must be an integer in \\[1, 3\\]"):
            check_int("k", bad, 1, 3)
    assert check_float("x", np.float32(0.5), 0.0, 1.0, high_open=True) == 0.5
    assert check_float("x", 1, 0.0) == 1.0
    for bad in (1.0, -0.1, float("nan"), float("inf"), False, "0.5"):
        with pytest.raises(ValueError, match="x must be a finite number in \\[0, 1\\)"):
            check_float("x", bad, 0.0, 1.0, high_open=True)
    check_choice("c", "a", ("a", "b"))
    with pytest.raises(ValueError, match="c must be one of 'a', 'b'; got \\['a'\\]"):
        check_choice("c", ["a"], ("a", "b"))
    check_bool("f", False)
    with pytest.raises(ValueError, match="f must be True or False; got 0"):
        check_bool("f", 0)
    assert short_repr("x" * 500) == repr("x" * 500)[:57] + "..."
    assert short_repr(np.zeros((3, 4))) == "ndarray of shape (3, 4)"
