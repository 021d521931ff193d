"""The sampler vocabulary: one name per sampler, shared by the sample CLI, the benchmark and the
experiments.

    ar            cached any-order AR (`sample_ar`), one token per model call
    ar_nocache    the uncached oracle: a full forward pass per token
    burst         exact burst sampling (`sample_burst(mode='exact')`): draft + verify per iteration
    burst_jacobi  exact, one verify call per iteration (`sample_burst(mode='jacobi')`)
    burst_paper   the published rule with K candidate orders (`sample_burst(mode='paper')`; not
                  exact; random orders only)

A `SamplerSpec` names a sampler with its generation order, window and K; `spec.prepare(...)` gives
the public prepared call (`SamplerCall`) and `spec.sample(...)` runs it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

from sigma_jax.config import ModelConfig
from sigma_jax.orders import KNOWN_ORDERS, ORDER_KINDS
from sigma_jax.sample_ar import sample_ar, sample_ar_call
from sigma_jax.sample_burst import sample_burst, sample_burst_call
from sigma_jax.sampling import SamplerCall, SampleStats

SAMPLERS = ("ar", "ar_nocache", "burst", "burst_jacobi", "burst_paper")
BURST_MODES = {"burst": "exact", "burst_jacobi": "jacobi", "burst_paper": "paper"}


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """A sampler and its static choices. order: a kind of `orders.ORDER_KINDS` (burst_paper:
    'random' only); window: burst candidates per iteration (None = every remaining position;
    ignored by the AR samplers); n_orders: K of burst_paper; known_order: how order='random'
    feeds the known tokens. Bad values raise a one-line ValueError at construction."""

    name: str
    order: str = "random"
    window: int | None = None
    n_orders: int = 5
    known_order: str = "random"

    def __post_init__(self):
        if self.name not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {self.name!r}")
        if self.order not in ORDER_KINDS:
            raise ValueError(f"order must be one of {', '.join(ORDER_KINDS)}; "
                             f"got {self.order!r}")
        if self.name == "burst_paper" and self.order != "random":
            raise ValueError("burst_paper draws its own random candidate orders: use "
                             "order='random' or another sampler")
        if self.known_order not in KNOWN_ORDERS:
            raise ValueError(f"known_order must be one of {', '.join(KNOWN_ORDERS)}; "
                             f"got {self.known_order!r}")
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"window must be None or a positive integer; got {self.window!r}")
        if not isinstance(self.n_orders, int) or self.n_orders < 1:
            raise ValueError(f"n_orders must be a positive integer; got {self.n_orders!r}")

    @property
    def is_burst(self) -> bool:
        return self.name in BURST_MODES

    @property
    def label(self) -> str:
        """e.g. 'ar[random]', 'burst_jacobi[spread](W=all)', 'burst_paper[random](W=16,K=5)'."""
        if not self.is_burst:
            return f"{self.name}[{self.order}]"
        k = f",K={self.n_orders}" if self.name == "burst_paper" else ""
        return f"{self.name}[{self.order}](W={self.window or 'all'}{k})"

    @property
    def function(self) -> Callable:
        """The public sampler: `sample_ar` or `sample_burst`."""
        return sample_burst if self.is_burst else sample_ar

    def options(self, *, temperature=1.0, top_k: int | None = None, top_p=None) -> dict:
        """The keyword arguments of `self.function` (and of its `_call` variant)."""
        common = dict(order=self.order, temperature=temperature, top_k=top_k, top_p=top_p,
                      known_order=self.known_order)
        if not self.is_burst:
            return dict(use_cache=self.name == "ar", **common)
        return dict(mode=BURST_MODES[self.name], window=self.window, n_orders=self.n_orders,
                    **common)

    def prepare(self, cfg: ModelConfig, params: dict, key: jax.Array, tokens, known,
                **sampling) -> SamplerCall:
        """The public prepared call for (key, tokens [B, N], known [B, N]); sampling:
        temperature, top_k, top_p."""
        prepare = sample_burst_call if self.is_burst else sample_ar_call
        return prepare(cfg, params, key, tokens, known, **self.options(**sampling))

    def sample(self, cfg: ModelConfig, params: dict, key: jax.Array, tokens, known,
               **sampling) -> tuple[jax.Array, SampleStats]:
        """Run the sampler: (tokens [B, N], SampleStats); sampling: temperature, top_k, top_p."""
        return self.function(cfg, params, key, tokens, known, **self.options(**sampling))

    def expected_forward_passes(self, length: int, n_known: int, iterations_max: int) -> int:
        """The SampleStats count of sequential model calls: ar 1 + steps (prefill + one per
        token), ar_nocache one full pass per token, burst and burst_paper 1 + 2 x iterations
        (prefill + draft and verify), burst_jacobi 2 + iterations (prefill, drafts, verify)."""
        steps = length - n_known
        if self.name == "ar":
            return 1 + steps
        if self.name == "ar_nocache":
            return steps
        if self.name == "burst_jacobi":
            return 2 + iterations_max
        return 1 + 2 * iterations_max
