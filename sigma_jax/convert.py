"""Published σ-GPT text checkpoints (the PyTorch code's `ckpt.pt`) as sigma_jax parameters.

The published PyTorch text code (built on nanoGPT) saves a dict with `torch.save`:
`{"model": state_dict, "model_args": {n_layer, n_head, n_embd, block_size, bias, vocab_size,
dropout}, "iter_num": int, "optimizer": ..., "best_val_loss": ..., "config": {...}}`. Its model is
nanoGPT with one learned position table `transformer.wpe` of shape [block_size, n_embd / 2] used for
both position halves (input position first), no start token and an lm_head tied to the token
embedding: `ModelConfig(pos_encoding="learned", bos=False, tie_embeddings=True)`, with `bias` as
the checkpoint says.

The file is a zip archive: `<name>/data.pkl`, a pickle whose tensors point (through persistent ids)
at raw storages `<name>/data/<key>`. `load_torch_file` reads it without torch, through an unpickler
that admits only the torch tensor-rebuild functions, the torch storage types and
`collections.OrderedDict` (everything else raises `CheckpointError` before it is built), and reads
a tensor's bytes only when asked. Files in torch's pre-zip format are read by `torch.load(...,
weights_only=True)` when torch is installed, and refused otherwise.

- `load_torch_file(path)`: the unpickled object; tensors are `LazyTensor`s.
- `convert_state_dict(model_args, state_dict)`: (ModelConfig, params), params the plain nested dict
  of `init_params` (per-layer params stacked on axis 0, dense kernels [in, out]).
- `read_official(path)`: an `OfficialCheckpoint` (config, params, iter_num, training config).
- `from_official(path)`: (ModelConfig, params).

Every problem with the input is a `CheckpointError` (a ValueError) with a one-line message.
"""

from __future__ import annotations

import collections
import dataclasses
import pickle
import re
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sigma_jax.config import ModelConfig
from sigma_jax.model import init_params

COMPILED_PREFIX = "_orig_mod."  # what torch.compile puts before every state-dict key
MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")
_REQUIRED_ARGS = MODEL_ARGS[:-1]
# The first bytes of torch's pre-zip format: pickle protocol 2, then its magic number as a long.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": jnp.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
# nanoGPT's causal-mask buffer (saved only by old torch versions): not a parameter.
_MASK_BUFFER = re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)")


class CheckpointError(ValueError):
    """The file is not a published σ-GPT checkpoint we can read or express; one-line message."""


# ---------------------------------------------------------------- the restricted reader


@dataclasses.dataclass(frozen=True, slots=True)
class _StorageType:
    """What the unpickler returns for `torch.<Name>Storage`: the element type of a storage."""

    name: str

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(_STORAGE_DTYPES[self.name])


@dataclasses.dataclass(frozen=True, slots=True)
class _Storage:
    """One raw storage of the archive: entry `<prefix>/data/<key>`, `numel` elements of `dtype`."""

    path: str
    entry: str
    dtype: np.dtype
    numel: int
    big_endian: bool


@dataclasses.dataclass(frozen=True, slots=True)
class LazyTensor:
    """A tensor of a torch archive, not yet read: `shape` and `stride` (in elements) over its
    storage from element `offset`. `numpy()` reads it: a new native-endian array of `dtype`."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        return self.storage.dtype

    def numpy(self) -> np.ndarray:
        s = self.storage
        try:
            with zipfile.ZipFile(s.path) as archive:
                raw = archive.read(s.entry)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
            raise CheckpointError(f"{s.path}: cannot read storage {s.entry} ({e})") from e
        if len(raw) != s.numel * s.dtype.itemsize:
            raise CheckpointError(f"{s.path}: storage {s.entry} holds {len(raw)} bytes, "
                                  f"expected {s.numel} x {s.dtype.itemsize}")
        _check_view(s, self.offset, self.shape, self.stride)
        flat = np.frombuffer(raw, s.dtype.newbyteorder(">" if s.big_endian else "<"))
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset:], self.shape, [st * s.dtype.itemsize for st in self.stride],
            writeable=False)
        return np.array(view, dtype=s.dtype)  # a copy, native byte order


def _int(value, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise CheckpointError(f"malformed tensor record: {what} is {type(value).__name__}")
    return value


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> LazyTensor:
    """torch._utils._rebuild_tensor(_v2): a view of `storage`, checked to lie inside it."""
    if not isinstance(storage, _Storage):
        raise CheckpointError("malformed tensor record: its storage is not a torch storage")
    if not isinstance(size, tuple | list) or not isinstance(stride, tuple | list) or \
            len(size) != len(stride):
        raise CheckpointError("malformed tensor record: size and stride do not match")
    offset = _int(storage_offset, "storage_offset")
    shape = tuple(_int(n, "size") for n in size)
    strides = tuple(_int(n, "stride") for n in stride)
    _check_view(storage, offset, shape, strides)
    return LazyTensor(storage, offset, shape, strides)


def _check_view(storage: _Storage, offset: int, shape, strides) -> None:
    """CheckpointError unless the view (offset, shape, strides) lies inside `storage`."""
    if offset < 0 or min((*shape, *strides), default=0) < 0 or len(shape) != len(strides):
        raise CheckpointError("malformed tensor record: negative size, stride or offset")
    last = offset + sum((n - 1) * st for n, st in zip(shape, strides, strict=True))
    if 0 not in shape and last >= storage.numel:
        raise CheckpointError(f"malformed tensor record: a view past the end of {storage.entry}")


def _rebuild_parameter(data, *_ignored) -> LazyTensor:
    """torch._utils._rebuild_parameter(_with_state): an nn.Parameter is its tensor."""
    if not isinstance(data, LazyTensor):
        raise CheckpointError("malformed parameter record: its data is not a tensor")
    return data


_REBUILDERS = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds tensors (as LazyTensor), storages and plain containers, and nothing else."""

    def __init__(self, file, path: str, prefix: str, entries: set[str], big_endian: bool):
        super().__init__(file)
        self._path, self._prefix, self._entries = path, prefix, entries
        self._big_endian = big_endian

    def find_class(self, module: str, name: str):
        if (module, name) in _REBUILDERS:
            return _REBUILDERS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise CheckpointError(f"refused to load {module}.{name}: a published checkpoint holds "
                              "only tensors and plain containers")

    def persistent_load(self, pid):
        ok = isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
        if not ok or not isinstance(pid[1], _StorageType) or not isinstance(pid[2], str):
            raise CheckpointError(f"refused persistent id {str(pid)[:80]}: not a torch storage")
        entry = f"{self._prefix}/data/{pid[2]}"
        if entry not in self._entries:
            raise CheckpointError(f"storage {entry} is missing from the archive")
        numel = _int(pid[4], "storage numel")
        return _Storage(self._path, entry, pid[1].dtype, numel, self._big_endian)


def load_torch_file(path) -> object:
    """The object `torch.save` wrote to `path`, read without torch: tensors are `LazyTensor`s,
    containers are dict / OrderedDict / list / tuple, leaves are plain Python values.

    A pickle that asks for any other class or function raises CheckpointError before building
    it. Files in torch's pre-zip format go through `torch.load(weights_only=True)` (tensors
    become numpy arrays) when torch is installed. Not a torch file, a damaged or truncated
    archive: CheckpointError. Missing file: FileNotFoundError.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file {path}")
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    if not zipfile.is_zipfile(path):
        if head.startswith(b"PK"):
            raise CheckpointError(f"{path} is a damaged or truncated zip archive")
        if head == _LEGACY_MAGIC:
            return _load_legacy(path)
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (not a zip archive)")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise CheckpointError(f"{path} is a zip archive but not a PyTorch checkpoint "
                                      "(no <name>/data.pkl)")
            prefix = pickles[0][: -len("/data.pkl")]
            order = f"{prefix}/byteorder"
            big = order in names and archive.read(order).strip() == b"big"
            with archive.open(pickles[0]) as f:
                return _RestrictedUnpickler(f, str(path), prefix, set(names), big).load()
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, zlib.error, EOFError, ValueError,
            TypeError, AttributeError, IndexError, KeyError, OSError) as e:
        raise CheckpointError(f"{path} is damaged: {type(e).__name__}: {e}") from e


def _load_legacy(path: Path) -> object:
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path} uses torch's pre-zip format, which is read only through torch: install "
            "torch, or re-save it with torch.save in torch >= 1.6") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types; every one means "cannot read"
        raise CheckpointError(f"{path}: torch.load refused it ({type(e).__name__})") from e

    def to_numpy(x):
        if isinstance(x, torch.Tensor):
            return x.detach().float().numpy() if x.is_floating_point() else x.numpy()
        if isinstance(x, dict):
            return type(x)((k, to_numpy(v)) for k, v in x.items())
        if isinstance(x, list | tuple):
            return type(x)(to_numpy(v) for v in x)
        return x

    return to_numpy(obj)


# ---------------------------------------------------------------- conversion


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
