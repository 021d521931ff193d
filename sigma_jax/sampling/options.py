"""The sampler options: one frozen value, validated once, that owns what derives from it.

    ar            cached any-order AR (`sample_ar`), one token per model call
    ar_nocache    the uncached oracle: a full forward pass per token
    burst         exact burst sampling (`sample_burst(mode='exact')`): draft + verify per iteration
    burst_jacobi  exact, one verify call per iteration (`sample_burst(mode='jacobi')`)
    burst_paper   the published rule with K candidate orders (`sample_burst(mode='paper')`; not
                  exact; random orders only)

A field is static (it selects a compiled kernel) or traced (an array argument of the kernel:
changing it never recompiles); the split is the field's `traced` metadata, so every caller reads
it from the type. Each option is checked in exactly one place: at construction for what needs no
context, and in `check_for(cfg, n)` for what needs the model and the sequence length.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sigma_jax.checks import INT32_MAX, check_choice, check_int, is_concrete, short_repr
from sigma_jax.config import ModelConfig
from sigma_jax.decode import cache_capacity
from sigma_jax.orders import KNOWN_ORDERS, ORDER_KINDS, check_explicit_known_order

SAMPLERS = ("ar", "ar_nocache", "burst", "burst_jacobi", "burst_paper")
AR_SAMPLERS = ("ar", "ar_nocache")
BURST_MODES = {"burst": "exact", "burst_jacobi": "jacobi", "burst_paper": "paper"}
MODES = tuple(BURST_MODES.values())
DRAFT_SUPPORT = 64  # burst_jacobi's default: tokens kept of each first draft's distribution
FIRST_DRAFTS = ("known", "start")  # burst_jacobi: what each first draft is conditioned on
_PAPER_ORDER = ("burst_paper (mode='paper') draws its own random candidate orders: use "
                "order='random' or another sampler")


def _traced(default):
    return dataclasses.field(default=default, metadata={"traced": True})


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """What one compiled sampler kernel is specialised on. mode: 'ar', 'ar_nocache', 'exact',
    'jacobi' or 'paper'; window: positions drafted or verified per iteration (1 for AR);
    n_orders: candidate orders (paper mode; 1 otherwise); top_k: None or k; draft_support:
    tokens kept of each first jacobi draft's distribution; first_drafts: what the first jacobi
    drafts are conditioned on ('known' outside jacobi)."""

    mode: str
    window: int
    n_orders: int
    top_k: int | None
    draft_support: int
    first_drafts: str = "known"

    def first_support(self, cfg: ModelConfig) -> int:
        """K: the tokens kept of each first jacobi distribution, min(draft_support, V)."""
        return min(self.draft_support, cfg.vocab_size)

    def cache_capacity(self, cfg: ModelConfig, n: int) -> int:
        """KV-cache slots at length n: every token, the start token, and one block of `window`
        new slots written past the last one."""
        return cache_capacity(cfg, n, headroom=self.window)


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    """Every option of a sampler.

    Static: sampler (one of SAMPLERS); order (a kind of `orders.ORDER_KINDS`: the generation
    order; burst_paper takes 'random' only; an explicit [B, N] order array is an input of the
    call, not an option); window (burst: positions drafted or verified per iteration, None = all
    remaining; in [1, N]); n_orders (burst_paper's K, default 5); top_k (None or in [1, V]);
    known_order (how order='random' feeds the known tokens: 'random' or 'ascending'); draft_support
    (burst_jacobi, >= 1: each first draft is drawn from the draft_support most probable tokens
    of its distribution, renormalized, which is what is kept of it until the position is
    verified: the law stays exact for any value; fewer means less memory, [B, N, K], and a
    lower first acceptance); first_drafts (burst_jacobi: what the first drafts are drawn
    from: 'known', each position's distribution given the row's known tokens, drafted per row;
    'start', given the start token alone, drafted once for the whole batch. Acceptance divides
    by whichever was drawn from, so the law stays exact; 'start' accepts a little less at
    first and skips each row's drafting passes, which pays where rows know different tokens;
    it needs a model with a start token).
    Traced: temperature (>= 0; 0 = greedy), top_p (None or in (0, 1]), max_iters (burst: None
    = N, else >= 1). Concrete traced values are checked and held as Python numbers; tracers
    (options built inside `jax.jit`) pass unchecked.

    Bad values raise a one-line ValueError at construction, and so does an option set away
    from its default on a sampler that would ignore it (`reads`): window or max_iters on an AR
    sampler, n_orders other than 1 on any but burst_paper, draft_support or first_drafts on any but
    burst_jacobi. Numpy integers are accepted wherever an int is.
    """

    sampler: str = "burst"
    order: str = "random"
    window: int | None = None
    n_orders: int = 5
    top_k: int | None = None
    known_order: str = "random"
    draft_support: int = DRAFT_SUPPORT
    first_drafts: str = "known"
    temperature: float | jax.Array = _traced(1.0)
    top_p: float | jax.Array | None = _traced(None)
    max_iters: int | jax.Array | None = _traced(None)

    def __post_init__(self):
        check_choice("sampler", self.sampler, SAMPLERS)
        check_choice("order", self.order, ORDER_KINDS)
        if self.sampler == "burst_paper" and self.order != "random":
            raise ValueError(_PAPER_ORDER)
        check_choice("known_order", self.known_order, KNOWN_ORDERS)
        check_choice("first_drafts", self.first_drafts, FIRST_DRAFTS)
        set_field = lambda name, value: object.__setattr__(self, name, value)
        set_field("window", _window(self.window))
        set_field("n_orders", check_int("n_orders", self.n_orders, 1))
        set_field("draft_support", check_int("draft_support", self.draft_support, 1))
        if self.top_k is not None:
            set_field("top_k", check_int("top_k", self.top_k, 1))
        set_field("temperature", _traced_number("temperature", self.temperature, float))
        if self.top_p is not None:
            set_field("top_p", _traced_number("top_p", self.top_p, float))
        if self.max_iters is not None:
            set_field("max_iters", _traced_number("max_iters", self.max_iters, int))
        self._check_read()

    def _check_read(self) -> None:
        """A one-line ValueError for an option set (not at its default) on a sampler that does
        not read it (`reads`). n_orders=1 is what every other sampler does (one order), so it
        passes too."""
        for name, (_, who) in _READ_BY.items():
            value, default = getattr(self, name), _DEFAULTS[name]
            given = value is not None if default is None else value != default
            given = given and not (name == "n_orders" and value == 1)
            if given and not self.reads(name):
                raise ValueError(f"{name} applies to {who} only; got sampler {self.sampler!r} "
                                 f"with {name}={short_repr(value)}")

    def reads(self, name: str) -> bool:
        """Whether the sampler reads option `name`: window and max_iters only the burst
        samplers, n_orders only burst_paper, draft_support and first_drafts only burst_jacobi,
        the other options every sampler."""
        return name not in _READ_BY or self.sampler in _READ_BY[name][0]

    @classmethod
    def traced_fields(cls) -> tuple[str, ...]:
        """Names of the traced fields."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("traced"))

    def replace(self, **changes) -> SampleOptions:
        return dataclasses.replace(self, **changes)

    def static_part(self) -> SampleOptions:
        """These options with every traced field at its default: what selects a kernel."""
        return dataclasses.replace(self, **{f.name: f.default for f in dataclasses.fields(self)
                                            if f.metadata.get("traced")})

    @property
    def is_burst(self) -> bool:
        return self.sampler in BURST_MODES

    @property
    def mode(self) -> str:
        """The kernel mode: 'ar', 'ar_nocache', 'exact', 'jacobi' or 'paper'."""
        return BURST_MODES.get(self.sampler, self.sampler)

    @property
    def label(self) -> str:
        """e.g. 'ar[random]', 'burst_jacobi[spread](W=all)', 'burst_paper[random](W=16,K=5)',
        'burst_jacobi[spread](W=16,first=start)'."""
        if not self.is_burst:
            return f"{self.sampler}[{self.order}]"
        k = f",K={self.n_orders}" if self.sampler == "burst_paper" else ""
        first = ",first=start" if self.first_drafts == "start" else ""
        return f"{self.sampler}[{self.order}](W={self.window or 'all'}{k}{first})"

    def window_for(self, n: int) -> int:
        """Positions per iteration at sequence length n: the window (<= n), n for None; 1 for
        AR."""
        if not self.is_burst:
            return 1
        return n if self.window is None else _window(self.window, n)

    def check_for(self, cfg: ModelConfig, n: int, explicit_order: bool = False) -> None:
        """The checks that need the model and the length n (one-line ValueErrors): top_k <= V,
        window <= n, a start token for first_drafts='start', and, with an explicit order (which
        lists every position, the known ones included), a sampler other than burst_paper and
        known_order at its default (an explicit order would ignore it)."""
        if self.first_drafts == "start" and not cfg.bos:
            raise ValueError("first_drafts='start' needs a model with a start token (bos); use "
                             "first_drafts='known'")
        if self.top_k is not None:
            check_int("top_k", self.top_k, 1, cfg.vocab_size)
        self.window_for(n)
        if explicit_order and self.sampler == "burst_paper":
            raise ValueError(_PAPER_ORDER)
        if explicit_order:
            check_explicit_known_order(self.known_order)

    def cache_capacity(self, cfg: ModelConfig, n: int) -> int:
        """KV-cache slots the kernel allocates at length n: every token, the start token, and
        one block of new slots written past the last one (0 for ar_nocache: no cache)."""
        if self.sampler == "ar_nocache":
            return 0
        return self.kernel_options(n).cache_capacity(cfg, n)

    def expected_forward_passes(self, n: int, n_known: int, iterations_max: int) -> int:
        """The SampleStats count of sequential model calls for a batch whose row with the most
        unknowns had n - n_known of them and whose longest row ran iterations_max iterations."""
        return model_calls(self.mode, iterations_max if self.is_burst else n - n_known)

    def kernel_options(self, n: int) -> KernelOptions:
        """The static options of the kernel at length n (generation orders are resolved before
        the kernel, so every order kind shares it)."""
        return KernelOptions(mode=self.mode, window=self.window_for(n),
                             n_orders=self.n_orders if self.sampler == "burst_paper" else 1,
                             top_k=self.top_k,
                             draft_support=self.draft_support if self.mode == "jacobi" else 1,
                             first_drafts=self.first_drafts)

    def traced_values(self, n: int) -> tuple[jax.Array, jax.Array | None, jax.Array]:
        """(temperature float32[], top_p float32[] or None, max_iters int32[]: N for None), the
        kernel's traced arguments: typed arrays, so Python and array values compile once."""
        max_iters = n if self.max_iters is None else self.max_iters
        top_p = None if self.top_p is None else jnp.asarray(self.top_p, jnp.float32)
        return (jnp.asarray(self.temperature, jnp.float32), top_p,
                jnp.asarray(max_iters, jnp.int32))

    def traced_arguments(self, n: int) -> dict[str, jax.Array]:
        """The traced values at length n (`traced_values`) by field name, those the sampler
        reads and that are set (no top_p when None, no max_iters for AR): what
        `static_part().replace(**traced_arguments)` takes back inside a traced function."""
        values = zip(self.traced_fields(), self.traced_values(n), strict=True)
        return {name: value for name, value in values
                if value is not None and self.reads(name)}


# The options only some samplers read: (those samplers, how a message names them).
_READ_BY = {"window": (tuple(BURST_MODES), "the burst samplers"),
            "max_iters": (tuple(BURST_MODES), "the burst samplers"),
            "n_orders": (("burst_paper",), "burst_paper"),
            "draft_support": (("burst_jacobi",), "burst_jacobi"),
            "first_drafts": (("burst_jacobi",), "burst_jacobi")}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SampleOptions)}


def check_options(options, samplers=SAMPLERS) -> None:
    """`options` is a SampleOptions whose sampler is one of `samplers`."""
    if not isinstance(options, SampleOptions):
        raise ValueError(f"options must be a sigma_jax.SampleOptions, e.g. "
                         f"SampleOptions('burst_jacobi'); got {short_repr(options)}")
    if options.sampler not in samplers:
        raise ValueError(f"sampler {options.sampler!r} does not run here: pass options with "
                         f"one of {', '.join(map(repr, samplers))}")


def model_calls(mode: str, iterations):
    """Sequential model calls of one kernel run (ints or arrays): AR 1 + steps (prefill + one per
    token; `iterations` = steps), ar_nocache one full pass per token, exact and paper burst
    1 + 2 x iterations (prefill + draft and verify), jacobi 2 + iterations (prefill, the drafts,
    one verify per iteration). The prefill and jacobi's first drafts count as one call each,
    whatever number of bounded-size passes they run in (`decode.prefill`)."""
    if mode == "ar_nocache":
        return iterations
    if mode == "ar":
        return 1 + iterations
    if mode == "jacobi":
        return 2 + iterations
    return 1 + 2 * iterations


def _window(window, n: int | None = None) -> int | None:
    """The window check: None, or an integer in [1, n] (n None: >= 1)."""
    if window is None:
        return None
    return check_int("window", window, 1, n)


def _traced_number(name: str, value, kind: type):
    """A traced option: a tracer as is; a concrete scalar checked and returned as a Python
    `kind` (float: temperature >= 0, top_p in (0, 1]; int: max_iters >= 1)."""
    shape = np.shape(value)
    if shape:
        raise ValueError(f"{name} must be a scalar, got shape {shape}")
    if not is_concrete(value):
        return value
    if kind is int:
        return check_int(name, value.item() if hasattr(value, "item") else value, 1, INT32_MAX)
    if isinstance(value, bool) or not np.issubdtype(np.asarray(value).dtype, np.number):
        raise ValueError(f"{name} must be a number; got {value!r}")
    number = float(value)
    if name == "temperature" and not 0.0 <= number < float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy); got "
                         f"{number:g}")
    if name == "top_p" and not 0.0 < number <= 1.0:
        raise ValueError(f"top_p must be None or in (0, 1]; got {number:g}")
    return number
