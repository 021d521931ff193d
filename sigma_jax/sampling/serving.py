"""The serving loop: requests from a queue through the engine's slots, results as they complete.

Each finished slot is refilled at once from the queue (continuous batching), so a batch never
waits for its slowest row. A request that fails its checks is answered with its one-line error
and takes no slot; nothing else is lost."""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from sigma_jax.checks import check_int, short_repr
from sigma_jax.config import ModelConfig
from sigma_jax.model import check_params
from sigma_jax.sampling import engine
from sigma_jax.sampling.call import SampleStats
from sigma_jax.sampling.options import SampleOptions


@dataclasses.dataclass(frozen=True)
class Request:
    """One sequence to complete: tokens int [L] (values at unknown positions ignored), known
    bool [L], key: a typed PRNG key (the request's own stream). L <= the engine's capacity."""

    tokens: np.ndarray
    known: np.ndarray
    key: jax.Array


@dataclasses.dataclass(frozen=True)
class Result:
    """What became of request `index`: its tokens int32 [L] and SampleStats (one row), or the
    one-line `error` that refused it. steps: the engine steps from its insert to its end;
    at_step: the engine step at which it ended; seconds: wall time from the start of `serve`
    to its end."""

    index: int
    tokens: np.ndarray | None = None
    stats: SampleStats | None = None
    error: str | None = None
    steps: int = 0
    at_step: int = 0
    seconds: float = 0.0


def check_request(cfg: ModelConfig, request: Request, capacity: int) -> None:
    """One-line ValueError unless the request fits an engine of `capacity` positions: 1-D integer
    tokens and boolean known of one length L in [1, capacity] and <= block_size, then
    `engine.check_request` on it padded (ids in [0, V), a typed key, a known token without a
    start token)."""
    if not isinstance(request, Request):
        raise ValueError(f"a request must be a sigma_jax.sampling.Request(tokens, known, key); "
                         f"got {short_repr(request)}")
    tokens, known = np.asarray(request.tokens), np.asarray(request.known)
    if tokens.ndim != 1 or known.shape != tokens.shape:
        raise ValueError(f"tokens and known must both be [L]; got {tokens.shape} and "
                         f"{known.shape}")
    if tokens.shape[0] > cfg.block_size:
        raise ValueError(f"request length {tokens.shape[0]} exceeds the model's block_size "
                         f"{cfg.block_size}")
    if not 1 <= tokens.shape[0] <= capacity:
        raise ValueError(f"request length {tokens.shape[0]} must lie in [1, {capacity}] "
                         "(the engine's capacity)")
    if not np.issubdtype(tokens.dtype, np.integer) or known.dtype != bool:
        raise ValueError(f"tokens must be integer ids and known booleans; got {tokens.dtype} "
                         f"and {known.dtype}")
    engine.check_request(cfg, capacity, *_padded(request, capacity), request.key)


def serve(cfg: ModelConfig, params: dict, requests: Iterable[Request], *, slots: int,
          options: SampleOptions, capacity: int | None = None,
          steps_per_call: int = 1, mesh=None, devices=None) -> Iterator[Result]:
    """Complete every request through an engine of `slots` slots and `capacity` positions
    (default: the longest request the model can serve, read ahead; block_size when none
    can), yielding a `Result` per request as it completes (not in order); a request that
    fails `check_request` gets its one-line error in its Result.
    Bad arguments (requests not an iterable, slots, options, capacity, steps_per_call, mesh,
    devices) are one-line ValueErrors before any request runs; slots, capacity and
    steps_per_call are integers (numpy integers and 0-d integer arrays accepted). Each
    request's tokens are bitwise those of the one-shot sampler on it alone with its key.
    steps_per_call: sampler iterations per engine call (more amortize dispatch; a slot
    finished mid-call idles until the call ends). mesh: shard the slots over its batch axes
    (`engine.init`); params should then be placed on it (`shard_params`).

    devices: a list of devices instead of one engine: each runs an engine of its own share of
    the slots (as even as can be; slots >= len(devices)) on its own copy of the params. Each
    step is dispatched to every device before any result is read, so the devices run side by
    side (on a CPU host split by `jax_num_cpu_devices`, the cores)."""
    steps_per_call = check_int("steps_per_call", steps_per_call, 1)
    check_params(cfg, params)
    if not isinstance(requests, Iterable):
        raise ValueError(f"requests must be an iterable of sigma_jax.sampling.Request; got "
                         f"{short_repr(requests)}")
    requests = list(requests)
    if capacity is None:
        capacity = max(filter(None, (_servable_length(cfg, r) for r in requests)),
                       default=cfg.block_size)
    slots, capacity = engine.check_init(cfg, options, slots, capacity)
    engines = _engines(cfg, params, options, slots, capacity, mesh, devices)
    queue = list(enumerate(requests))
    steps, start = 0, time.perf_counter()
    clock = lambda: time.perf_counter() - start
    while queue or any(e.busy() for e in engines):
        for e in engines:
            yield from e.fill(cfg, queue, capacity, steps, clock)
        working = [e for e in engines if e.busy()]
        if not working:
            break
        for e in working:  # dispatched to every device before any result is read
            e.advance(cfg, steps_per_call)
        steps += steps_per_call
        for e in working:
            yield from e.finish(requests, steps, clock)


@dataclasses.dataclass
class _Engine:
    """One engine of the serving loop: its state, the params it reads (on its device), the
    request each slot holds ((request index, step it entered) or None), its last `finished`."""

    state: engine.EngineState
    params: dict
    held: list
    done: jax.Array | None = None

    def busy(self) -> bool:
        return any(h is not None for h in self.held)

    def fill(self, cfg, queue: list, capacity: int, steps: int, clock) -> Iterator[Result]:
        """Insert requests from the head of `queue` into the free slots; yield the Result of
        each request that fails its checks (it takes no slot)."""
        for slot in range(len(self.held)):
            while self.held[slot] is None and queue:
                index, request = queue.pop(0)
                try:
                    check_request(cfg, request, capacity)
                except ValueError as error:
                    yield Result(index, error=str(error), seconds=clock())
                    continue
                # Checked above (and the params by `serve`): the insert itself.
                self.state = engine._insert(cfg, self.params, self.state, jnp.int32(slot),
                                            *_padded(request, capacity), request.key)
                self.held[slot] = (index, steps)

    def advance(self, cfg, iterations: int) -> None:
        """Dispatch `iterations` sampler iterations (asynchronously: nothing is read)."""
        self.state, self.done = _advance(cfg, self.params, self.state, iterations)

    def finish(self, requests: list, steps: int, clock) -> Iterator[Result]:
        """Yield the Result of every request whose slot the last `advance` finished, and free
        its slot."""
        for slot in np.flatnonzero(np.asarray(self.done)):
            index, entered = self.held[slot]
            self.state, tokens, stats = _collect(self.state, jnp.int32(slot))
            length = np.asarray(requests[index].tokens).shape[0]
            yield Result(index, tokens=np.asarray(tokens)[:length], stats=jax.device_get(stats),
                         steps=steps - entered, at_step=steps, seconds=clock())
            self.held[slot] = None


def _engines(cfg, params, options, slots: int, capacity: int, mesh, devices) -> list[_Engine]:
    """One engine of `slots` slots (on `mesh`, or the default device), or one per device of
    `devices` with its share of the slots. One-line ValueErrors first."""
    if devices is None:
        state = engine.init(cfg, options, slots, capacity, mesh=mesh)
        return [_Engine(state, params, [None] * slots)]
    if mesh is not None:
        raise ValueError("give serve a mesh or devices, not both")
    devices = _device_list(devices)
    if slots < len(devices):
        raise ValueError(f"slots ({slots}) must be at least the number of devices "
                         f"({len(devices)}): each device runs an engine of >= 1 slot")
    shares = [slots // len(devices) + (i < slots % len(devices)) for i in range(len(devices))]
    return [_Engine(jax.device_put(engine.init(cfg, options, share, capacity), device),
                    jax.device_put(params, device), [None] * share)
            for share, device in zip(shares, devices, strict=True)]


def _device_list(devices) -> list:
    """`devices` (any iterable of jax devices) as a list; a one-line ValueError unless it is
    a non-empty one."""
    listed = list(devices) if isinstance(devices, Iterable) else []
    if not listed or not all(isinstance(d, jax.Device) for d in listed):
        raise ValueError(f"devices must be a non-empty list of jax devices, e.g. "
                         f"jax.devices(); got {short_repr(devices)}")
    return listed


@functools.partial(jax.jit, static_argnames="iterations", donate_argnames="state")
def _advance(cfg, params, state, iterations):
    """`engine.step` and `engine.finished` in one call (one dispatch, one small read back)."""
    state = engine.step(cfg, params, state, iterations)
    return state, engine.finished(state)


@functools.partial(jax.jit, donate_argnames="state")
def _collect(state, slot):
    """`engine.result` of the slot, and the state with the slot released, in one call."""
    tokens, stats = engine._result(state, slot)
    return engine._release(state, slot), tokens, stats


def _servable_length(cfg: ModelConfig, request: Request) -> int | None:
    """The request's length if it passes `check_request` at capacity block_size, else None."""
    try:
        check_request(cfg, request, cfg.block_size)
    except ValueError:
        return None
    return np.asarray(request.tokens).shape[0]


def _padded(request: Request, capacity: int):
    """(tokens int32 [N], known bool [N], length int32 []) of a request padded to capacity N."""
    tokens = np.zeros(capacity, np.int32)
    known = np.zeros(capacity, bool)
    length = np.asarray(request.tokens).shape[0]
    tokens[:length] = np.where(request.known, request.tokens, 0)
    known[:length] = request.known
    return tokens, known, np.int32(length)
