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
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sigma_jax.config import ModelConfig
from sigma_jax.model import init_params
from sigma_jax.torch_file import CheckpointError, LazyTensor, load_torch_file

COMPILED_PREFIX = "_orig_mod."  # what torch.compile puts before every state-dict key
MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")
_REQUIRED_ARGS = MODEL_ARGS[:-1]
# nanoGPT's causal-mask buffer (saved only by old torch versions): not a parameter.
_MASK_BUFFER = re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)")


def _array(x, name: str) -> np.ndarray:
    """A floating tensor as float32 numpy."""
    a = x.numpy() if isinstance(x, LazyTensor) else x
    if not isinstance(a, np.ndarray):
        raise CheckpointError(f"state dict entry {name} is a {type(x).__name__}, not a tensor")
    if not (np.issubdtype(a.dtype, np.floating) or a.dtype == jnp.bfloat16):
        raise CheckpointError(f"state dict entry {name} has dtype {a.dtype}, not floating point")
    return a.astype(np.float32)


def _shape(x) -> tuple[int, ...]:
    return tuple(x.shape) if isinstance(x, LazyTensor | np.ndarray) else ()


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


def _model_config(model_args, tied: bool) -> ModelConfig:
    if not isinstance(model_args, Mapping):
        raise CheckpointError(f"model_args is a {type(model_args).__name__}, not a dict")
    unknown = sorted(set(model_args) - set(MODEL_ARGS))
    if unknown:
        raise CheckpointError(f"cannot express this architecture: model_args field "
                              f"{unknown[0]!r} is not part of the published text model")
    missing = [k for k in _REQUIRED_ARGS if k not in model_args]
    if missing:
        raise CheckpointError(f"model_args lacks {', '.join(missing)}")
    fields = {k: model_args[k] for k in _REQUIRED_ARGS}
    try:
        dropout = float(model_args.get("dropout") or 0.0)
        return ModelConfig(**fields, dropout=dropout, pos_encoding="learned", bos=False,
                           tie_embeddings=tied)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"cannot express this architecture: {e}") from e


def convert_state_dict(model_args: Mapping, state_dict: Mapping) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) of the published text model `model_args` with weights `state_dict`.

    state_dict: the published model's `state_dict()` (names as in the published code, with or
    without the `_orig_mod.` prefix of torch.compile), values LazyTensor or numpy arrays.
    params: the plain nested dict of `init_params(cfg, key)`: the same tree, shapes and dtypes
    (float32), per-layer params stacked on axis 0, dense kernels [in, out]. The lm_head is tied
    unless the checkpoint stores a different `lm_head.weight`. A missing, extra or misshapen
    entry, a field we cannot express: CheckpointError naming it.
    """
    if not isinstance(state_dict, Mapping) or not all(isinstance(k, str) for k in state_dict):
        raise CheckpointError("the model state dict is not a dict of named tensors")
    weights = {k.removeprefix(COMPILED_PREFIX): v for k, v in state_dict.items()
               if not _MASK_BUFFER.fullmatch(k.removeprefix(COMPILED_PREFIX))}
    if "transformer.wte.weight" not in weights:
        raise CheckpointError("the state dict has no transformer.wte.weight: not the published "
                              "σ-GPT text model")
    wte = _array(weights["transformer.wte.weight"], "transformer.wte.weight")
    head = weights.pop("lm_head.weight", None)
    tied = head is None or (_shape(head) == wte.shape
                            and np.array_equal(_array(head, "lm_head.weight"), wte))
    if not tied:
        weights["lm_head.weight"] = head
    cfg = _model_config(model_args, tied)
    expected = jax.eval_shape(init_params, cfg, jax.random.key(0))
    arrays = {"transformer.wte.weight": wte}  # what is read already

    def fetch(name: str, transpose: bool, shape: tuple[int, ...]) -> np.ndarray:
        if name not in weights:
            raise CheckpointError(f"the state dict lacks {name} (model_args: bias="
                                  f"{cfg.bias}, n_layer={cfg.n_layer})")
        want = shape[::-1] if transpose else shape
        if _shape(weights[name]) != want:
            raise CheckpointError(f"{name} has shape {list(_shape(weights[name]))}, expected "
                                  f"{list(want)} from model_args")
        if name not in arrays:
            arrays[name] = _array(weights[name], name)
        return arrays[name].T if transpose else arrays[name]

    def leaf(path, spec):
        keys = tuple(k.key for k in path)
        name, transpose = _torch_name(keys)
        if keys[0] == "h":  # stacked on a leading layer axis
            return np.stack([fetch(name.format(i=i), transpose, spec.shape[1:])
                             for i in range(cfg.n_layer)])
        return fetch(name, transpose, spec.shape)

    params = jax.tree_util.tree_map_with_path(leaf, expected)
    extra = sorted(set(weights) - set(arrays))
    if extra:
        raise CheckpointError(f"cannot express this architecture: the state dict has "
                              f"{len(extra)} entries the model has no place for, e.g. {extra[0]}")
    return cfg, jax.tree.map(jnp.asarray, params)


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
    return f"a dict with keys {', '.join(map(str, list(obj)[:4]))}"


def read_official(path) -> OfficialCheckpoint:
    """Read and convert the published `ckpt.pt` at `path` (see `convert_state_dict`).

    Raises CheckpointError for anything but a published checkpoint dict (model_args + model),
    FileNotFoundError for a missing file.
    """
    obj = load_torch_file(path)
    if not isinstance(obj, dict) or "model_args" not in obj or "model" not in obj:
        raise CheckpointError(f"{path} is not a published σ-GPT checkpoint: it holds "
                              f"{_describe(obj)}, not the dict with model_args and model that "
                              "the published train.py saves")
    iter_num = obj.get("iter_num", 0)
    if not isinstance(iter_num, int) or isinstance(iter_num, bool) or iter_num < 0:
        raise CheckpointError(f"iter_num is {iter_num!r}, not a step number")
    config = obj.get("config") or {}
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
