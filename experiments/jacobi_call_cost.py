"""What a burst_jacobi model call costs against its window, beside cached AR, on the shipped model:
the figures behind "how far can exact burst sampling beat cached AR at this batch size".

    python -m experiments.jacobi_call_cost [--batch=16] [--length=256] [--windows=2,4,8,12,16,24,32]
                                           [--repeats=5] [--target=1.5]

Cached AR (random order) and burst_jacobi along the spread order at each window are compiled
ahead of time and timed in interleaved rounds (`bench.shipped.measure_point`: the public
prepared call, a fresh key per call, nothing known). A jacobi call's cost is fitted as
ms/call = fixed + per_slot * W (least squares over the windows). Then, for each window and its
measured model calls, `fixed_needed` is the fixed cost per call at which that window would run at
--target times AR's tokens/s, with the fitted per-slot cost and the measured calls unchanged:
    calls(W) * (fixed_needed + per_slot * W) = AR ms / target.
A fixed_needed below AR's own ms per call (a call that does strictly more than AR's) means the
target is out of reach at that window on this machine; negative means even a free call
overhead would not do.

Prints one line per configuration, then the fit and the table of fixed_needed.
"""

import argparse

import numpy as np

from bench.shipped import load_shipped, measure_point
from sigma_jax.sampling import SampleOptions


def _windows(text: str) -> list[int]:
    windows = [int(w) for w in text.split(",")]
    if not windows or min(windows) < 1:
        raise SystemExit("--windows must be positive integers, e.g. 4,8,16")
    return windows


def _fit(windows, ms_per_call) -> tuple[float, float]:
    """(fixed, per_slot) of ms_per_call = fixed + per_slot * W, least squares."""
    slope, intercept = np.polyfit(np.asarray(windows, float), np.asarray(ms_per_call, float), 1)
    return float(intercept), float(slope)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--windows", default="2,4,8,12,16,24,32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--target", type=float, default=1.5)
    args = parser.parse_args()
    windows = _windows(args.windows)
    cfg, params, _ = load_shipped()
    options = [SampleOptions("ar", order="random")]
    options += [SampleOptions("burst_jacobi", order="spread", window=w) for w in windows]
    rows = measure_point(cfg, params, options, args.length, args.batch, repeats=args.repeats,
                         warmup=2, seed=0, log=print)
    for row in rows:
        print(f"{row['label']:28s} B={args.batch} N={args.length} "
              f"calls {row['forward_passes']:.1f}  ms/batch {row['ms_per_batch']:.1f}  "
              f"ms/call {row['ms_per_call']:.3f}  x AR {row['vs_ar']:.3f} "
              f"({row['vs_ar_min']:.3f}..{row['vs_ar_max']:.3f})")
    ar, jacobi = rows[0], rows[1:]
    fixed, per_slot = _fit(windows, [r["ms_per_call"] for r in jacobi])
    print(f"fit: jacobi ms/call = {fixed:.3f} + {per_slot:.4f} * W;  "
          f"AR ms/call = {ar['ms_per_call']:.3f}")
    budget = ar["ms_per_batch"] / args.target
    print(f"for x{args.target} AR: at most {budget:.1f} ms per batch")
    print("W  calls  fixed_needed_ms")
    for w, row in zip(windows, jacobi, strict=True):
        need = budget / row["forward_passes"] - per_slot * w
        print(f"{w:<3d}{row['forward_passes']:6.1f}  {need:8.3f}")


if __name__ == "__main__":
    main()
