"""Burst sampling measured on the shipped reference model: speed and sample quality.

    python -m launch.train --config=shakespeare_char_ref --workdir=workdirs/judge \\
        --set order_policy=left_to_right --set max_steps=800
    python -m experiments.bench_reference --judge=workdirs/judge

Speed (sampling.jsonl): model calls, iterations, tokens/iteration, tokens/s and compile time of
cached AR, both exact burst modes (burst: draft + verify per iteration; burst_jacobi: one call per
iteration) along each order of --orders and each window of --windows, and paper burst
(K = --n_orders), for every length N and batch B, unconditional (nothing known) and infilling
(half the positions of a validation window known, scattered at random). Each configuration is
compiled once ahead of time and timed over --repeats calls with fresh keys after one warm-up call.

Quality (quality.jsonl): the mean negative log-likelihood per character of the samples under a
left-to-right "judge" model trained apart (--judge, a launch.train workdir), with a 95% interval
(mean ± 1.96 standard errors over samples), for AR along each order and left to right, both exact
burst modes along each order, and paper burst, unconditional and infilling at the longest N; the
validation text itself is the reference row. An exact burst row samples the law of the AR row
with the same order, so the two must agree.

results.md gathers both as tables (`--report_only` rewrites it from the JSONL files).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bench.harness import compile_aot, time_calls
from bench.report import environment
from bench.sampling import sampler_figures
from sigma_jax import log_prob, pretrained
from sigma_jax.data import load_task
from sigma_jax.sampling import SampleOptions, prepare, sample

FLAGS = flags.FLAGS
flags.DEFINE_string("judge", "workdirs/judge", "Workdir of the left-to-right judge model.")
flags.DEFINE_string("out", "experiments/results/bench_text_cpu", "Results directory.")
flags.DEFINE_list("lengths", ["64", "128", "256"], "Sequence lengths N.")
flags.DEFINE_list("batches", ["1", "16"], "Batch sizes B.")
flags.DEFINE_list("orders", ["random", "fractal", "spread"], "Orders of the exact burst rows "
                  "(each drafts every remaining position).")
flags.DEFINE_list("windows", ["16", "32"], "Windows of the windowed exact burst rows.")
flags.DEFINE_list("windowed_orders", ["random", "spread"], "Orders of the windowed rows.")
flags.DEFINE_list("modes", ["burst", "burst_jacobi"], "Exact burst samplers.")
flags.DEFINE_integer("n_orders", 5, "Candidate orders K of paper burst.")
flags.DEFINE_integer("repeats", 2, "Timed calls per configuration (after one warm-up call).")
flags.DEFINE_integer("quality_samples", 128, "Samples per quality row.")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
flags.DEFINE_integer("seed", 0, "Seed of keys, prompts and known masks.")
flags.DEFINE_boolean("report_only", False, "Only rewrite results.md from the JSONL files in --out.")

CONDITIONS = ("unconditional", "infilling")


def sampler_specs(modes, orders, windows, windowed_orders, n_orders: int) -> list[SampleOptions]:
    """The speed grid: cached AR; each exact burst sampler along each order drafting every
    remaining position, and along each windowed order at each window; the published rule."""
    return ([SampleOptions("ar")]
            + [SampleOptions(m, order=o) for m in modes for o in orders]
            + [SampleOptions(m, order=o, window=w) for m in modes for o in windowed_orders
               for w in windows]
            + [SampleOptions("burst_paper", n_orders=n_orders)])


def inputs(condition: str, windows: np.ndarray, batch: int, length: int, rng):
    """(tokens int32 [B, N], known bool [B, N]): nothing known, or validation windows with half
    of their positions known, scattered uniformly at random per row."""
    if condition == "unconditional":
        return jnp.zeros((batch, length), jnp.int32), jnp.zeros((batch, length), bool)
    rows = windows[rng.integers(0, len(windows), batch), :length]
    known = np.zeros((batch, length), bool)
    for r in range(batch):
        known[r, rng.choice(length, length // 2, replace=False)] = True
    return jnp.asarray(rows), jnp.asarray(known)


def measure_speed(cfg, params, options: SampleOptions, condition, windows, length, batch) -> dict:
    rng = np.random.default_rng([FLAGS.seed, length, batch])
    tokens, known = inputs(condition, windows, batch, length, rng)
    options = options.replace(temperature=FLAGS.temperature)
    calls = [prepare(cfg, params, jax.random.key(1000 * FLAGS.seed + i), tokens, known, options)
             for i in range(1 + FLAGS.repeats)]
    kernel = compile_aot(calls[0].kernel, calls[0].args, calls[0].static)
    timing, outputs = time_calls(lambda i: kernel(*calls[i].args), FLAGS.repeats, 1)
    figures = sampler_figures(outputs, timing.median_s)
    return dict(
        suite="sampling", sampler=options.label, mode=options.sampler, order=options.order,
        window=options.window, condition=condition, length=length, batch=batch,
        n_known=int(np.asarray(known).sum(axis=1).min()), model_calls=figures["forward_passes"],
        **{name: figures[name] for name in ("iterations", "iterations_max",
                                            "tokens_per_iteration", "tokens_per_s",
                                            "ms_per_call")},
        temp_bytes=kernel.costs["temp_bytes"],
        **{**timing.as_dict(), "compile_s": kernel.compile_s, "lower_s": kernel.lower_s})


def judge_nll(judge_cfg, judge_params, tokens: np.ndarray) -> np.ndarray:
    """Per-sequence NLL per character of tokens int32 [S, N] under the left-to-right judge."""
    n = tokens.shape[1]
    known = jnp.zeros((tokens.shape[0], n), bool)
    l2r = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), tokens.shape)
    return -np.asarray(log_prob(judge_cfg, judge_params, jnp.asarray(tokens), known,
                                order=l2r))[:, 0] / n


def quality_row(label: str, condition: str, nll: np.ndarray, order: str | None = None) -> dict:
    half = 1.96 * nll.std(ddof=1) / np.sqrt(len(nll))
    return dict(suite="quality", sampler=label, order=order, condition=condition,
                samples=len(nll),
                judge_nll=float(nll.mean()), ci95_low=float(nll.mean() - half),
                ci95_high=float(nll.mean() + half))


def measure_quality(cfg, params, judge, windows, length) -> list[dict]:
    # The window does not change an exact sampler's law: the fastest on CPU samples it.
    orders = list(FLAGS.orders)
    fastest = {"burst": 16, "burst_jacobi": 32}
    option_sets = ([SampleOptions("ar", order=o) for o in ["left_to_right", *orders]]
             + [SampleOptions(m, order=o, window=fastest.get(m)) for m in FLAGS.modes
                for o in orders]
             + [SampleOptions("burst_paper", n_orders=FLAGS.n_orders, window=16)])
    batch = 16
    rows = []
    for condition in CONDITIONS:
        rng = np.random.default_rng([FLAGS.seed, 7])
        prompts = [inputs(condition, windows, batch, length, rng)
                   for _ in range(FLAGS.quality_samples // batch)]
        if condition == "infilling":
            data = np.concatenate([np.asarray(t) for t, _ in prompts])
            rows.append(quality_row("validation text", condition, judge_nll(*judge, data)))
        for options in option_sets:
            options = options.replace(temperature=FLAGS.temperature)
            samples = [np.asarray(sample(cfg, params, jax.random.key(i), t, k, options)[0])
                       for i, (t, k) in enumerate(prompts)]
            rows.append(quality_row(options.label, condition,
                                    judge_nll(*judge, np.concatenate(samples)), options.order))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def write_report(out: Path) -> None:
    """results.md from sampling.jsonl and quality.jsonl: one speed table per condition (calls
    and tokens/s relative to cached AR at the same N and B) and the quality table."""
    speed = [json.loads(x) for x in (out / "sampling.jsonl").read_text().splitlines()]
    quality = [json.loads(x) for x in (out / "quality.jsonl").read_text().splitlines()]
    ar = {(r["condition"], r["length"], r["batch"]): r for r in speed
          if r["mode"] == "ar"}
    parts = [f"# Burst sampling on the shipped reference model\n\n{REPORT_HEADER}"]
    for condition in CONDITIONS:
        rows = []
        for r in (r for r in speed if r["condition"] == condition):
            base = ar[(condition, r["length"], r["batch"])]
            rows.append([r["sampler"], str(r["length"]), str(r["batch"]),
                         f"{r['model_calls']:.1f}", f"{r['iterations']:.1f}",
                         f"{r['tokens_per_iteration']:.1f}", f"{r['tokens_per_s']:,.0f}",
                         f"{base['model_calls'] / r['model_calls']:.1f}x",
                         f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x",
                         f"{r['compile_s']:.1f}"])
        parts.append(f"## Speed, {condition}\n\n" + _table(
            ["sampler", "N", "B", "model calls", "iterations", "tokens / iteration",
             "tokens/s", "fewer calls than AR", "tokens/s vs AR", "compile s"], rows))
    rows = [[q["condition"], q["sampler"], str(q["samples"]), f"{q['judge_nll']:.3f}",
             f"[{q['ci95_low']:.3f}, {q['ci95_high']:.3f}]"] for q in quality]
    parts.append("## Sample quality (N = 256)\n\n" + _table(
        ["condition", "sampler", "samples", "judge NLL (nats/char)", "95% interval"], rows))
    (out / "results.md").write_text("\n\n".join(parts) + "\n")


REPORT_HEADER = """\
- model: `sigma_jax.pretrained.load("shakespeare_char")` (1.944 nats/char on the validation split
  in random order); judge: a left-to-right model of the same size trained for this purpose
  (`python -m launch.train --config=shakespeare_char_ref --set order_policy=left_to_right
  --set max_steps=600`, 1.80 nats/char left to right on validation)
- measure: `python -m experiments.bench_reference --judge=<that workdir>` on a shared 2-core
  AMD EPYC machine (JAX on CPU, float32); every row with spreads in `sampling.jsonl` and
  `quality.jsonl`, versions in `env.json`
- samplers (`sigma_jax.samplers`): `ar` cached AR; `burst` exact burst, draft + verify per
  iteration; `burst_jacobi` exact, one verify call per iteration; `burst_paper` the published
  rule (not exact); `[order]` is the generation order, `W` the window
- model calls are sequential model calls per batch call (ar: 1 + generated tokens; burst and
  burst_paper: 1 + 2 x iterations; burst_jacobi: 2 + iterations; iterations of the slowest row of
  the batch); iterations are the mean per row; tokens/s counts generated tokens, median of 2
  timed calls with fresh keys after one warm-up call
- quality rows: exact burst at W = 16 (burst) and W = 32 (burst_jacobi), whose law does not
  depend on W; burst_paper at W = 16 (its law does); 128 samples per row
- infilling: half of the positions of a validation window known, scattered uniformly at random;
  temperature 1, no top-k / top-p; compile s 0.0: the same program was compiled earlier in
  the run"""


def main(argv) -> None:
    if len(argv) > 1:
        sys.exit(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.report_only:
        write_report(Path(FLAGS.out))
        return
    from sigma_jax import checkpoint

    start = time.monotonic()
    cfg, params, _, _ = pretrained.load("shakespeare_char")
    judge_cfg, judge_params, judge_step = checkpoint.load(FLAGS.judge)
    task = load_task("shakespeare_char", seq_len=cfg.block_size)
    windows = np.stack([task.val[i] for i in range(len(task.val))])  # [W, 256]
    lengths = [int(n) for n in FLAGS.lengths]
    windows_w = [int(w) for w in FLAGS.windows]
    out = Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    speed = []
    with open(out / "sampling.jsonl", "w") as f:
        for condition in CONDITIONS:
            for length in lengths:
                for batch in (int(b) for b in FLAGS.batches):
                    for options in sampler_specs(FLAGS.modes, FLAGS.orders, windows_w,
                                              FLAGS.windowed_orders, FLAGS.n_orders):
                        row = measure_speed(cfg, params, options, condition, windows, length,
                                            batch)
                        speed.append(row)
                        f.write(json.dumps(row) + "\n")
                        f.flush()
                        print(f"{condition:13s} N={length:<4d} B={batch:<3d} {options.label:30s} "
                              f"calls {row['model_calls']:7.1f}  iters {row['iterations']:6.1f}  "
                              f"tok/iter {row['tokens_per_iteration']:5.1f}  "
                              f"{row['tokens_per_s']:8.0f} tok/s  compile "
                              f"{row['compile_s']:.1f}s", flush=True)
    quality = measure_quality(cfg, params, (judge_cfg, judge_params), windows, max(lengths))
    with open(out / "quality.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in quality)
    env = environment(sys.argv, dict(judge=str(FLAGS.judge), judge_step=int(judge_step),
                                           wall_s=time.monotonic() - start))
    (out / "env.json").write_text(json.dumps(env, indent=1, default=str) + "\n")
    write_report(out)


if __name__ == "__main__":
    app.run(main)
