"""What every experiment driver shares: command line, training a preset, sampling strategies,
hardware record, tables and the results files.

A driver is `main(argv) -> dict`: it parses `--size` / `--smoke` / `--out` / `--workdir` /
`--fresh` / `--seed`, trains through `sigma_jax.train.train` (a preset from
`sigma_jax/presets.py` plus the driver's overrides), evaluates, and writes
`<out>/results.json`, `<out>/results.md` and its PNG plots.

Sizes: 'smoke' (tiny, for the tests, well under 2 minutes), 'cpu' (the default: a few minutes on
2 CPU cores) and 'published' (the published model and schedule; needs an accelerator).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sigma_jax.model import count_params
from sigma_jax.sampling import SampleOptions
from sigma_jax.sampling import sample as sample_sampler

REPO = Path(__file__).resolve().parent.parent
SIZES = ("smoke", "cpu", "published")
# The generation strategies of the experiments, named by the library's samplers
# (`sampling.SAMPLERS`) with the AR generation order where it is not random: each name is a
# display label of one `SampleOptions`.
SAMPLER_OPTIONS = {
    "ar_left_to_right": SampleOptions("ar", order="left_to_right"),
    "ar_random": SampleOptions("ar"),
    "ar_fractal": SampleOptions("ar", order="fractal"),
    "burst": SampleOptions("burst"),
    "burst_paper": SampleOptions("burst_paper"),
}
STRATEGIES = tuple(SAMPLER_OPTIONS)
STRATEGY_LABELS = {
    "ar_left_to_right": "AR, left-to-right order",
    "ar_random": "AR, random order",
    "ar_fractal": "AR, fractal order",
    "burst": "burst, exact rule",
    "burst_paper": "burst, paper rule (K=5)",
}


# ---------------------------------------------------------------- command line


def parse_args(name: str, argv: Sequence[str] | None, description: str,
               extra: Callable[[argparse.ArgumentParser], None] | None = None
               ) -> argparse.Namespace:
    """The common flags; `args.size` is 'smoke' when --smoke is given. `args.out` defaults to
    experiments/results/<name> (cpu size), or experiments/results/<name>/<size> for the other
    sizes, and `args.workdir` to workdirs/exp_<name>_<size>. `args.started` (perf_counter) and
    `args.hardware` record when and where the run started, for `write_results`."""
    parser = argparse.ArgumentParser(prog=f"python -m experiments.{name}",
                                     description=description)
    parser.add_argument("--size", choices=("cpu", "published"), default="cpu",
                        help="cpu: minutes on 2 CPU cores (default); published: the paper's sizes")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (tests; < 2 minutes)")
    parser.add_argument("--out", default=None, help="results folder")
    parser.add_argument("--workdir", default=None, help="root of the training run folders")
    parser.add_argument("--fresh", action="store_true",
                        help="delete this driver's run folders first (default: resume them)")
    parser.add_argument("--seed", type=int, default=0, help="seed of training and sampling")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--steps", type=int, default=None,
                        help="train every model for this many steps instead of the size's "
                             "default (evaluation every steps/4, one checkpoint at the end)")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(list(argv) if argv is not None else None)
    args.size = "smoke" if args.smoke else args.size
    args.name = name
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if args.out is None:
        out = REPO / "experiments" / "results" / name
        args.out = str(out if args.size == "cpu" else out / args.size)
    if args.workdir is None:
        args.workdir = str(REPO / "workdirs" / f"exp_{name}_{args.size}")
    args.started, args.hardware = time.perf_counter(), hardware()
    return args


def command_line(args: argparse.Namespace) -> str:
    return " ".join(["python", "-m", f"experiments.{args.name}",
                     *(shlex.quote(a) for a in args.argv)])


def hardware() -> dict:
    """Device kind and count, CPU model, cores visible, load average, versions."""
    device = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return {"platform": device.platform, "device_kind": device.device_kind,
            "devices": jax.device_count(), "cpu": cpu, "cores": cores,
            "load_avg_1m_at_start": round(load[0], 2), "jax": jax.__version__,
            "python": platform.python_version()}


def hardware_line(hw: dict) -> str:
    return (f"{hw['devices']} x {hw['device_kind']} ({hw['platform']}); CPU {hw['cpu']}, "
            f"{hw['cores']} cores (load average {hw['load_avg_1m_at_start']} at start, the "
            f"machine is shared); jax {hw['jax']}")


def log_fn(quiet: bool) -> Callable[[str], None]:
    """print with a time stamp (flushed), or nothing when quiet."""
    if quiet:
        return lambda _msg: None
    t0 = time.perf_counter()
    return lambda msg: print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------- training


@dataclasses.dataclass
class Run:
    """A trained model: configs, params, metric rows and costs."""

    label: str
    model_cfg: object
    train_cfg: object
    params: dict
    final: dict
    rows: list
    train_s: float
    n_params: int
    reloaded: bool = False  # a finished run was loaded, not trained by this invocation


def train_run(label: str, preset: str, workdir, task, *, model: dict | None = None,
              train: dict | None = None, max_steps: int | None = None, fresh: bool = False,
              log: Callable[[str], None] = print) -> Run:
    """Train preset `preset` with ModelConfig / TrainConfig overrides on `task` in `workdir`
    (resumed when it already holds the same run; deleted first with fresh=True), then load the
    final parameters. max_steps (the --steps flag) overrides the step count, with evaluations
    every max_steps/4 and one checkpoint at the end. train_s: wall time of the training loop
    (compilation and evaluations included) from the run's metrics, so a resumed finished run
    keeps its original cost."""
    from sigma_jax import checkpoint
    from sigma_jax.metrics_log import read_metrics
    from sigma_jax.presets import build_model_config, get_preset
    from sigma_jax.train import train as train_loop

    preset_obj = get_preset(preset)
    model_cfg = build_model_config({**preset_obj.model, **(model or {})}, task.vocab_size)
    train = {"task": task.name, "seq_len": task.seq_len, **(train or {})}
    if max_steps is not None:
        warmup = train.get("warmup_steps", preset_obj.train.warmup_steps)
        train.update(max_steps=max_steps, eval_every=max(1, max_steps // 4),
                     checkpoint_every=max_steps, warmup_steps=min(warmup, max_steps))
    train_cfg = preset_obj.train.replace(**train)
    workdir = Path(workdir)
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    t0 = time.perf_counter()
    final = train_loop(model_cfg, train_cfg, workdir, task=task, log=log)
    seconds = time.perf_counter() - t0
    _, params, _ = checkpoint.load(workdir)
    rows = read_metrics(workdir / "metrics.jsonl")
    elapsed = [r["elapsed_s"] for r in rows if "elapsed_s" in r]
    resumed = final.get("resumed_from") is not None
    train_s = elapsed[-1] if elapsed and resumed else seconds
    return Run(label=label, model_cfg=model_cfg, train_cfg=train_cfg, params=params,
               final=final, rows=rows, train_s=float(train_s), n_params=count_params(params),
               reloaded=resumed)


def val_curves(run: Run) -> dict[str, list]:
    """{metric: [[step, value], ...]} for the three validation losses."""
    out = {}
    for key in ("val_loss_train_order", "val_loss_left_to_right", "val_loss_random"):
        out[key] = [[r["step"], r[key]] for r in run.rows if key in r]
    return out


# ---------------------------------------------------------------- sampling


def sample(model_cfg, params, key, tokens: np.ndarray, known: np.ndarray, strategy: str, *,
           temperature: float = 1.0, chunk: int = 64, window: int | None = None,
           n_orders: int = 5, known_order: str = "random") -> tuple[np.ndarray, dict]:
    """Fill the unknown positions of tokens[B, N] with one generation strategy (STRATEGIES: a
    `SampleOptions` with the given window, n_orders and known_order), in chunks of `chunk` rows (the
    last chunk is padded, so every call has one shape).

    known_order: how 'ar_random' and the burst strategies feed the known tokens (the samplers'
    `known_order`): 'random' (a uniformly random order, right for models trained on uniformly
    random orders) or 'ascending' (index order, as in training with keep_prompt_first; the other
    AR orders always feed them in ascending order).

    Returns (samples int32 [B, N], stats): iterations_mean / _max (per row: AR one per token,
    burst draft+verify rounds), generated_mean, forward_passes_mean (sequential model calls per
    batched call: AR 1 + R, burst 1 + 2 x the slowest row's iterations), tokens_per_iteration,
    finished (fraction), seconds (wall, first call's compilation included).
    """
    if strategy not in SAMPLER_OPTIONS:
        raise ValueError(f"unknown strategy {strategy!r}; one of {', '.join(STRATEGIES)}")
    options = SAMPLER_OPTIONS[strategy]
    options = options.replace(window=window if options.reads("window") else None,
                              n_orders=n_orders if options.reads("n_orders") else options.n_orders,
                              known_order=known_order)
    tokens = np.asarray(tokens, np.int32)
    known = np.asarray(known, bool)
    b = tokens.shape[0]
    chunk = max(1, min(chunk, b))
    outs, iters, gens, passes, fins = [], [], [], [], []
    t0 = time.perf_counter()
    for i, lo in enumerate(range(0, b, chunk)):
        idx = np.arange(lo, lo + chunk) % b  # pad the last chunk with rows from the start
        tk, kn = jnp.asarray(tokens[idx]), jnp.asarray(known[idx])
        k = jax.random.fold_in(key, i)
        out, stats = sample_sampler(model_cfg, params, k, tk, kn,
                                    options.replace(temperature=temperature))
        keep = min(chunk, b - lo)
        stats = jax.device_get(stats)
        outs.append(np.asarray(out)[:keep])
        iters.append(np.asarray(stats.iterations)[:keep])
        gens.append(np.asarray(stats.generated)[:keep])
        fins.append(np.asarray(stats.finished)[:keep])
        passes.append(int(stats.forward_passes))
    seconds = time.perf_counter() - t0
    it, gen = np.concatenate(iters), np.concatenate(gens)
    return np.concatenate(outs), {
        "iterations_mean": float(it.mean()),
        "iterations_max": int(it.max()),
        "generated_mean": float(gen.mean()),
        "tokens_per_iteration": float((gen / np.maximum(it, 1)).mean()),
        "forward_passes_mean": float(np.mean(passes)),
        "finished": float(np.concatenate(fins).mean()),
        "seconds": seconds,
    }


def prefix_known(b: int, n: int, prompt_len: int) -> np.ndarray:
    return np.broadcast_to(np.arange(n) < prompt_len, (b, n)).copy()


# ---------------------------------------------------------------- output


def fmt(x, digits: int = 3) -> str:
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, int | np.integer):
        return f"{int(x):,}"
    if isinstance(x, float | np.floating):
        if not math.isfinite(x):
            return str(x)
        if x != 0 and (abs(x) >= 1e5 or abs(x) < 10 ** -digits):
            return f"{x:.{digits}g}"
        return f"{x:.{digits}f}"
    return str(x)


def md_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub Markdown table; numbers formatted by `fmt`."""
    line = lambda cells: "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    out = [line(headers), line(["---"] * len(headers))]
    out += [line([c if isinstance(c, str) else fmt(c) for c in row]) for row in rows]
    return "\n".join(out)


def to_jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating | float):
        return float(obj) if math.isfinite(obj) else str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    return obj


def write_results(args: argparse.Namespace, title: str, body: str, payload: dict,
                  runs: Sequence[Run] = ()) -> dict:
    """Write <out>/results.json (payload + command, size, hardware, wall time since
    `parse_args`) and
    <out>/results.md (a header with the same facts, then `body`). Returns the JSON object.
    runs: the trained models; when some were reloaded from finished runs (not trained by this
    invocation) the wall time says so and the training times are in the training tables."""
    hw, wall_s = args.hardware, time.perf_counter() - args.started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reloaded = [r.label for r in runs if r.reloaded]
    record = {"experiment": args.name, "size": args.size, "command": command_line(args),
              "hardware": hw, "wall_s": round(wall_s, 1), "reloaded_runs": reloaded, **payload}
    record = to_jsonable(record)
    (out / "results.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    if reloaded:
        what = (f"evaluation and plots only: the trained models ({', '.join(reloaded)}) were "
                "reloaded from finished runs, whose training times are in the training table")
    else:
        what = "training, evaluation and plots included"
    header = [f"# {title}", "",
              f"- command: `{command_line(args)}` (size `{args.size}`)",
              f"- hardware: {hardware_line(hw)}",
              f"- wall time: {wall_s / 60:.1f} min ({wall_s:.0f} s), {what}",
              f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}", ""]
    (out / "results.md").write_text("\n".join(header) + "\n" + body.rstrip() + "\n")
    return record


def save_figure(fig, path, dpi: int = 110) -> None:
    """Lay out, write and close a matplotlib figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def pyplot():
    """matplotlib.pyplot with the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
