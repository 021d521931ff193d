"""Hand-made torch checkpoints for the reader's tests: pickles written opcode by opcode (no
`pickle.dumps`, no torch) and zips laid out as `torch.save` lays them out.

- `encode(value)`: protocol-2 opcodes of a value tree of None, bool, int, float, str, list,
  tuple, dict, OrderedDict, `Tensor` (a `_rebuild_tensor_v2` record) and `Raw` (opcodes as given).
- `pickle_of(value)`: PROTO 2, the value, STOP.
- `tiny_model(args)`: (model_args, {name: Tensor}, {key: bytes}, {name: float32 array}) of a
  published-format model (default: n_layer 1, n_embd 4, block_size 2, vocab 3), every weight in
  a storage of its own with distinct values.
- `official(...)`: the published checkpoint dict around a state dict.
- `write_archive(path, pickle_bytes, storages)`: the zip (stored entries, like torch).
- `ESC`: terminal escape sequences, a payload for names and messages.
"""

from __future__ import annotations

import collections
import dataclasses
import struct
import zipfile

import numpy as np

PROTO2, STOP, MARK = b"\x80\x02", b".", b"("


@dataclasses.dataclass(frozen=True)
class Raw:
    """Opcodes written as they are."""

    data: bytes


@dataclasses.dataclass(frozen=True)
class Tensor:
    """torch._utils._rebuild_tensor_v2(storage key of `numel` `storage` elements, offset, shape,
    stride, False, OrderedDict())."""

    key: str
    numel: int
    shape: tuple
    stride: tuple
    offset: int = 0
    storage: str = "FloatStorage"


def unicode(text: str) -> bytes:
    data = text.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(data)) + data


def integer(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if -(1 << 31) <= n < (1 << 31):
        return b"J" + struct.pack("<i", n)
    data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


def global_(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _items(pairs) -> bytes:
    body = b"".join(encode(k) + encode(v) for k, v in pairs)
    return MARK + body + b"u" if body else b""


def encode(value) -> bytes:
    """Protocol-2 opcodes that build `value` (no memo)."""
    if isinstance(value, Raw):
        return value.data
    if isinstance(value, Tensor):
        pid = MARK + unicode("storage") + global_("torch", value.storage) + unicode(value.key) \
            + unicode("cpu") + encode(value.numel) + b"t"
        args = MARK + pid + b"Q" + encode(value.offset) + encode(tuple(value.shape)) \
            + encode(tuple(value.stride)) + b"\x89" + encode(collections.OrderedDict()) + b"t"
        return global_("torch._utils", "_rebuild_tensor_v2") + args + b"R"
    if value is None:
        return b"N"
    if isinstance(value, bool):
        return b"\x88" if value else b"\x89"
    if isinstance(value, int):
        return integer(value)
    if isinstance(value, float):
        return b"G" + struct.pack(">d", value)
    if isinstance(value, str):
        return unicode(value)
    if isinstance(value, list):
        body = b"".join(encode(v) for v in value)
        return b"]" + (MARK + body + b"e" if body else b"")
    if isinstance(value, tuple):
        return MARK + b"".join(encode(v) for v in value) + b"t"
    if isinstance(value, collections.OrderedDict):
        return global_("collections", "OrderedDict") + b")R" + _items(value.items())
    if isinstance(value, dict):
        return b"}" + _items(value.items())
    raise TypeError(type(value))


def pickle_of(value) -> bytes:
    return PROTO2 + encode(value) + STOP


ESC = "\x1b]0;owned\x07\x1b[2J"  # sets a terminal title, clears the screen

TINY_ARGS = {"n_layer": 1, "n_head": 1, "n_embd": 4, "block_size": 2, "bias": False,
             "vocab_size": 3, "dropout": 0.0}


def model_shapes(args: dict) -> dict[str, tuple]:
    """published name -> torch shape (kernels [out, in]) of a bias-free model of `args`."""
    d, layers = args["n_embd"], args["n_layer"]
    shapes = {"transformer.wte.weight": (args["vocab_size"], d),
              "transformer.wpe.weight": (args["block_size"], d // 2)}
    for i in range(layers):
        h = f"transformer.h.{i}."
        shapes.update({h + "ln_1.weight": (d,), h + "attn.c_attn.weight": (3 * d, d),
                       h + "attn.c_proj.weight": (d, d), h + "ln_2.weight": (d,),
                       h + "mlp.c_fc.weight": (4 * d, d), h + "mlp.c_proj.weight": (d, 4 * d)})
    shapes["transformer.ln_f.weight"] = (d,)
    return shapes


def contiguous(shape: tuple) -> tuple:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def tiny_model(args: dict | None = None):
    """(model_args, state dict {name: Tensor}, storages {key: bytes}, {name: float32 values}) of
    the model `args` (default TINY_ARGS), every weight in a storage of its own, values distinct."""
    args = dict(TINY_ARGS if args is None else args)
    tensors, storages, values = collections.OrderedDict(), {}, {}
    start = 0
    for key, (name, shape) in enumerate(model_shapes(args).items()):
        numel = int(np.prod(shape))
        data = (np.arange(start, start + numel, dtype=np.float32) / 7).reshape(shape)
        start += numel
        tensors[name] = Tensor(str(key), numel, shape, contiguous(shape))
        storages[str(key)] = data.astype("<f4").tobytes()
        values[name] = data
    return args, tensors, storages, values


def official(model_args, state_dict, iter_num=5, config=None):
    return {"model": state_dict, "model_args": model_args, "iter_num": iter_num,
            "config": {"dataset": "shakespeare_char"} if config is None else config}


def write_archive(path, data: bytes, storages: dict, prefix: str = "ckpt",
                  compression: int = zipfile.ZIP_STORED) -> None:
    """A torch-style zip: <prefix>/data.pkl, byteorder, data/<key> for each storage."""
    with zipfile.ZipFile(path, "w", compression=compression) as z:
        z.writestr(f"{prefix}/data.pkl", data)
        z.writestr(f"{prefix}/byteorder", "little")
        for key, raw in storages.items():
            z.writestr(f"{prefix}/data/{key}", raw)
        z.writestr(f"{prefix}/version", "3\n")


def write_tiny(path, model_args=None, state_dict=None, storages=None, **kwargs) -> None:
    """The tiny model (or the parts given instead) as a published checkpoint at `path`; a
    `model_args` alone makes a full model of that size."""
    args, tensors, raw, _ = tiny_model(model_args if state_dict is None else None)
    value = official(args if model_args is None else model_args,
                     tensors if state_dict is None else state_dict, **kwargs)
    write_archive(path, pickle_of(value), raw if storages is None else storages)


# ---------------------------------------------------------------- zip records

CENTRAL = struct.Struct("<4s6H3I5H2I")  # central directory record, 46 bytes
LOCAL = struct.Struct("<4s5H3I2H")  # local header, 30 bytes
END = struct.Struct("<4s4H2IH")  # end of central directory, 22 bytes


def records(data: bytes) -> dict[str, list[int]]:
    """Offsets of the zip records of `data`: 'local', 'central', 'end'."""
    found = {"local": [], "central": [], "end": []}
    for kind, signature in (("local", b"PK\x03\x04"), ("central", b"PK\x01\x02"),
                            ("end", b"PK\x05\x06")):
        at = data.find(signature)
        while at >= 0:
            found[kind].append(at)
            at = data.find(signature, at + 1)
    return found


def patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    """`data` with the little-endian field `fmt` at `offset` set to `value`."""
    out = bytearray(data)
    struct.pack_into("<" + fmt, out, offset, value)
    return bytes(out)
