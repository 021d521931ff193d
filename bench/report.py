"""Benchmark output: JSON-lines result files, the run's environment, text tables and plots.

- `ResultWriter`: one JSON line per measurement in <out>/<suite>.jsonl, flushed as it goes.
- `environment` / `write_json`: env.json (device, versions, command line, date, notes).
- `format_table` with SAMPLING_COLUMNS / TRAINING_COLUMNS / ROOFLINE_COLUMNS, and
  `print_tables`: the tables the launcher prints.
- `plot_sampling`: PNG plots of the sampling suite (optional: nothing without matplotlib).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from bench.models import FLOPS_FORMULA, WEIGHTS_NOTES


def json_ready(value):
    """`value` with numpy scalars as Python numbers and non-finite floats as None (strict JSON)."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | os.PathLike, obj) -> None:
    """`obj` (made `json_ready`) as indented JSON at `path`."""
    Path(path).write_text(json.dumps(json_ready(obj), indent=1) + "\n")


class ResultWriter:
    """One JSON line per measurement in <out>/<suite>.jsonl (files truncated on first write),
    flushed as it goes so a run cut short keeps what it measured. rows: {suite: rows} of this
    run; out_dir None keeps the rows in memory only."""

    def __init__(self, out_dir: str | os.PathLike | None):
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.rows: dict[str, list[dict]] = {}
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)

    def add(self, row: dict) -> dict:
        """Record `row` (its "suite" names the file); returns it as written."""
        row = json_ready(row)
        suite = row["suite"]
        first = suite not in self.rows
        self.rows.setdefault(suite, []).append(row)
        if self.out_dir is not None:
            with open(self.out_dir / f"{suite}.jsonl", "w" if first else "a") as f:
                f.write(json.dumps(row) + "\n")
        return row


def environment(argv: Sequence[str] | None = None, extra: dict | None = None) -> dict:
    """Device, library versions, command line (`argv`, default sys.argv), git commit and date of
    this run, the weight and FLOP notes, updated with `extra`."""
    import flax

    versions = {"python": platform.python_version(), "jax": jax.__version__,
                "flax": flax.__version__, "numpy": np.__version__}
    for name in ("jaxlib", "optax", "orbax.checkpoint"):
        try:
            module = __import__(name, fromlist=["__version__"])
            versions[name] = getattr(module, "__version__", None)
        except ImportError:  # an optional library: its version is recorded as None
            versions[name] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    devices = jax.devices()
    env = dict(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        command=shlex.join(sys.argv if argv is None else argv),
        backend=jax.default_backend(), device_kind=devices[0].device_kind,
        device_count=len(devices), host=platform.node(), cpu_count=os.cpu_count(),
        versions=versions, git_commit=commit,
        xla_python_client_mem_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
        weights_notes=WEIGHTS_NOTES, flops_formula=FLOPS_FORMULA,
    )
    env.update(extra or {})
    return env


def format_value(value, digits: int = 3) -> str:
    """A table cell: '-' for None, `digits` significant digits (scientific when very large or
    small) for floats, str() otherwise."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1e5 or abs(value) < 1e-2:
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}" if abs(value) < 1e3 else f"{value:.0f}"
    return str(value)


# (row key, column title) of each suite's table.
SAMPLING_COLUMNS = [("weights", "weights"), ("label", "sampler"), ("order", "order"),
                    ("length", "N"),
                    ("batch", "B"), ("forward_passes", "passes"), ("iterations", "iters"),
                    ("tokens_per_iteration", "tok/iter"), ("tokens_per_s", "tok/s"),
                    ("ms_per_seq", "ms/seq"), ("compile_s", "compile_s"),
                    ("speedup_vs_ar", "x AR tok/s"), ("passes_vs_ar", "passes/AR")]
TRAINING_COLUMNS = [("config", "config"), ("batch", "B"), ("length", "T"), ("params", "params"),
                    ("dtype", "dtype"),
                    ("step_ms", "step_ms"), ("tokens_per_s", "tok/s"),
                    ("flops_per_token", "flop/tok"), ("mfu", "MFU(meas)"),
                    ("mfu_datasheet", "MFU(sheet)"), ("compile_s", "compile_s")]
ROOFLINE_COLUMNS = [("kind", "kind"), ("batch", "B"), ("length", "ctx"),
                    ("ms_per_call", "ms/call"), ("bytes_per_call", "bytes/call"),
                    ("bytes_s", "B/s"), ("bw_frac_copy", "frac copy BW"),
                    ("bw_frac_datasheet", "frac sheet BW"), ("flops_s", "flop/s"),
                    ("tokens_per_s", "tok/s"), ("roofline_tokens_per_s", "roof tok/s")]


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """A plain-text table; skipped / failed rows show their reason in the last column."""
    header = [title for _, title in columns] + ["note"]
    body = []
    for row in rows:
        note = row.get("skipped") or row.get("error") or ""
        body.append([format_value(row.get(key)) for key, _ in columns] + [note])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in body])


def print_tables(rows: dict, log=print) -> None:
    """Each suite's table of `rows` ({suite: rows}): the sampling grid first, then its sweeps
    weights by weights, and a legend of the sampling columns and weights."""
    for suite, columns in (("sampling", SAMPLING_COLUMNS), ("training", TRAINING_COLUMNS),
                           ("roofline", ROOFLINE_COLUMNS)):
        if rows.get(suite):
            table = rows[suite]
            if suite == "sampling":  # the grid, then the sweeps weights by weights
                kinds = list(dict.fromkeys(r["weights"] for r in table))
                table = sorted(table, key=lambda r: (r.get("part") == "sweep",
                                                     kinds.index(r["weights"])))
            log(f"\n== {suite} ==")
            log(format_table(table, columns))
    if rows.get("sampling"):
        log("\npasses: sequential model calls per batch call (every row takes part in each);"
            " iters: mean per row; tok/iter: tokens committed per iteration; x AR: ratio to"
            " cached AR at the same N, B and weights.")
        for kind in dict.fromkeys(r["weights"] for r in rows["sampling"]):
            log(f"weights {kind}: {WEIGHTS_NOTES[kind]}")


def plot_sampling(rows: Sequence[dict], out_dir, *, sweep_batch: int | None = None,
                  sweep_length: int | None = None) -> list[str]:
    """PNG plots: model calls vs length per sampler (at batch `sweep_batch`), tokens/s vs batch
    per sampler (at length `sweep_length`), and the burst window sweep. Returns the paths (none
    without matplotlib or without measured sampling rows)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:  # plots are optional (the GPU image may lack matplotlib)
        return []
    ok = [r for r in rows if r.get("suite") == "sampling" and r.get("tokens_per_s")]
    if not ok:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    primary = ok[0]["weights"]
    sweep_batch = min(r["batch"] for r in ok) if sweep_batch is None else sweep_batch
    sweep_length = max(r["length"] for r in ok) if sweep_length is None else sweep_length
    paths = []

    def lines(ax, rows_, x, y):
        for label in dict.fromkeys(r["label"] for r in rows_):
            pts = sorted((r[x], r[y]) for r in rows_ if r["label"] == label)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=label)

    def log2_axis(ax, values):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(set(values)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        paths.append(str(out_dir / name))

    mine = [r for r in ok if r["weights"] == primary and r.get("part", "grid") == "grid"]
    panels = [
        ("calls_vs_length.png", [r for r in mine if r["batch"] == sweep_batch], "length",
         "forward_passes", f"sequential model calls (batch {sweep_batch}, {primary} weights)"),
        ("tokens_per_s_vs_batch.png", [r for r in mine if r["length"] == sweep_length], "batch",
         "tokens_per_s", f"generated tokens/s (length {sweep_length}, {primary} weights)"),
    ]
    for name, subset, x, y, title in panels:
        if not subset:
            continue
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        lines(ax, subset, x, y)
        log2_axis(ax, [r[x] for r in subset])
        ax.set_yscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        save(fig, name)

    sweep = [r for r in ok if r["sampler"].startswith("burst") and r["length"] == sweep_length
             and r["batch"] == sweep_batch]
    groups = {}
    for r in sweep:
        groups.setdefault((r["weights"], r["sampler"], r["n_orders"]), []).append(
            (r["window_eff"], r["forward_passes"], r["tokens_per_s"]))
    groups = {k: sorted(v) for k, v in groups.items() if len({p[0] for p in v}) > 1}
    if groups:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for (weights, sampler, k), pts in groups.items():
            w, passes, tps = zip(*pts, strict=True)
            label = f"{sampler}{f' K={k}' if sampler == 'burst_paper' else ''} [{weights}]"
            axes[0].plot(w, passes, marker="o", label=label)
            axes[1].plot(w, tps, marker="o", label=label)
        for ax, y in zip(axes, ("forward passes", "generated tokens/s"), strict=True):
            log2_axis(ax, [p[0] for pts in groups.values() for p in pts])
            ax.set_yscale("log")
            ax.set_xlabel(f"window W ({sweep_length} = all)")
            ax.set_ylabel(y)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"burst window sweep (N={sweep_length}, B={sweep_batch})", fontsize=9)
        save(fig, "burst_window_sweep.png")
    return paths
