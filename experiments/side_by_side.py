"""sigma_jax and the published PyTorch σ-GPT side by side: train step and sampling, interleaved.

    bash experiments/side_by_side.sh /path/to/sigma-gpt [ROUNDS]
    python experiments/side_by_side.py --published=/path/to/sigma-gpt \\
        --torch_python=/path/to/venv/bin/python [--rounds=2] [--out=DIR]

The published code (github idiap/sigma-gpt with its nanoGPT submodule) is the user's checkout;
it runs from there, under a Python that has torch (`experiments/side_by_side_torch.py`), and
nothing of it enters this repository. Each measurement is a fresh process, published then ours,
round after round (A B A B), on 2 threads each (torch.set_num_threads(2); XLA on the 2 cores).

- train: the published configuration (4 layers x 128, 4 heads, block 256, batch 32, float32,
  no bias, dropout 0, random order, AdamW, clipping at 1.0) on random windows of the text; ours
  with the published text convention (learned positions, no start token, tied head): 255
  predicted tokens per row on both sides. ms per step and tokens/s (32 x 256 per step).
- sampling: one checkpoint trained by the published code (--ckpt_steps updates), converted by
  `sigma_jax.convert.from_official`; N = 256 per row, the first --known characters of a
  validation window given, batch 1 and 16. Published: cached AR (random order) and its rejection
  sampler (5 orders); ours: cached AR (`sample_ar`, random order) and exact burst
  (`sample_burst(mode="jacobi", order="spread", window=32)`). ms per call (compile excluded,
  one warm-up call first), tokens/s = batch x (N - known) / time. With --ours_devices=D > 1,
  ours also samples each batch of at least D rows with one loop per device on D CPU devices
  (`jax_num_cpu_devices`, `sample_sharded` on a (D, 1, 1) mesh): rows marked devices=D, still
  on the same 2 cores, against the same published rows.

Writes DIR/results.json (every measurement, `uptime` before and after, the machine) and prints a
table. A load average above 1.5 on 2 cores is flagged: torch slows far more than XLA under load,
so a comparison under load flatters sigma_jax.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TORCH_SIDE = ROOT / "experiments" / "side_by_side_torch.py"
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
N, KNOWN, BATCH, BLOCK = 256, 16, 32, 256


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--published", help="the published sigma-gpt checkout (with text/nanoGPT)")
    p.add_argument("--torch_python", default="python", help="a Python that has torch")
    p.add_argument("--data", default=os.environ.get("SIGMA_JAX_TEXT", str(DATA)))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed train steps per process")
    p.add_argument("--ckpt_steps", type=int, default=300)
    p.add_argument("--ckpt", default="", help="reuse this published checkpoint")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ours_devices", type=int, default=1,
                   help="also sample ours with one loop per device on this many CPU devices")
    p.add_argument("--out", default=str(ROOT / "experiments" / "results" / "side_by_side"))
    p.add_argument("--ours", choices=("train", "sample"), help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    return p.parse_args()


# ---------------------------------------------------------------- our side (a child process)


def char_batch(data: np.ndarray, rng, rows: int) -> np.ndarray:
    starts = rng.integers(0, len(data) - BLOCK, rows)
    return np.stack([data[s:s + BLOCK] for s in starts]).astype(np.int32)


def ours_train(args) -> dict:
    import jax
    import jax.numpy as jnp

    from experiments.side_by_side_torch import CONFIG, char_data
    from sigma_jax import train
    from sigma_jax.config import ModelConfig

    cfg = ModelConfig(**{k: CONFIG[k] for k in ("vocab_size", "block_size", "n_layer", "n_head",
                                                "n_embd", "bias", "dropout")},
                      pos_encoding="learned", bos=False, tie_embeddings=True)
    train_cfg = train.TrainConfig(task="shakespeare_char", seq_len=BLOCK, batch_size=BATCH,
                                  max_steps=1000, learning_rate=1e-3, min_lr=1e-4,
                                  warmup_steps=10, weight_decay=0.1, beta1=0.9, beta2=0.99,
                                  grad_clip=1.0, order_policy="random")
    data, rng = char_data(args.data), np.random.default_rng(0)
    state = train.init_state(cfg, train_cfg)
    times, loss = [], None
    for i in range(2 + args.steps):  # 2 warm-up steps (the first compiles)
        batch = jnp.asarray(char_batch(data, rng, BATCH))
        start = time.perf_counter()
        state, metrics = train.train_step(cfg, train_cfg, state, batch)
        loss = float(jax.block_until_ready(metrics)["loss"])
        if i >= 2:
            times.append(time.perf_counter() - start)
    median = float(np.median(times))
    return dict(side="ours", what="train", median_ms=round(1e3 * median, 1),
                min_ms=round(1e3 * min(times), 1), tokens_per_s=round(BATCH * BLOCK / median),
                steps=args.steps, last_loss=round(loss, 4))


def ours_sample(args) -> list[dict]:
    import jax

    jax.config.update("jax_num_cpu_devices", args.ours_devices)
    from experiments.side_by_side_torch import char_data
    from sigma_jax import sample_ar, sample_burst
    from sigma_jax import sharding as sh
    from sigma_jax.convert import from_official
    from sigma_jax.sampling import SampleOptions, sample_sharded

    cfg, params = from_official(args.ckpt)
    data, b = char_data(args.data), args.batch
    tokens = np.stack([data[1000 * (i + 1):1000 * (i + 1) + N] for i in range(b)]).astype(np.int32)
    known = np.zeros((b, N), bool)
    known[:, :KNOWN] = True
    samplers = {
        ("ar", 1): lambda key: sample_ar(cfg, params, key, tokens, known, order="random"),
        ("burst", 1): lambda key: sample_burst(cfg, params, key, tokens, known, mode="jacobi",
                                               order="spread", window=32),
    }
    if 1 < args.ours_devices <= b:
        mesh = sh.make_mesh(sh.MeshConfig(data=args.ours_devices))
        for name, options in (("ar", SampleOptions("ar", order="random")),
                              ("burst", SampleOptions("burst_jacobi", order="spread",
                                                      window=32))):
            samplers[name, args.ours_devices] = (
                lambda key, o=options: sample_sharded(cfg, params, key, tokens, known, o,
                                                      mesh=mesh))
    rows = []
    for (name, devices), run in samplers.items():
        jax.block_until_ready(run(jax.random.key(100)))  # compile + warm-up
        times, iters = [], []
        for r in range(args.repeats):
            start = time.perf_counter()
            _, stats = jax.block_until_ready(run(jax.random.key(r)))
            times.append(time.perf_counter() - start)
            iters.append(float(np.mean(stats.iterations)))
        median = float(np.median(times))
        rows.append(dict(side="ours", what=f"sample_{name}", n=N, batch=b, known=KNOWN,
                         devices=devices,
                         median_ms=round(1e3 * median, 1), min_ms=round(1e3 * min(times), 1),
                         tokens_per_s=round(b * (N - KNOWN) / median, 1),
                         iterations=float(np.mean(iters))))
    return rows


# ---------------------------------------------------------------- the driver


def _json_lines(cmd: list[str]) -> list[dict]:
    """Run one measurement process; its JSON lines (stdout lines starting with '{')."""
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _check(args) -> None:
    text = Path(args.published or "") / "text"
    if not args.published or not (text / "sigmagpt.py").is_file():
        raise SystemExit(f"side_by_side: no published sigma-gpt checkout at {args.published!r} "
                         "(pass --published=PATH; it needs text/sigmagpt.py)")
    if not (text / "nanoGPT" / "model.py").is_file():
        raise SystemExit(f"side_by_side: {text}/nanoGPT is empty (the published code needs its "
                         "nanoGPT submodule checked out)")
    if not Path(args.data).is_file():
        raise SystemExit(f"side_by_side: no text file at {args.data} (--data)")


def run_all(args) -> dict:
    torch_cmd = [args.torch_python, str(TORCH_SIDE), f"--published={args.published}",
                 f"--data={args.data}"]
    ours_cmd = [sys.executable, str(Path(__file__).resolve()), f"--data={args.data}"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = dict(command=" ".join(sys.argv), machine=platform.processor() or platform.machine(),
                   cpus=os.cpu_count(), uptime_before=_uptime(), rows=[])
    for r in range(args.rounds):
        for cmd in (torch_cmd + ["train", f"--steps={args.steps}"],
                    ours_cmd + ["--ours=train", f"--steps={args.steps}"]):
            results["rows"] += [dict(row, round=r) for row in _json_lines(cmd)]
    ckpt = args.ckpt or str(out / "published_ckpt.pt")
    if not args.ckpt:
        _json_lines(torch_cmd + ["train", f"--steps={args.ckpt_steps}", "--warmup=0",
                                 f"--save={ckpt}"])
    for b in map(int, args.batches.split(",")):
        for r in range(args.rounds):
            for cmd in (torch_cmd + ["sample", f"--ckpt={ckpt}", f"--batch={b}",
                                     f"--repeats={args.repeats}", f"--known={KNOWN}"],
                        ours_cmd + ["--ours=sample", f"--ckpt={ckpt}", f"--batch={b}",
                                    f"--repeats={args.repeats}",
                                    f"--ours_devices={args.ours_devices}"]):
                results["rows"] += [dict(row, round=r) for row in _json_lines(cmd)]
    results["uptime_after"] = _uptime()
    loads = [float(u.split("load average:")[1].split(",")[0])
             for u in (results["uptime_before"], results["uptime_after"])]
    results["loaded"] = max(loads) > 1.5
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def _pick(rows: list[dict], side: str, what: str, batch: int, devices: int = 1) -> list[dict]:
    return [r for r in rows if r["side"] == side and r["what"] == what
            and r.get("batch", BATCH) == batch and r.get("devices", 1) == devices]


def table(results: dict) -> str:
    """One line per (measurement, batch, our devices): published and ours, median ms over
    rounds, ratio (the published side always runs one process on 2 threads)."""
    lines = ["| measurement | batch | our devices | published ms | ours ms | "
             "ours/published tokens/s |", "|---|---|---|---|---|---|"]
    keys = sorted({(r["what"], r.get("batch", BATCH), r.get("devices", 1))
                   for r in results["rows"] if r["side"] == "ours"})
    for what, b, devices in keys:
        pub = _pick(results["rows"], "published", what, b)
        ours = _pick(results["rows"], "ours", what, b, devices)
        if not pub or not ours:
            continue
        ms = lambda rows: [r["median_ms"] for r in rows]
        ratios = [p / o for p in ms(pub) for o in ms(ours)]
        lines.append(f"| {what} | {b} | {devices} | {' '.join(map(str, ms(pub)))} | "
                     f"{' '.join(map(str, ms(ours)))} | {np.median(ratios):.2f} "
                     f"({min(ratios):.2f}-{max(ratios):.2f}) |")
    flag = "LOADED (load > 1.5): not a fair comparison" if results["loaded"] else "idle enough"
    lines += ["", f"before: {results['uptime_before']}", f"after: {results['uptime_after']}",
              f"machine load: {flag}"]
    return "\n".join(lines)


def main() -> None:
    args = _args()
    if args.ours == "train":
        print(json.dumps(ours_train(args)), flush=True)
    elif args.ours == "sample":
        for row in ours_sample(args):
            print(json.dumps(row), flush=True)
    else:
        _check(args)
        results = run_all(args)
        text = table(results)
        (Path(args.out) / "table.md").write_text(text + "\n")
        print(text)


if __name__ == "__main__":
    main()
