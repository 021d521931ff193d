"""Published σ-GPT text checkpoints (the PyTorch code's `ckpt.pt`) as sigma_jax parameters.

The published PyTorch text code (built on nanoGPT) saves a dict with `torch.save`:
`{"model": state_dict, "model_args": {n_layer, n_head, n_embd, block_size, bias, vocab_size,
dropout}, "iter_num": int, "optimizer": ..., "best_val_loss": ..., "config": {...}}`. Its model is
nanoGPT with one learned position table `transformer.wpe` of shape [block_size, n_embd / 2] used for
both position halves (input position first), no start token and an lm_head tied to the token
embedding: `ModelConfig(pos_encoding="learned", bos=False, tie_embeddings=True)`, with `bias` as
the checkpoint says.

The file is read by `torch_file.load_torch_file` (no torch needed, nothing but tensors and plain
containers unpickled).

- `convert_state_dict(model_args, state_dict)`: (ModelConfig, params), params the plain nested dict
  of `init_params` (per-layer params stacked on axis 0, dense kernels [in, out]).
- `read_official(path)`: an `OfficialCheckpoint` (config, params, iter_num, training config).
- `from_official(path)`: (ModelConfig, params).

Every problem with the input is a `CheckpointError` (a ValueError) with a one-line message.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Mapping

import jax
import ml_dtypes
import numpy as np

from sigma_jax.config import ModelConfig
from sigma_jax.model import init_params
from sigma_jax.torch_errors import reading, short_repr
from sigma_jax.torch_file import (
    CheckpointError,
    LazyTensor,
    check_shared,
    load_torch_file,
    read_into,
)

COMPILED_PREFIX = "_orig_mod."  # what torch.compile puts before every state-dict key
MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")
_REQUIRED_ARGS = MODEL_ARGS[:-1]
_SIZE_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
_MAX_SIZE_ARG = 1 << 31
_MAX_ITER = 1 << 62
_WTE, _HEAD = "transformer.wte.weight", "lm_head.weight"
# nanoGPT's causal-mask buffer (saved only by old torch versions): not a parameter.
_ALIGN = 64  # bytes
_MASK_BUFFER = re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)")


def _torch_name(path: tuple[str, ...]) -> tuple[str, bool]:
    """The published state-dict name of one of our (unstacked) leaves, and whether it is a dense
    kernel (stored [out, in] by torch). Layer leaves get a `{i}` placeholder."""
    *scope, leaf = path
    transpose = leaf == "kernel"
    leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
    if scope == ["pos"]:  # our table "pos/wpe" is their embedding "transformer.wpe"
        scope, leaf = ["wpe"], "weight"
    if scope and scope[0] == "h":
        scope = ["h", "{i}", *scope[1:]]
    prefix = [] if scope == ["lm_head"] else ["transformer"]
    return ".".join([*prefix, *scope, leaf]), transpose


def _plain(value):
    """A numpy bool, integer or float scalar as the Python bool, int or float it holds (so that
    the type checks below see its kind); any other value unchanged."""
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer | np.floating):
        return value.item()
    return value


def _model_config(model_args, tied: bool) -> ModelConfig:
    """The ModelConfig of `model_args`, each field checked for its type and range first (sizes:
    ints in [1, 2^31); bias: a bool; dropout: None or a finite number; numpy scalars count as
    the Python value they hold)."""
    if not isinstance(model_args, Mapping):
        raise CheckpointError(f"model_args is a {type(model_args).__name__}, not a dict")
    unknown = [k for k in model_args if k not in MODEL_ARGS]
    if unknown:
        raise CheckpointError(f"cannot express this architecture: model_args field "
                              f"{short_repr(unknown[0])} is not part of the published text model")
    missing = [k for k in _REQUIRED_ARGS if k not in model_args]
    if missing:
        raise CheckpointError(f"model_args lacks {', '.join(missing)}")
    fields = {k: _plain(model_args[k]) for k in _REQUIRED_ARGS}
    for name in _SIZE_ARGS:
        value = fields[name]
        if type(value) is not int or not 1 <= value < _MAX_SIZE_ARG:
            raise CheckpointError(f"model_args {name} is {short_repr(model_args[name])}, not an "
                                  "integer in [1, 2^31)")
    if type(fields["bias"]) is not bool:
        raise CheckpointError(f"model_args bias is {short_repr(model_args['bias'])}, not a bool")
    dropout = _plain(model_args.get("dropout")) or 0.0
    if type(dropout) not in (int, float) or not math.isfinite(dropout):
        raise CheckpointError(f"model_args dropout is {short_repr(model_args['dropout'])}, not "
                              "a number")
    try:
        return ModelConfig(**fields, dropout=float(dropout), pos_encoding="learned", bos=False,
                           tie_embeddings=tied)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"cannot express this architecture: {e}") from e


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """One leaf of the params tree: the state-dict names it is made of (one per layer for the
    stacked layer leaves), whether each is transposed, and the torch shape each must have."""

    names: tuple[str, ...]
    transpose: bool
    shape: tuple[int, ...]
    stacked: bool


def _layout(cfg: ModelConfig, weights: Mapping | None = None) -> tuple[list[_Leaf], object]:
    """The leaves of `init_params(cfg)` in tree order, and its treedef. Shapes come from a
    one-layer model (the layer leaves are stacked on axis 0), so this costs nothing per layer
    until the names are listed. With `weights`, the names are first checked against its keys
    (`_check_names`, CheckpointError naming the first missing and first unexpected one), so
    they are listed only when the state dict holds them all."""
    one = jax.eval_shape(init_params, dataclasses.replace(cfg, n_layer=1), jax.random.key(0))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(one)
    torch_names = [_torch_name(tuple(k.key for k in path)) for path, _ in leaves]
    if weights is not None:
        _check_names([name for name, _ in torch_names], cfg, weights)
    layout = []
    for (path, spec), (name, transpose) in zip(leaves, torch_names, strict=True):
        stacked = path[0].key == "h"
        shape = tuple(spec.shape[1:] if stacked else spec.shape)
        names = tuple(name.format(i=i) for i in range(cfg.n_layer)) if stacked else (name,)
        layout.append(_Leaf(names, transpose, shape[::-1] if transpose else shape, stacked))
    return layout, treedef


_LAYER_NAME = re.compile(r"transformer\.h\.(0|[1-9][0-9]{0,18})\.(.+)")


def _check_names(templates: list[str], cfg: ModelConfig, weights: Mapping) -> None:
    """CheckpointError naming the first state-dict name the model needs that `weights` lacks (in
    tree order) and the first key of `weights` the model has no place for (sorted), if any.
    templates: the leaves' names, layer ones with a `{i}` placeholder. The cost is bounded by
    the size of `weights`, whatever n_layer says: names are listed lazily and the search for a
    missing one stops at the first (there is one among any len(weights) + 1 distinct names)."""
    fixed = {t for t in templates if "{i}" not in t}
    per_layer = {t for t in templates if "{i}" in t}
    needed = itertools.chain.from_iterable(
        (t.format(i=i) for i in range(cfg.n_layer)) if "{i}" in t else (t,) for t in templates)
    missing = next((name for name in needed if name not in weights), None)

    def expected(key: str) -> bool:
        layer = _LAYER_NAME.fullmatch(key)
        if layer is not None and int(layer[1]) < cfg.n_layer:
            return f"transformer.h.{{i}}.{layer[2]}" in per_layer
        return key in fixed

    extra = next((key for key in sorted(weights) if not expected(key)), None)
    args = (f"(model_args: bias={cfg.bias}, n_layer={cfg.n_layer}: {len(per_layer)} entries "
            "per layer)")
    if missing is not None:
        also = "" if extra is None else (f", and has {short_repr(extra)}, which the model has no "
                                         "place for")
        raise CheckpointError(f"the state dict lacks {missing}{also} {args}")
    if extra is not None:
        raise CheckpointError(f"cannot express this architecture: the state dict has "
                              f"{short_repr(extra)}, which the model has no place for {args}")


def _check_entry(weights: Mapping, name: str, want: tuple[int, ...], cfg: ModelConfig) -> None:
    """CheckpointError unless `weights[name]` is a floating-point tensor of shape `want`."""
    if name not in weights:
        raise CheckpointError(f"the state dict lacks {name} (model_args: bias={cfg.bias}, "
                              f"n_layer={cfg.n_layer})")
    x = weights[name]
    if not isinstance(x, LazyTensor | np.ndarray):
        raise CheckpointError(f"state dict entry {name} is a {type(x).__name__}, not a tensor")
    if tuple(x.shape) != want:
        raise CheckpointError(f"{name} has shape {short_repr(list(x.shape))}, expected "
                              f"{list(want)} from model_args")
    if not (np.issubdtype(x.dtype, np.floating) or x.dtype == ml_dtypes.bfloat16):
        raise CheckpointError(f"state dict entry {name} has dtype {x.dtype}, not floating point")


def _aligned_empty(shape: tuple[int, ...]) -> np.ndarray:
    """A new float32 array [shape] whose data starts on a 64-byte boundary: XLA's CPU client
    takes such an array without copying it, so `jax.device_put` hands its buffer to jax."""
    nbytes = math.prod(shape) * 4
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start:start + nbytes].view(np.float32).reshape(shape)


def _fill(layout: list[_Leaf], weights: Mapping) -> list[np.ndarray]:
    """The float32 values of the leaves of `layout` (layer leaves stacked on axis 0, kernels
    transposed to [in, out]): one new array per leaf, each tensor read (`read_into`) or cast
    straight into its slot, so besides these arrays only a chunk of the file is held. The
    tensors' element counts are checked against their storages (`check_shared`) first."""
    check_shared([weights[n] for leaf in layout for n in leaf.names
                  if isinstance(weights[n], LazyTensor)])
    values, lazy, slots = [], [], []
    for leaf in layout:
        shape = leaf.shape[::-1] if leaf.transpose else leaf.shape  # ours: kernels [in, out]
        values.append(_aligned_empty((len(leaf.names), *shape) if leaf.stacked else shape))
        for i, name in enumerate(leaf.names):
            slot = values[-1][i] if leaf.stacked else values[-1]
            slot = slot.T if leaf.transpose else slot  # the torch layout, a view of the leaf
            if isinstance(weights[name], LazyTensor):
                lazy.append(weights[name])
                slots.append(slot)
            else:
                np.copyto(slot, weights[name], casting="unsafe")
    read_into(lazy, slots)
    return values


def _stored_twice(layout: list[_Leaf], weights: Mapping, values: list[np.ndarray]) -> bool:
    """Whether the lm_head leaf of `layout` (if any) equals the token embedding: compared as
    read (as float32, exact for every stored float type but float64, which is read again)."""
    read = {leaf.names[0]: value.T if leaf.transpose else value  # in the torch layout
            for leaf, value in zip(layout, values, strict=True)}
    if _HEAD not in read:
        return False
    head, wte = weights[_HEAD], weights[_WTE]
    if np.dtype(np.float64) in (head.dtype, wte.dtype):
        head, wte = (x.numpy() if isinstance(x, LazyTensor) else x for x in (head, wte))
        return np.array_equal(head, wte)
    return np.array_equal(read[_HEAD], read[_WTE])


def _to_jax(values: list[np.ndarray]) -> list[jax.Array]:
    """`values` as jax arrays, emptying the list as it goes: on CPU each jax array takes over
    its (aligned) buffer, elsewhere each host array is freed once it is copied, so the host
    never holds two copies of the weights."""
    out = []
    for i, value in enumerate(values):
        out.append(jax.device_put(value))
        values[i] = None
        del value
    return out


def convert_state_dict(model_args: Mapping, state_dict: Mapping) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) of the published text model `model_args` with weights `state_dict`.

    state_dict: the published model's `state_dict()` (names as in the published code, with or
    without the `_orig_mod.` prefix of torch.compile), values LazyTensor or numpy arrays.
    params: the plain nested dict of `init_params(cfg, key)`: the same tree, shapes and dtypes
    (float32), per-layer params stacked on axis 0, dense kernels [in, out]. The lm_head is tied
    unless the checkpoint stores a different `lm_head.weight`. A missing, extra or misshapen
    entry, a field we cannot express: CheckpointError naming it. Every name, shape and dtype is
    checked against `model_args` before a byte of tensor data is read, and each storage is read
    once (the tensors read from one storage hold at most its elements; a float64 head stored
    apart from the embedding is read once more, to compare it exactly).

    Memory: each tensor goes from the file straight into its slot of its leaf (no state dict of
    arrays, no stacking or transposing copies) and each leaf becomes a jax array without a copy
    on CPU, so the peak is about the params' float32 bytes plus a chunk of the file.
    """
    if not isinstance(state_dict, Mapping) or not all(isinstance(k, str) for k in state_dict):
        raise CheckpointError("the model state dict is not a dict of named tensors")
    weights = {}
    for key, value in state_dict.items():
        name = key.removeprefix(COMPILED_PREFIX)
        if _MASK_BUFFER.fullmatch(name):
            continue
        if name in weights:
            raise CheckpointError(f"the state dict holds {short_repr(name)} both with and "
                                  f"without the {COMPILED_PREFIX} prefix of torch.compile: "
                                  "which one to load is ambiguous")
        weights[name] = value
    if _WTE not in weights:
        raise CheckpointError(f"the state dict has no {_WTE}: not the published σ-GPT text "
                              "model")
    cfg = _model_config(model_args, tied=True)
    head = weights.get(_HEAD)
    same_view = isinstance(head, LazyTensor) and isinstance(weights[_WTE], LazyTensor) and \
        head == weights[_WTE]
    if head is None or same_view:
        weights.pop(_HEAD, None)
    cfg = dataclasses.replace(cfg, tie_embeddings=_HEAD not in weights)
    layout, treedef = _layout(cfg, weights)  # every name present, none unexpected
    for leaf in layout:
        for name in leaf.names:
            _check_entry(weights, name, leaf.shape, cfg)
    values = _fill(layout, weights)
    if _stored_twice(layout, weights, values):  # tied, but stored twice: drop the head
        by_names = {leaf.names: value for leaf, value in zip(layout, values, strict=True)}
        cfg = dataclasses.replace(cfg, tie_embeddings=True)
        layout, treedef = _layout(cfg)
        values = [by_names.pop(leaf.names) for leaf in layout]
        del by_names  # now only the head: freed
    return cfg, jax.tree_util.tree_unflatten(treedef, _to_jax(values))


@dataclasses.dataclass(frozen=True)
class OfficialCheckpoint:
    """A published checkpoint, converted. config: its training settings (the published
    `config` dict: dataset, learning_rate, ...; {} when absent), for the record."""

    model_cfg: ModelConfig
    params: dict
    iter_num: int
    config: dict


def _describe(obj) -> str:
    """A few words on what a torch file holds, for error messages."""
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}"
    if obj and all(isinstance(v, LazyTensor | np.ndarray) for v in obj.values()):
        return "a bare state dict"
    return f"a dict with keys {', '.join(short_repr(k, 30) for k in itertools.islice(obj, 4))}"


def _iter_num(value) -> int:
    plain = _plain(value)
    if type(plain) is not int or not 0 <= plain < _MAX_ITER:
        raise CheckpointError(f"iter_num is {short_repr(value)}, not a step number in [0, 2^62)")
    return plain


def read_official(path) -> OfficialCheckpoint:
    """Read and convert the published `ckpt.pt` at `path` (see `convert_state_dict`).

    Raises CheckpointError (one line) for anything but a published checkpoint dict (model_args
    + model), whatever goes wrong while reading it; FileNotFoundError for a missing file.
    """
    obj = load_torch_file(path)
    with reading(path):
        if not isinstance(obj, dict) or "model_args" not in obj or "model" not in obj:
            raise CheckpointError(f"{path} is not a published σ-GPT checkpoint: it holds "
                                  f"{_describe(obj)}, not the dict with model_args and model "
                                  "that the published train.py saves")
        iter_num = _iter_num(obj.get("iter_num", 0))
        config = obj.get("config")
        config = {} if config is None else config
        if not isinstance(config, dict):
            raise CheckpointError(f"config is a {type(config).__name__}, not a dict")
        config = {str(k): v for k, v in config.items() if isinstance(v, int | float | str | bool)}
        model_cfg, params = convert_state_dict(obj["model_args"], obj["model"])
    return OfficialCheckpoint(model_cfg, params, iter_num, config)


def from_official(path) -> tuple[ModelConfig, dict]:
    """(model_cfg, params) of the published σ-GPT text checkpoint `ckpt.pt` at `path`: the
    config `ModelConfig(pos_encoding="learned", bos=False, tie_embeddings=True, bias=...)` and the
    plain nested dict `init_params(model_cfg, key)` would return, holding its weights.
    Raises CheckpointError (a ValueError, one line) for any unreadable or foreign input."""
    ckpt = read_official(path)
    return ckpt.model_cfg, ckpt.params
