"""Reading a file written by `torch.save`, without torch and without running its pickle.

The file is a zip archive: `<name>/data.pkl`, a pickle whose tensors point (through persistent ids)
at raw storages `<name>/data/<key>`. `load_torch_file` reads it through an unpickler that admits
only the torch tensor-rebuild functions, the torch storage types and `collections.OrderedDict`
(everything else raises `CheckpointError` before it is built), and reads a tensor's bytes only
when asked (`LazyTensor.numpy`). Files in torch's pre-zip format are read by `torch.load(...,
weights_only=True)` when torch is installed, and refused otherwise.
"""

from __future__ import annotations

import collections
import dataclasses
import pickle
import zipfile
import zlib
from pathlib import Path

import jax.numpy as jnp
import numpy as np

# The first bytes of torch's pre-zip format: pickle protocol 2, then its magic number as a long.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": jnp.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class CheckpointError(ValueError):
    """The file is not a published σ-GPT checkpoint we can read or express; one-line message."""


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
