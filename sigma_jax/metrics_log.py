"""Training metrics on disk: a JSON-lines file, TensorBoard events, a progress line and a loss plot.

`metrics.jsonl` holds one JSON object per logged step (`step` always present). On resume from step
S, rows with step > S (written after the checkpoint by the interrupted run) are dropped by an atomic
rewrite, because the resumed run recomputes them identically; a torn last line is dropped too.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
VAL_KEYS = ("val_loss_train_order", "val_loss_left_to_right", "val_loss_random")


def read_metrics(path) -> list[dict]:
    """The rows of a metrics.jsonl file (unparsable lines, e.g. a torn last line, are skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and an atomic rename: a reader, a crash or
    a kill never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _rewrite(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


class MetricsWriter:
    """Appends metric rows to <workdir>/metrics.jsonl and TensorBoard (<workdir>/tb).

    start_step: the step training starts from (0, or the restored checkpoint's step); existing rows
    past it are dropped. enabled=False (non-primary processes) makes every call a no-op.
    tensorboardX is imported lazily; if it is missing, TensorBoard is skipped with one warning.
    """

    def __init__(self, workdir, *, start_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(workdir) / METRICS_FILE
        self._file = None
        self._tb = None
        if not enabled:
            return
        if self.path.exists():
            text = self.path.read_text()
            kept = [r for r in read_metrics(self.path) if r["step"] <= start_step]
            if len(kept) != len(text.splitlines()) or (text and not text.endswith("\n")):
                _rewrite(self.path, kept)
        self._file = open(self.path, "a")
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            warnings.warn("tensorboardX is not installed: no TensorBoard events are written",
                          stacklevel=2)
        else:
            # purge_step hides events a previous, interrupted run logged past the checkpoint.
            purge = start_step + 1 if start_step > 0 else None
            self._tb = SummaryWriter(str(Path(workdir) / "tb"), purge_step=purge)

    def write(self, row: dict) -> None:
        """Append one row (a dict with an int 'step' and JSON-ready values); one write + flush."""
        if not self.enabled:
            return
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in row.items():
                if name != "step" and isinstance(value, int | float):
                    self._tb.add_scalar(name, value, row["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def progress_line(row: dict, max_steps: int) -> str:
    """'step 120/5000 | loss 2.3456 | 12,345 tok/s | lr 1.00e-03 | ETA 4m12s' (+ val losses)."""
    parts = [f"step {row['step']}/{max_steps}"]
    if "loss" in row:
        parts.append(f"loss {row['loss']:.4f}")
    if "tokens_per_s" in row:
        parts.append(f"{row['tokens_per_s']:,.0f} tok/s")
    if "compile_s" in row:
        parts.append(f"first step incl. compile {row['compile_s']:.1f}s")
    if "lr" in row:
        parts.append(f"lr {row['lr']:.2e}")
    short = {"val_loss_train_order": "val(train order)", "val_loss_left_to_right": "val(l2r)",
             "val_loss_random": "val(random)"}
    parts += [f"{short[k]} {row[k]:.4f}" for k in VAL_KEYS if k in row]
    if "eta_s" in row:
        parts.append(f"ETA {_duration(row['eta_s'])}")
    return " | ".join(parts)


def plot_losses(rows: list[dict], path) -> None:
    """Training loss and the validation losses against step, as a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = [("loss", "train loss (training order)", "-")]
    series += [(k, k.replace("_", " "), "o-") for k in VAL_KEYS]
    for key, label, style in series:
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, style, label=label, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
