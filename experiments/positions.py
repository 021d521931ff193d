"""Positional encodings and the random-order plateau.

    python -m experiments.positions            # CPU size: about 10 minutes on 2 cores
    python -m experiments.positions --smoke    # tiny, for the tests

In a random order the input token of a slot is rarely the neighbour of the position it predicts,
so a model can only beat the unigram loss by finding known tokens through their positions (the
double positional encoding). This driver trains the same model in uniformly random orders with
three encodings and reports how far each gets at the same budget:

- `learned`: one table of width D/2 (the published text code), N(0, 0.02) like the token table;
- `sinusoidal x1`: the published non-text formula, amplitude 1 against token embeddings of std
  0.02, so after the first LayerNorm the token content is a few percent of the vector;
- `sinusoidal x0.1`: the same formula scaled by 0.1 (`ModelConfig.sinusoidal_scale`).

Two tasks: a random walk x_p = x_{p-1} + {0, 1} (mod 16), whose Bayes-optimal random-order loss
is computed exactly from the known neighbours (an independent floor), and tiny-shakespeare
characters against the unigram cross-entropy. Nothing is checkpointed (each run is minutes).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from sigma_jax import orders
from sigma_jax import train as train_lib
from sigma_jax.config import ModelConfig
from sigma_jax.data import load_task

ENCODINGS = {
    "learned": dict(pos_encoding="learned"),
    "sinusoidal x1 (published)": dict(pos_encoding="sinusoidal"),
    "sinusoidal x0.1": dict(pos_encoding="sinusoidal", sinusoidal_scale=0.1),
}
WALK_V = 16  # random-walk vocabulary (values mod 16)

_TRAIN = dict(learning_rate=3e-3, min_lr=3e-4, warmup_steps=20, beta2=0.99,
              order_policy="random")
SIZES = {
    "smoke": dict(walk=dict(n=16, batch=8, steps=10, model=dict(n_layer=1, n_embd=32)),
                  text=dict(n=16, batch=4, steps=4, model=dict(n_layer=1, n_embd=32)),
                  n_val=8, log_every=2),
    "cpu": dict(walk=dict(n=32, batch=32, steps=300, model=dict(n_layer=2, n_embd=64)),
                text=dict(n=128, batch=16, steps=400, model=dict(n_layer=4, n_embd=128)),
                n_val=64, log_every=25),
    "published": dict(walk=dict(n=32, batch=32, steps=2000, model=dict(n_layer=2, n_embd=64)),
                      text=dict(n=256, batch=64, steps=5000,
                                model=dict(n_layer=6, n_head=6, n_embd=384)),
                      n_val=256, log_every=100),
}


# ---------------------------------------------------------------- the random walk


def random_walks(rng: np.random.Generator, b: int, n: int) -> np.ndarray:
    """int32 [b, n]: a uniform start plus cumulative {0, 1} steps, mod WALK_V."""
    steps = np.cumsum(rng.integers(0, 2, (b, n)), axis=1)
    return ((rng.integers(0, WALK_V, (b, 1)) + steps) % WALK_V).astype(np.int32)


def _step_pmf(d: int) -> np.ndarray:
    """float [V]: law of (sum of d fair {0, 1} steps) mod V."""
    pmf = np.zeros(WALK_V)
    for k in range(d + 1):
        pmf[k % WALK_V] += math.comb(d, k) / 2.0**d
    return pmf


def walk_bayes_loss(tokens: np.ndarray, order: np.ndarray) -> float:
    """Mean -log p(x_p | tokens known before p in the order), exact, over every slot of every row.

    The walk is Markov with uniform marginals, so given the nearest known left neighbour l and
    right neighbour r, p(x_p = v) is proportional to pmf_{p-l}(v - x_l) * pmf_{r-p}(x_r - v).
    """
    b, n = tokens.shape
    pmfs = [_step_pmf(d) for d in range(n)]
    values = np.arange(WALK_V)
    total = 0.0
    for row in range(b):
        known = np.zeros(n, bool)
        for p in order[row]:
            post = np.ones(WALK_V)
            left = np.flatnonzero(known[:p])
            right = np.flatnonzero(known[p + 1:])
            if left.size:
                l_pos = left[-1]
                post *= pmfs[p - l_pos][(values - tokens[row, l_pos]) % WALK_V]
            if right.size:
                r_pos = p + 1 + right[0]
                post *= pmfs[r_pos - p][(tokens[row, r_pos] - values) % WALK_V]
            total -= math.log(post[tokens[row, p]] / post.sum())
            known[p] = True
    return total / (b * n)


# ---------------------------------------------------------------- training


def train_curve(model_cfg: ModelConfig, train_cfg: train_lib.TrainConfig, next_batch,
                log_every: int, log) -> tuple[dict, list, float]:
    """Train from scratch in random orders: (params, [(step, mean train loss since the last
    point)], seconds). next_batch() -> int32 [B, N] host array."""
    state = train_lib.init_state(model_cfg, train_cfg)
    curve, pending, t0 = [], [], time.perf_counter()
    for step in range(1, train_cfg.max_steps + 1):
        state, metrics = train_lib.train_step(model_cfg, train_cfg, state,
                                              jnp.asarray(next_batch()))
        pending.append(metrics["loss"])
        if step % log_every == 0 or step == train_cfg.max_steps:
            curve.append((step, float(np.mean(jax.device_get(pending)))))
            pending = []
            log(f"  step {step}: train loss {curve[-1][1]:.3f}")
    return state.params, curve, time.perf_counter() - t0


def random_order_loss(model_cfg: ModelConfig, params: dict, tokens: np.ndarray,
                      order: np.ndarray) -> float:
    """Mean cross-entropy of tokens [B, N] read in `order` (all N tokens scored: bos=True)."""
    return float(train_lib.loss_fn(model_cfg, params, jnp.asarray(tokens), jnp.asarray(order)))


def unigram_cross_entropy(train_tokens: np.ndarray, val_tokens: np.ndarray, v: int) -> float:
    """Cross-entropy of val_tokens under train_tokens' character frequencies (add-one)."""
    counts = np.bincount(train_tokens.ravel(), minlength=v) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val_tokens.ravel()].mean())


def validation_orders(seed: int, shape) -> np.ndarray:
    """One uniformly random order per validation row: int32 [B, N]."""
    return np.asarray(orders.random_order(jax.random.key(seed + 7), jnp.zeros(shape, bool)))


def run_task(name: str, spec: dict, vocab: int, batches, val: np.ndarray, order: np.ndarray,
             seed: int, log) -> list[dict]:
    """One random-order run per encoding: the same batches (batches() -> next_batch) and the
    same validation rows `val` read in `order` for each."""
    rows = []
    for label, encoding in ENCODINGS.items():
        log(f"== {name}: {label}")
        model_cfg = ModelConfig(vocab_size=vocab, block_size=spec["n"], dropout=0.0, bias=False,
                                **{"n_head": 4, **spec["model"]}, **encoding)
        train_cfg = train_lib.TrainConfig(seq_len=spec["n"], max_steps=spec["steps"],
                                          batch_size=spec["batch"], seed=seed,
                                          **{**_TRAIN, "warmup_steps": min(
                                              _TRAIN["warmup_steps"], spec["steps"] // 5)})
        params, curve, seconds = train_curve(model_cfg, train_cfg, batches(),
                                             spec["log_every"], log)
        rows.append({"task": name, "encoding": label, "steps": spec["steps"],
                     "train_s": seconds, "curve": curve,
                     "val_loss_random": random_order_loss(model_cfg, params, val, order)})
    return rows


def same_stream(seed: int, draw):
    """A batch factory: each call restarts one seeded stream of draw(rng) -> int32 [B, N], so
    every encoding trains on the same batches."""
    def factory():
        rng = np.random.default_rng(seed)
        return lambda: draw(rng)
    return factory


# ---------------------------------------------------------------- report


def plot_curves(rows: list[dict], refs: dict, path) -> None:
    plt = common.pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for r in (r for r in rows if r["task"] == task):
            steps, losses = zip(*r["curve"], strict=True)
            ax.plot(steps, losses, label=r["encoding"])
        for (label, value), style in zip(refs[task].items(), ("--", ":"), strict=False):
            ax.axhline(value, ls=style, lw=0.9, color="gray", label=label)
        ax.set_title(f"{task}: random-order training")
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (nats/token)")
        ax.legend(fontsize=7)
    common.save_figure(fig, path, dpi=110)


def main(argv=None) -> dict:
    args = common.parse_args("positions", argv, __doc__.split("\n\n")[0])
    log = common.log_fn(args.quiet)
    spec = SIZES[args.size]
    walk, text = dict(spec["walk"]), dict(spec["text"])
    for s in (walk, text):
        s["log_every"] = spec["log_every"]
        if args.steps is not None:
            s["steps"] = args.steps

    val_walk = random_walks(np.random.default_rng(args.seed + 1), spec["n_val"], walk["n"])
    walk_order = validation_orders(args.seed, val_walk.shape)
    walks = same_stream(args.seed, lambda rng: random_walks(rng, walk["batch"], walk["n"]))
    rows = run_task("random walk", walk, WALK_V, walks, val_walk, walk_order, args.seed, log)
    task = load_task("shakespeare_char", seq_len=text["n"])
    rng = np.random.default_rng(args.seed + 2)
    val_text = np.stack([task.val[i] for i in rng.choice(len(task.val), spec["n_val"],
                                                          replace=False)])
    sample_train = np.stack([task.train[i] for i in rng.integers(0, len(task.train), 2000)])
    windows = same_stream(args.seed, lambda rng: np.stack(
        [task.train[i] for i in rng.integers(0, len(task.train), text["batch"])]))
    rows += run_task("text", text, task.vocab_size, windows, val_text,
                     validation_orders(args.seed, val_text.shape), args.seed, log)

    bayes = walk_bayes_loss(val_walk, walk_order)
    refs = {"random walk": {"unigram ln 16": math.log(WALK_V), "Bayes optimum": bayes},
            "text": {"unigram": unigram_cross_entropy(sample_train, val_text, task.vocab_size)}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_curves(rows, refs, out / "curves.png")

    table = [[r["task"], r["encoding"], r["steps"], f"{r['train_s'] / 60:.1f} min",
              r["val_loss_random"]] for r in rows]
    ref_lines = [f"- {task}: " + ", ".join(f"{k} {v:.3f}" for k, v in ref.items())
                 for task, ref in refs.items()]
    body = [
        "## Setup", "",
        f"- random walk: x_p = x_(p-1) + 0 or 1 (mod 16), N = {walk['n']}, batch {walk['batch']}, "
        f"model {walk['model']}; validation: {spec['n_val']} walks, one random order each",
        f"- text: tiny-shakespeare characters, N = {text['n']}, batch {text['batch']}, "
        f"model {text['model']}; validation: {spec['n_val']} windows of the validation split",
        f"- training: uniformly random orders, Adam lr {_TRAIN['learning_rate']:g} cosine to "
        f"{_TRAIN['min_lr']:g}, warmup min({_TRAIN['warmup_steps']}, steps / 5), the same "
        "batches for every "
        "encoding", "",
        "## Random-order validation loss at the same budget", "",
        common.md_table(["task", "encoding", "steps", "train time", "val loss, random order"],
                        table), "",
        "References (independent computations):", *ref_lines, "",
        "![training curves](curves.png)",
    ]
    payload = {"rows": rows, "references": refs}
    return common.write_results(args, "Positional encodings and the random-order plateau",
                                "\n".join(body), payload)


if __name__ == "__main__":
    main()
