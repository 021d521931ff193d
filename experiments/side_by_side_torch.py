"""The published PyTorch side of `experiments/side_by_side.py` (run it through that driver).

    TORCH_PYTHON experiments/side_by_side_torch.py --published=CHECKOUT train --steps=S ...
    TORCH_PYTHON experiments/side_by_side_torch.py --published=CHECKOUT sample --ckpt=FILE ...

Runs under a Python that has torch (not this project's environment) and imports the published
σ-GPT text code from the user's own checkout at run time: CHECKOUT/text (its `sigmagpt`, `order`)
and the nanoGPT submodule that `text/import_nanogpt.py` puts on the path. Nothing of that code
is part of this repository. Prints one JSON line per measurement on stdout.

train: the published training update (forward with targets, backward, gradient clipping at 1.0,
AdamW from the model's `configure_optimizers`, zero_grad), eager mode (no torch.compile), on
random 256-character windows of the text file read in random order (the published `order` and
`apply_order`). --save writes the model in the published checkpoint layout.
sample: the published cached AR sampler (`generate_autoregressively_with_kvcache`, random
order) and rejection sampler (`generate_rejection_sampling`, its default 5 orders) on a
checkpoint, N tokens per row of which the first --known are given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

CONFIG = dict(n_layer=4, n_head=4, n_embd=128, block_size=256, bias=False, vocab_size=65,
              dropout=0.0)


def published_modules(checkout: str):
    """(torch, GPTConfig, sigmaGPT, order module) from CHECKOUT/text, imported in place."""
    text = os.path.join(checkout, "text")
    if not os.path.isfile(os.path.join(text, "sigmagpt.py")):
        sys.exit(f"no published checkout at {checkout} (expected {text}/sigmagpt.py)")
    if not os.path.isfile(os.path.join(text, "nanoGPT", "model.py")):
        sys.exit(f"the published checkout at {checkout} lacks its nanoGPT submodule "
                 f"({text}/nanoGPT/model.py)")
    sys.path.insert(0, text)
    import order as order_mod
    import torch
    from import_nanogpt import model as nanogpt
    from sigmagpt import sigmaGPT
    return torch, nanogpt.GPTConfig, sigmaGPT, order_mod


def char_data(path: str) -> np.ndarray:
    """The text file as int64 character ids (ids by sorted distinct characters)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    return np.fromiter((lookup[c] for c in text), np.int64, len(text))


def train(args) -> None:
    torch, GPTConfig, sigmaGPT, order_mod = published_modules(args.published)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = sigmaGPT(GPTConfig(**CONFIG))
    model.train()
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    data, rng = char_data(args.data), np.random.default_rng(args.seed)
    block, batch = CONFIG["block_size"], args.batch

    def update(step):
        starts = rng.integers(0, len(data) - block, batch)
        x = torch.from_numpy(np.stack([data[s:s + block] for s in starts]))
        o = order_mod.order(x, 0, "random").contiguous()
        x_in, y = order_mod.apply_order(x, o)
        _, loss = model(x_in, o, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.item())

    for step in range(args.warmup):
        update(step)
    times, losses = [], []
    for step in range(args.steps):
        start = time.perf_counter()
        losses.append(update(step))
        times.append(time.perf_counter() - start)
    if args.save:
        torch.save({"model": model.state_dict(), "model_args": CONFIG,
                    "iter_num": args.warmup + args.steps, "best_val_loss": losses[-1],
                    "config": {}}, args.save)
    median = float(np.median(times))
    print(json.dumps(dict(side="published", what="train", threads=torch.get_num_threads(),
                          median_ms=round(1e3 * median, 1), min_ms=round(1e3 * min(times), 1),
                          tokens_per_s=round(batch * block / median), steps=args.steps,
                          last_loss=round(losses[-1], 4))), flush=True)


def sample(args) -> None:
    torch, GPTConfig, sigmaGPT, _ = published_modules(args.published)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    checkpoint = torch.load(args.ckpt, map_location="cpu")
    model = sigmaGPT(GPTConfig(**checkpoint["model_args"]))
    model.load_state_dict(checkpoint["model"])
    model.eval()
    data = char_data(args.data)
    n, b, known = args.n, args.batch, args.known
    idx = torch.from_numpy(np.stack([data[1000 * (i + 1):1000 * (i + 1) + n] for i in range(b)]))
    mask = torch.ones((b, n), dtype=torch.long)
    mask[:, :known] = 0  # 1 = to generate
    samplers = {
        "ar": lambda: model.generate_autoregressively_with_kvcache(
            idx.clone(), mask.clone(), order_type="random"),
        "burst": lambda: model.generate_rejection_sampling(idx.clone(), mask.clone()),
    }
    for name in args.samplers.split(","):
        samplers[name]()  # warm-up
        times, steps = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            _, k = samplers[name]()
            times.append(time.perf_counter() - start)
            steps.append(int(k))
        median = float(np.median(times))
        print(json.dumps(dict(side="published", what=f"sample_{name}", n=n, batch=b,
                              known=known, median_ms=round(1e3 * median, 1),
                              min_ms=round(1e3 * min(times), 1),
                              tokens_per_s=round(b * (n - known) / median, 1),
                              iterations=float(np.mean(steps)))), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--published", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", required=True, help="a text file (tiny shakespeare)")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--steps", type=int, default=5)
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--save", default="")
    s = sub.add_parser("sample")
    s.add_argument("--ckpt", required=True)
    s.add_argument("--n", type=int, default=256)
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--known", type=int, default=16)
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--samplers", default="ar,burst")
    args = parser.parse_args()
    (train if args.command == "train" else sample)(args)


if __name__ == "__main__":
    main()
