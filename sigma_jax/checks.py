"""The one-line checks shared by the configs, the sampling options, the samplers and the density
functions: typed field values (`check_int`, `check_float`, `check_choice`, `check_bool`), scalar
array arguments (`check_scalar_int`), the [B, N] inputs of a model call (`token_ids`,
`check_id_range`, `check_known`) and generation orders (`permutation_rows`).

Every check raises `ValueError` with one line naming the value, what is allowed and what was
given. Values that are tracers (inside `jax.jit`) are unknown until the call runs: their
value checks are skipped (`is_concrete`), their shape checks are not.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

INT32_MAX = 2**31 - 1  # the largest token id, position or traced integer option (int32 arrays)


def is_concrete(*xs) -> bool:
    """True unless one of xs is a tracer (its value unknown until the traced call runs)."""
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` as a Python int: an int, a numpy integer or a concrete 0-d integer array (not a
    bool), in [minimum, maximum]."""
    if _integer_scalar_array(value):
        value = int(value)
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer{_bounds(minimum, maximum)}; "
                         f"got {short_repr(value)}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be an integer{_bounds(minimum, maximum)}; got {value}")
    return value


def _integer_scalar_array(value) -> bool:
    return (hasattr(value, "dtype") and np.ndim(value) == 0 and is_concrete(value)
            and np.issubdtype(value.dtype, np.integer))


def check_scalar_int(name: str, value, minimum: int | None = None,
                     maximum: int | None = None) -> None:
    """`value` is one integer (a Python or numpy integer, or a 0-d integer array) in [minimum,
    maximum]: any other shape is refused; a tracer's value is not checked."""
    if np.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar integer; got shape {np.shape(value)}")
    if is_concrete(value):
        check_int(name, np.asarray(value).item(), minimum, maximum)


def _bounds(minimum, maximum) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    return f" >= {minimum}" if minimum is not None else (
        f" <= {maximum}" if maximum is not None else "")


def check_float(name: str, value, low: float, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False) -> float:
    """`value` as a finite Python float (ints and numpy scalars accepted, bools not) in the
    interval from `low` to `high` (None: unbounded), each end closed unless `*_open`."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)
    ok = ok and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low)
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, " + (
            "inf)" if high is None else f"{high:g}{')' if high_open else ']'}")
        raise ValueError(f"{name} must be a finite number in {interval}; "
                         f"got {short_repr(value)}")
    return float(value)


def check_choice(name: str, value, allowed) -> None:
    """`value` is one of `allowed`."""
    if not isinstance(value, str | int | None) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; "
                         f"got {short_repr(value)}")


def short_repr(value, limit: int = 60) -> str:
    """repr(value) cut to `limit` characters (arrays and long strings in one-line errors)."""
    text = repr(value) if not hasattr(value, "shape") else (
        f"{type(value).__name__} of shape {tuple(value.shape)}")
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_bool(name: str, value) -> bool:
    """`value` as a Python bool: True or False (numpy bools accepted)."""
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f"{name} must be True or False; got {short_repr(value)}")
    return bool(value)


def integer_array(x, name: str, kind: str = "positions"):
    """`x` as an integer array, unchanged in dtype (lists and numpy arrays accepted): refuses
    floats and bools, which would otherwise be truncated into integers silently."""
    if not hasattr(x, "dtype"):
        x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"{name} must hold integer {kind}; got dtype {x.dtype}")
    return x


def token_ids(tokens):
    """`tokens` as an integer array of token ids (`integer_array`)."""
    return integer_array(tokens, "tokens", "token ids")


def check_id_range(tokens, high: int, name: str = "tokens", note: str = "") -> None:
    """One-line ValueError unless every token id of `tokens` (an integer array; lists accepted)
    lies in [0, high); `note` says what that range holds. Skipped for tracers. Of an array spread
    over several processes, the values on this process are checked."""
    if not is_concrete(tokens):
        return
    if isinstance(tokens, jax.Array) and not tokens.is_fully_addressable:
        values = np.concatenate([np.zeros(0, tokens.dtype)] + [
            np.ravel(shard.data) for shard in tokens.addressable_shards])
    else:
        values = np.asarray(tokens)
    if values.size and (values.min() < 0 or values.max() >= high):
        raise ValueError(f"{name} must hold token ids in [0, {high}){note}; got values in "
                         f"[{values.min()}, {values.max()}]")


def bool_mask(x, name: str = "known"):
    """`x` as a bool array, unchanged (lists and numpy arrays accepted): refuses other dtypes,
    which would otherwise be cast to a mask silently (0.5 -> True)."""
    if not hasattr(x, "dtype"):
        x = np.asarray(x)
    if x.dtype != bool:
        raise ValueError(f"{name} must be a bool mask; got dtype {x.dtype}")
    return x


def check_key(key, name: str = "key", rows: int | None = None) -> None:
    """`key` is one typed PRNG key (jax.random.key(seed)), not a legacy uint32 key or an int;
    with `rows`, one key per row ([rows]) is allowed too."""
    if not hasattr(key, "dtype") or not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        raise ValueError(f"{name} must be a typed PRNG key (jax.random.key(seed)), not a legacy "
                         f"uint32 key; got {short_repr(key)}")
    if rows is not None and key.ndim == 1:
        if key.shape[0] != rows:
            raise ValueError(f"got {key.shape[0]} per-row keys for a batch of {rows}")
    elif key.ndim != 0:
        each = " or one key per row" if rows is not None else ""
        raise ValueError(f"{name} must be one typed PRNG key{each}; got shape "
                         f"{tuple(key.shape)}")


def permutation_rows(order, name: str = "order"):
    """`order` as an integer [B, N] array, unchanged in dtype (lists accepted), whose rows are
    permutations of range(N) (checked when concrete)."""
    order = integer_array(order, name)
    if order.ndim != 2:
        raise ValueError(f"{name} must be [B, N]; got shape {tuple(order.shape)}")
    if is_concrete(order):
        _check_permutations(np.asarray(order), name)
    return order


def _check_permutations(order: np.ndarray, name: str = "order") -> None:
    bad = ~(np.sort(order, axis=1) == np.arange(order.shape[1])).all(axis=1)
    if bad.any():
        row = int(np.argmax(bad))
        raise ValueError(f"{name} rows must be permutations of range(N) (N = {order.shape[1]}); "
                         f"row {row} is {short_repr(order[row].tolist())}")


def check_rows_shape(tokens, known) -> None:
    """tokens and known are both [B, N]."""
    if np.ndim(tokens) != 2 or np.shape(tokens) != np.shape(known):
        raise ValueError(f"tokens and known must both be [B, N]; got shapes "
                         f"{tuple(np.shape(tokens))} and {tuple(np.shape(known))}")


def largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of n that is at most `at_most` (n, at_most >= 1)."""
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def within_lengths(lengths: jax.Array, n: int) -> jax.Array:
    """bool [B, n]: position (or cache slot) i of row b lies below lengths[b] (int32 [B])."""
    return jnp.arange(n)[None, :] < lengths[:, None]


def row_lengths(lengths, shape: tuple[int, int]) -> jax.Array:
    """Each row's length as int32 [B]: N for None; else a [B] integer array (lists accepted)
    with values in [1, N] (checked when concrete)."""
    if len(shape) != 2:
        raise ValueError(f"tokens and known must both be [B, N]; got known of shape {shape}")
    b, n = shape
    if lengths is None:
        return jnp.full((b,), n, jnp.int32)
    lengths = integer_array(lengths, "lengths")
    if lengths.shape != (b,):
        raise ValueError(f"lengths must be [B] = [{b}], one length per row; got shape "
                         f"{tuple(lengths.shape)}")
    if is_concrete(lengths):
        values = np.asarray(lengths)
        if values.size and (values.min() < 1 or values.max() > n):
            raise ValueError(f"lengths must lie in [1, {n}] (N = {n}); got values in "
                             f"[{values.min()}, {values.max()}]")
    return jnp.asarray(lengths, jnp.int32)


def check_known(cfg, tokens, known, order=None, lengths=None) -> None:
    """One-line ValueErrors for bad [B, N] inputs of the samplers and density functions: shapes,
    an empty batch or sequence, the block size; and, for concrete values, token ids outside
    [0, V), a row with nothing known when the model has no start token, and an explicit order
    that is not a known-first permutation of every row (with the absent positions past each
    row's length, lengths int32 [B] or None, last)."""
    check_rows_shape(tokens, known)
    if tokens.shape[0] == 0:
        raise ValueError("the batch is empty (B = 0): pass at least one row")
    if tokens.shape[1] == 0:
        raise ValueError("the sequences are empty (N = 0): pass at least one position")
    if tokens.shape[1] > cfg.block_size:
        raise ValueError(f"sequence length {tokens.shape[1]} exceeds block_size "
                         f"{cfg.block_size}")
    if order is not None and order.shape != tokens.shape:
        raise ValueError(f"order must be [B, N] like tokens; got {order.shape}")
    if not is_concrete(tokens, known, order):
        return
    tokens, known = np.asarray(tokens), np.asarray(known, bool)
    if tokens.min(initial=0) < 0 or tokens.max(initial=0) >= cfg.vocab_size:
        raise ValueError(f"token ids must lie in [0, {cfg.vocab_size})")
    if not cfg.bos and not known.any(axis=1).all():
        raise ValueError("without a start token (bos=False) every row needs >= 1 known token")
    if order is not None and is_concrete(lengths):
        _check_known_first(np.asarray(order), known, None if lengths is None
                           else np.asarray(lengths))


def _check_known_first(order: np.ndarray, known: np.ndarray, lengths) -> None:
    _check_permutations(order)
    n_known = known.sum(axis=1, keepdims=True)
    steps = np.arange(order.shape[1])[None]
    if not (np.take_along_axis(known, order, 1) == (steps < n_known)).all():
        raise ValueError("order must list every row's known positions first")
    if lengths is not None and not (order[steps >= lengths[:, None]]
                                    >= np.repeat(lengths, order.shape[1] - lengths)).all():
        raise ValueError("order must list the positions past each row's length last")


def checked_rows(cfg, tokens, known, order=None, lengths=None, *, known_only: bool = False):
    """The [B, N] inputs of a model call after every one-line check (`check_known`, lengths in
    [1, N]): (tokens int32, known bool cleared past each row's length, explicit order int32 or
    None, lengths int32 [B]). Lists, numpy and jax arrays are accepted. Only the ids a call
    reads are checked and kept, the others set to 0: those within each row's length, or with
    known_only the known ones (for callers that ignore the rest)."""
    known = jnp.asarray(bool_mask(known))
    tokens = token_ids(tokens)
    check_rows_shape(tokens, known)
    lengths = row_lengths(lengths, known.shape)
    present = within_lengths(lengths, known.shape[-1])
    known = known & present
    read = known if known_only else present
    order = None if order is None else integer_array(order, "order")
    checked = tokens  # ids are range-checked in their given dtype, before a cast can wrap them
    if is_concrete(tokens, read):
        checked = np.where(np.asarray(read), np.asarray(tokens), 0)
    check_known(cfg, checked, known, order, lengths)
    tokens = jnp.where(read, jnp.asarray(tokens, jnp.int32), 0)
    return tokens, known, None if order is None else jnp.asarray(order, jnp.int32), lengths
