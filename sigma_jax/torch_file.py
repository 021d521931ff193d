"""Reading a file written by `torch.save`, without torch and without running its pickle, at a
cost bounded by the file.

The file is a zip archive (`torch_zip.Archive`: stored entries only, no overlaps):
`<name>/data.pkl`, a pickle whose tensors point (through persistent ids) at raw storages
`<name>/data/<key>`.
`load_torch_file` runs the pickle on `torch_pickle.load`, which admits only the torch
tensor-rebuild functions, the torch storage types and `collections.OrderedDict` (anything else
raises `CheckpointError` before it is built). A storage's declared element count must match its
entry's size, and a tensor must be a non-overlapping view inside its storage, so no tensor holds
more bytes than the file. Tensor bytes are read only when asked: `read_tensors` (new arrays),
`read_into` (arrays the caller made, e.g. slots of a bigger one; a storage that is one whole
tensor streams into it without a copy of its own) or `LazyTensor.numpy`, each storage once.
Files in torch's pre-zip format are read by `torch.load(..., weights_only=True)` when torch is
installed, and refused otherwise.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import zipfile
from collections.abc import Sequence
from pathlib import Path

import ml_dtypes
import numpy as np

from sigma_jax import torch_pickle
from sigma_jax.torch_errors import CheckpointError, printable, reading, short_repr
from sigma_jax.torch_zip import MAX_READ, Archive

__all__ = ["CheckpointError", "LazyTensor", "check_shared", "load_torch_file", "read_into",
           "read_tensors"]

# The first bytes of torch's pre-zip format: pickle protocol 2, then its magic number as a long.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_MAX_NDIM = 16
_MAX_DIM = 1 << 62  # every size, stride and offset is below this
_MAX_KEY = 64  # characters of a storage key


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
    storage from element `offset`, a non-overlapping view inside it. `numpy()` reads it: a new
    native-endian array of `dtype`."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        return self.storage.dtype

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def numpy(self) -> np.ndarray:
        return read_tensors([self])[0]


def _int(value, what: str) -> int:
    """`value` if it is an int in [0, 2^62), else CheckpointError."""
    if type(value) is not int or not 0 <= value < _MAX_DIM:
        raise CheckpointError(f"malformed tensor record: {what} is {short_repr(value)}")
    return value


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> LazyTensor:
    """torch._utils._rebuild_tensor(_v2): a view of `storage`, checked to lie inside it."""
    if not isinstance(storage, _Storage):
        raise CheckpointError("malformed tensor record: its storage is not a torch storage")
    if type(size) not in (tuple, list) or type(stride) not in (tuple, list) or \
            len(size) != len(stride) or len(size) > _MAX_NDIM:
        raise CheckpointError("malformed tensor record: size and stride do not match")
    for n in (storage_offset, *size, *stride):
        if type(n) is int and n < 0:
            raise CheckpointError("malformed tensor record: negative size, stride or offset")
    offset = _int(storage_offset, "storage_offset")
    shape = tuple(_int(n, "size") for n in size)
    strides = tuple(_int(n, "stride") for n in stride)
    _check_view(storage, offset, shape, strides)
    return LazyTensor(storage, offset, shape, strides)


def _check_view(storage: _Storage, offset: int, shape, strides) -> None:
    """CheckpointError unless the view (offset, shape [n_i], strides [s_i]) lies inside `storage`
    and no two of its elements share a storage element: with the dimensions of size > 1 sorted
    by stride, each stride exceeds the span of all smaller ones (contiguous, transposed, permuted
    and sliced layouts pass; zero and overlapping strides do not)."""
    if 0 in shape:
        if offset > storage.numel:
            raise CheckpointError(f"malformed tensor record: a view past the end of "
                                  f"{short_repr(storage.entry)}")
        return
    span = 1  # elements from the view's first to its last, so far
    for n, st in sorted(((n, st) for n, st in zip(shape, strides, strict=True) if n > 1),
                        key=lambda pair: pair[1]):
        if st < span:
            raise CheckpointError(f"malformed tensor record: a view whose elements overlap "
                                  f"(sizes {list(shape)}, strides {list(strides)})")
        span += (n - 1) * st
    if offset + span > storage.numel:
        raise CheckpointError(f"malformed tensor record: a view past the end of "
                              f"{short_repr(storage.entry)}")


def _rebuild_parameter(data, *_ignored) -> LazyTensor:
    """torch._utils._rebuild_parameter(_with_state): an nn.Parameter is its tensor."""
    if not isinstance(data, LazyTensor):
        raise CheckpointError("malformed parameter record: its data is not a tensor")
    return data


def _ordered_dict(*args) -> collections.OrderedDict:
    """collections.OrderedDict(), as torch pickles it: no arguments (items come by SETITEMS)."""
    if args:
        raise CheckpointError("malformed pickle: an OrderedDict built from arguments")
    return collections.OrderedDict()


_GLOBALS = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): _ordered_dict,
}


class _Loader:
    """The two hooks of the pickle machine for one archive."""

    def __init__(self, archive: Archive, prefix: str, big_endian: bool):
        self.archive, self.prefix, self.big_endian = archive, prefix, big_endian
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        if (module, name) in _GLOBALS:
            return torch_pickle.Global(f"{module}.{name}", _GLOBALS[(module, name)])
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise CheckpointError(f"refused to load {module}.{name}: a published checkpoint holds "
                              "only tensors and plain containers")

    def persistent_load(self, pid) -> _Storage:
        """('storage', storage type, key, location, numel) -> that storage, whose entry must
        hold exactly numel elements (the same key always with the same type and numel)."""
        ok = type(pid) is tuple and len(pid) == 5 and type(pid[0]) is str and \
            pid[0] == "storage" and isinstance(pid[1], _StorageType) and \
            type(pid[2]) is str and 0 < len(pid[2]) <= _MAX_KEY and type(pid[3]) is str
        if not ok:
            raise CheckpointError(f"refused persistent id {short_repr(pid)}: not a torch storage")
        dtype, entry = pid[1].dtype, f"{self.prefix}/data/{pid[2]}"
        numel = _int(pid[4], "storage numel")
        if self.archive.size(entry) != numel * dtype.itemsize:
            raise CheckpointError(f"storage {short_repr(entry)} holds "
                                  f"{self.archive.size(entry)} bytes, not {numel} x "
                                  f"{dtype.itemsize}")
        storage = _Storage(str(self.archive.path), entry, dtype, numel, self.big_endian)
        if self.storages.setdefault(entry, storage) != storage:
            raise CheckpointError(f"storage {short_repr(entry)} is declared with two types")
        return self.storages[entry]


def load_torch_file(path) -> object:
    """The object `torch.save` wrote to `path`, read without torch: tensors are `LazyTensor`s,
    containers are dict / OrderedDict / list / tuple, leaves are plain Python values.

    A pickle that asks for any other class or function raises CheckpointError before building
    it; so does any damaged, truncated, compressed, oversized or otherwise foreign file, with a
    one-line message. Files in torch's pre-zip format go through
    `torch.load(weights_only=True)` (tensors become numpy arrays) when torch is installed.
    Missing file: FileNotFoundError.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(printable(f"no checkpoint file {path}"))
    with reading(path):
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_MAGIC))
        if not zipfile.is_zipfile(path):
            if head.startswith(b"PK"):
                raise CheckpointError(f"{path} is a damaged or truncated zip archive")
            if head == _LEGACY_MAGIC:
                return _load_legacy(path)
            raise CheckpointError(f"{path} is not a PyTorch checkpoint (not a zip archive)")
        with Archive(path) as archive:
            return _load_archive(archive)


def _load_archive(archive: Archive) -> object:
    names = archive.names()
    pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise CheckpointError(f"{archive.path} is a zip archive but not a PyTorch checkpoint "
                              "(no <name>/data.pkl)")
    prefix = pickles[0][: -len("/data.pkl")]
    order = f"{prefix}/byteorder"
    big = False
    if order in names:
        if archive.size(order) not in (3, 4, 6, 7):
            raise CheckpointError(f"{archive.path}: {short_repr(order)} is not a byte order")
        word = bytes(archive.read(order, archive.size(order))).strip()
        if word not in (b"little", b"big"):
            raise CheckpointError(f"{archive.path}: byte order {short_repr(word)}")
        big = word == b"big"
    size = archive.size(pickles[0])
    if size > torch_pickle.MAX_PICKLE_BYTES:
        raise CheckpointError(f"{archive.path}: a pickle of {size} bytes (at most "
                              f"{torch_pickle.MAX_PICKLE_BYTES})")
    data = bytes(archive.read(pickles[0], size))
    loader = _Loader(archive, prefix, big)
    return torch_pickle.load(data, loader.find_class, loader.persistent_load, (LazyTensor,))


def check_shared(tensors: Sequence[LazyTensor]) -> None:
    """CheckpointError unless the tensors asked of each storage hold at most as many elements
    as it does all together (so the arrays of `tensors` hold at most the bytes of the storages
    they come from, which lie in the file). ValueError for tensors of several files."""
    if len({t.storage.path for t in tensors}) > 1:
        raise ValueError("tensors of several files")
    asked: dict[_Storage, list[int]] = {}
    for t in tensors:
        asked.setdefault(t.storage, [0, 0])
        asked[t.storage][0] += 1
        asked[t.storage][1] += t.size
    for storage, (count, elements) in asked.items():
        if elements > storage.numel:
            raise CheckpointError(f"{storage.path}: {count} tensors share storage "
                                  f"{short_repr(storage.entry)} of {storage.numel} elements "
                                  "and need more elements than it holds")


def read_tensors(tensors: Sequence[LazyTensor]) -> list[np.ndarray]:
    """The values of `tensors` (all from one file): new native-endian arrays [shape] of their
    dtypes, in order (`read_into` new arrays, after `check_shared`)."""
    check_shared(tensors)
    out = [np.empty(t.shape, t.dtype) for t in tensors]
    read_into(tensors, out)
    return out


def read_into(tensors: Sequence[LazyTensor], out: Sequence[np.ndarray]) -> None:
    """Write the value of each of `tensors` (all from one file, `check_shared`) into the
    writable array of its shape at the same place of `out` (any layout, any dtype its values
    cast to, as `astype` casts them). Each storage is read once; one that holds exactly one
    C-ordered tensor goes into it `MAX_READ` bytes (or one row of its first axis) at a time,
    any other is read whole first. So beyond `out` this needs at most the largest storage
    shared by several tensors or read through a strided view (none, in what torch.save writes
    for a model) plus a chunk. CheckpointError for a damaged file; then `out` holds garbage."""
    if len(out) != len(tensors) or any(
            o.shape != t.shape for o, t in zip(out, tensors, strict=True)):
        raise ValueError("read_into: the arrays do not have the shapes of the tensors")
    check_shared(tensors)
    groups: dict[_Storage, list[int]] = {}
    for i, t in enumerate(tensors):
        if t.size:
            groups.setdefault(t.storage, []).append(i)
    if not groups:
        return
    with reading(tensors[0].storage.path), Archive(tensors[0].storage.path) as archive:
        for storage, members in groups.items():
            if len(members) == 1 and _fills(tensors[members[0]]):
                _stream(archive, tensors[members[0]], out[members[0]])
                continue
            flat = _flat(storage, archive.read(storage.entry, _nbytes(storage)))
            for i in members:
                np.copyto(out[i], _view(flat, tensors[i]), casting="unsafe")


def _nbytes(storage: _Storage) -> int:
    return storage.numel * storage.dtype.itemsize


def _flat(storage: _Storage, raw) -> np.ndarray:
    """The elements of `storage` in the bytes `raw` (its byte order)."""
    return np.frombuffer(raw, storage.dtype.newbyteorder(">" if storage.big_endian else "<"))


def _fills(t: LazyTensor) -> bool:
    """Whether `t` is its whole storage in C order (so its storage's bytes, row by row of its
    first axis, are its rows)."""
    if t.offset or t.size != t.storage.numel or not t.shape:
        return False
    step = 1
    for n, st in reversed(tuple(zip(t.shape, t.stride, strict=True))):
        if n > 1 and st != step:
            return False
        step *= n
    return True


def _stream(archive: Archive, t: LazyTensor, out: np.ndarray) -> None:
    """Write `t` (one that `_fills` its storage) into `out`, a few rows of its first axis at a
    time."""
    row = t.size // t.shape[0]
    rows = max(1, MAX_READ // (row * t.dtype.itemsize))
    done = 0
    for raw in archive.chunks(t.storage.entry, _nbytes(t.storage), rows * row * t.dtype.itemsize):
        part = _flat(t.storage, raw)
        n = part.size // row
        np.copyto(out[done:done + n], part.reshape(n, *t.shape[1:]), casting="unsafe")
        done += n


def _view(flat: np.ndarray, t: LazyTensor) -> np.ndarray:
    """The view `t` of the storage elements `flat` (checked to lie inside it when `t` was built;
    the stride of a dimension of size 0 or 1 is never used)."""
    strides = [st * flat.itemsize if n > 1 else 0 for n, st in zip(t.shape, t.stride, strict=True)]
    return np.lib.stride_tricks.as_strided(flat[t.offset:], t.shape, strides, writeable=False)


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
