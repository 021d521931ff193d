"""A pickle machine for torch checkpoints whose cost is bounded by its input.

`load(data, find_class, persistent_load, leaf_types)` runs the pickle `data` opcode by opcode
(decoded by `pickletools.genops`), building only what a torch checkpoint holds: None, bools, ints
of at most 64 bits, floats, str, bytes, tuples, lists, dicts and OrderedDicts with scalar keys,
and what the two hooks return. Nothing else is ever imported or called:

- GLOBAL / STACK_GLOBAL give whatever `find_class(module, name)` returns (it refuses by raising);
  REDUCE calls only a `Global` it returned.
- BINPERSID gives `persistent_load(pid)`.
- BUILD is allowed only with a dict state on an OrderedDict (torch's `_metadata`); the state is
  dropped, so no attribute is ever set on anything.
- APPEND(S) and SETITEM(S) act only on lists and dicts; dict keys must be None, bool, int, float,
  str or bytes (so hashing never recurses).
- Opcodes of classes, extensions, sets, py2 strings, bytearrays and out-of-band buffers are
  refused.

Limits: `MAX_PICKLE_BYTES` of pickle, `MAX_OPCODES` opcodes (so at most that many objects), and a
result whose tree (shared containers counted each time they are reached) has at most `MAX_NODES`
values and depth `MAX_DEPTH`, with `leaf_types` objects and scalars as its only leaves. Every
refusal is a CheckpointError.
"""

from __future__ import annotations

import collections
import dataclasses
import pickletools
from collections.abc import Callable

from sigma_jax.torch_errors import CheckpointError, printable, short_repr

MAX_PICKLE_BYTES = 8 << 20
MAX_OPCODES = 400_000
MAX_NODES = 200_000
MAX_DEPTH = 64
_INT_BITS = 64

_SCALARS = (type(None), bool, int, float, str, bytes)
_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}
_VALUE_OPS = frozenset({
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
    "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES",
    "BINBYTES8"})
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_IGNORED_OPS = frozenset({"PROTO", "FRAME"})


@dataclasses.dataclass(frozen=True, slots=True)
class Global:
    """A function a pickle may call with REDUCE: `call(*args)`. `name` is for messages."""

    name: str
    call: Callable


class _Machine:
    """The unpickler's state: the stack, the marks (stack heights) and the memo."""

    def __init__(self, find_class: Callable, persistent_load: Callable):
        self.find_class, self.persistent_load = find_class, persistent_load
        self.stack: list = []
        self.marks: list[int] = []
        self.memo: dict[int, object] = {}

    def fail(self, message: str):
        raise CheckpointError(f"malformed pickle: {message}")

    def push(self, value) -> None:
        self.stack.append(value)

    def pop(self):
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            self.fail("stack underflow")
        return self.stack.pop()

    def top(self):
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            self.fail("stack underflow")
        return self.stack[-1]

    def pop_mark(self) -> list:
        if not self.marks:
            self.fail("no mark on the stack")
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def step(self, name: str, arg) -> None:
        """Run one opcode (all but STOP)."""
        if name in _CONSTANTS:
            self.push(_CONSTANTS[name])
        elif name in _VALUE_OPS:
            if isinstance(arg, int) and abs(arg).bit_length() > _INT_BITS:
                self.fail(f"an integer of {abs(arg).bit_length()} bits")
            self.push(arg)
        elif name in _PUT_OPS:
            self.memo[arg] = self.top()
        elif name == "MEMOIZE":
            self.memo[len(self.memo)] = self.top()
        elif name in _GET_OPS:
            if arg not in self.memo:
                self.fail(f"memo entry {short_repr(arg)} is read before it is written")
            self.push(self.memo[arg])
        elif name == "MARK":
            self.marks.append(len(self.stack))
        elif name not in _IGNORED_OPS:
            handler = getattr(self, f"op_{name.lower()}", None)
            if handler is None:
                raise CheckpointError(f"refused pickle opcode {name}: a torch checkpoint does "
                                      "not use it")
            handler(arg)

    # ---------------------------------------------------------------- stack and containers

    def op_pop(self, _):
        if len(self.stack) > (self.marks[-1] if self.marks else 0):
            self.stack.pop()
        else:
            self.pop_mark()

    def op_pop_mark(self, _):
        self.pop_mark()

    def op_dup(self, _):
        self.push(self.top())

    def op_empty_tuple(self, _):
        self.push(())

    def op_tuple(self, _):
        self.push(tuple(self.pop_mark()))

    def op_tuple1(self, _):
        self.push((self.pop(),))

    def op_tuple2(self, _):
        second = self.pop()
        self.push((self.pop(), second))

    def op_tuple3(self, _):
        third, second = self.pop(), self.pop()
        self.push((self.pop(), second, third))

    def op_empty_list(self, _):
        self.push([])

    def op_list(self, _):
        self.push(self.pop_mark())

    def op_append(self, _):
        item = self.pop()
        self.list_target().append(item)

    def op_appends(self, _):
        items = self.pop_mark()
        self.list_target().extend(items)

    def list_target(self) -> list:
        target = self.top()
        if type(target) is not list:
            self.fail(f"APPEND to a {type(target).__name__}")
        return target

    def op_empty_dict(self, _):
        self.push({})

    def op_dict(self, _):
        items = self.pop_mark()
        self.push({})
        self.set_items(items)

    def op_setitem(self, _):
        value, key = self.pop(), self.pop()
        self.set_items([key, value])

    def op_setitems(self, _):
        self.set_items(self.pop_mark())

    def set_items(self, items: list) -> None:
        target = self.top()
        if type(target) not in (dict, collections.OrderedDict):
            self.fail(f"SETITEM on a {type(target).__name__}")
        if len(items) % 2:
            self.fail("a dict with a key and no value")
        for key, value in zip(items[::2], items[1::2], strict=True):
            if type(key) not in _SCALARS:
                self.fail(f"a dict key of type {type(key).__name__}")
            target[key] = value

    # ---------------------------------------------------------------- globals and objects

    def op_global(self, arg):
        module, _, name = arg.partition(" ")
        self.push(self.find_class(module, name))

    def op_stack_global(self, _):
        name, module = self.pop(), self.pop()
        if type(module) is not str or type(name) is not str:
            self.fail("STACK_GLOBAL of a non-string name")
        self.push(self.find_class(module, name))

    def op_reduce(self, _):
        args, func = self.pop(), self.pop()
        if not isinstance(func, Global):
            self.fail(f"a call of {short_repr(func)}, not of an allowed torch function")
        if type(args) is not tuple:
            self.fail(f"{func.name} called with {type(args).__name__} arguments")
        self.push(func.call(*args))

    def op_build(self, _):
        state = self.pop()
        target = self.top()
        if type(target) is not collections.OrderedDict or type(state) is not dict:
            self.fail(f"BUILD of a {type(target).__name__} with a {type(state).__name__} state "
                      "(a torch checkpoint sets state only on OrderedDicts, from a dict)")

    def op_binpersid(self, _):
        self.push(self.persistent_load(self.pop()))


def _check_tree(root, leaf_types: tuple[type, ...]) -> None:
    """CheckpointError unless `root` is a tree of lists, tuples and dicts at most MAX_DEPTH deep
    with at most MAX_NODES values (a container reached twice counts twice; a cycle is
    infinitely deep) whose leaves are scalars or `leaf_types`."""
    stack, nodes = [(root, 1)], 1
    while stack:
        value, depth = stack.pop()
        if type(value) in (list, tuple):
            children = value
        elif type(value) in (dict, collections.OrderedDict):
            children = value.values()
        elif type(value) in _SCALARS or isinstance(value, leaf_types):
            continue
        else:
            raise CheckpointError(f"the pickle holds a {type(value).__name__}, not tensors and "
                                  "plain containers")
        if depth >= MAX_DEPTH:
            raise CheckpointError(f"the pickle nests containers more than {MAX_DEPTH} deep "
                                  "(or in a cycle)")
        nodes += len(children)
        if nodes > MAX_NODES:
            raise CheckpointError(f"the pickle holds more than {MAX_NODES} values (a container "
                                  "counts each time it is reached)")
        stack.extend((child, depth + 1) for child in children)


def load(data: bytes, find_class: Callable, persistent_load: Callable,
         leaf_types: tuple[type, ...] = ()) -> object:
    """The object pickled in `data` (see the module docstring for what is built and the limits).

    find_class(module, name): a `Global` (callable by REDUCE) or an inert value; raises to refuse.
    persistent_load(pid): the object a persistent id stands for; raises to refuse.
    Any malformed, truncated or oversized pickle: CheckpointError.
    """
    if len(data) > MAX_PICKLE_BYTES:
        raise CheckpointError(f"a pickle of {len(data)} bytes (at most {MAX_PICKLE_BYTES})")
    machine = _Machine(find_class, persistent_load)
    try:
        for count, (opcode, arg, pos) in enumerate(pickletools.genops(data)):
            if count >= MAX_OPCODES:
                raise CheckpointError(f"a pickle of more than {MAX_OPCODES} opcodes")
            if opcode.name == "STOP":
                result = machine.pop()
                if machine.stack or machine.marks or pos + 1 != len(data):
                    machine.fail("data left after STOP")
                _check_tree(result, leaf_types)
                return result
            machine.step(opcode.name, arg)
    except ValueError as error:  # genops: truncated or unknown opcode; CheckpointError passes
        if isinstance(error, CheckpointError):
            raise
        detail = error.args[0] if error.args and isinstance(error.args[0], str) else ""
        raise CheckpointError(f"damaged pickle ({printable(detail, 160)})") from error
    raise CheckpointError("damaged pickle: it ends before STOP")
