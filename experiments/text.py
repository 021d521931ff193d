"""Text (shakespeare_char): left-to-right vs random vs curriculum training at the same budget.

    python -m experiments.text                  # CPU size (a few minutes per training)
    python -m experiments.text --size=published # the published 10.7M demo model, 5000 steps
    python -m experiments.text --smoke          # tiny, for the tests

Reports the validation loss of each trained model read left to right (the published comparison)
and in random order, then samples from each model: AR (left-to-right and random order) and burst
sampling (exact and paper rules) from a prompt of validation text, with the model calls they
used, and the NLL of every sample under the left-to-right-trained model (a "judge": lower means
more Shakespeare-like to a plain GPT).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common

POLICIES = ("left_to_right", "random", "curriculum")
SAMPLERS = ("ar_left_to_right", "ar_random", "burst", "burst_paper")

SIZES = {
    "smoke": dict(preset="shakespeare_char_cpu",
                  model=dict(block_size=32, n_layer=1, n_head=2, n_embd=32),
                  train=dict(seq_len=32, max_steps=6, batch_size=4, warmup_steps=1,
                             eval_every=3, eval_batches=1, checkpoint_every=6, log_every=3),
                  n_samples=2, prompt_len=8),
    # The committed CPU results used this model (the preset's earlier settings): 128 characters,
    # learned positions, 16 x 128 tokens per step.
    "cpu": dict(preset="shakespeare_char_cpu",
                model=dict(block_size=128, pos_encoding="learned", sinusoidal_scale=1.0),
                train=dict(seq_len=128, batch_size=16, max_steps=400, warmup_steps=20,
                           eval_every=100, eval_batches=16,
                           checkpoint_every=400, log_every=50),
                n_samples=8, prompt_len=16),
    "published": dict(preset="shakespeare_char", model={}, train={}, n_samples=10, prompt_len=1),
}


def judge_nll(run: common.Run, tokens: np.ndarray, prompt_len: int) -> np.ndarray:
    """Mean NLL per generated character (positions >= prompt_len) of each row under `run`'s
    model read left to right: float [B]."""
    from sigma_jax import log_prob, orders

    b, n = tokens.shape
    known = jnp.asarray(common.prefix_known(b, n, prompt_len))
    order = orders.ordered_known_first(known)
    lp = log_prob(run.model_cfg, run.params, jnp.asarray(tokens, jnp.int32), known, order=order)
    return -np.asarray(lp)[:, 0] / (n - prompt_len)


def plot_curves(runs: list[common.Run], path) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, title in ((axes[0], "val_loss_left_to_right", "validation loss, left-to-right"),
                           (axes[1], "val_loss_random", "validation loss, random order")):
        for run in runs:
            pts = common.val_curves(run)[key]
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", ms=3, label=f"trained {run.label}")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cross-entropy (nats/char)")
    axes[0].legend()
    common.save_figure(fig, path, dpi=110)


def main(argv=None) -> dict:
    args = common.parse_args("text", argv, __doc__.split("\n\n")[0])
    log = common.log_fn(args.quiet)
    spec = SIZES[args.size]
    from sigma_jax.data import load_task
    from sigma_jax.presets import get_preset

    preset = get_preset(spec["preset"])
    seq_len = spec["train"].get("seq_len", preset.train.seq_len)
    task = load_task("shakespeare_char", seq_len=seq_len)
    runs = []
    for policy in POLICIES:
        log(f"== training order_policy={policy}")
        runs.append(common.train_run(
            policy, spec["preset"], f"{args.workdir}/{policy}", task, model=spec["model"],
            train={**spec["train"], "order_policy": policy, "seed": args.seed},
            max_steps=args.steps, fresh=args.fresh, log=log))

    # Prompts: the first characters of validation windows; the rest is generated.
    n, p = task.seq_len, spec["prompt_len"]
    refs = np.stack([task.val[i] for i in range(spec["n_samples"])])
    known = common.prefix_known(len(refs), n, p)
    judge = runs[0]  # the left-to-right-trained model
    ref_nll = float(judge_nll(judge, refs, p).mean())
    key = jax.random.key(args.seed + 1)
    sample_rows, texts = [], {}
    for run in runs:
        for name in SAMPLERS:
            log(f"== sampling {run.label} / {name}")
            out, stats = common.sample(run.model_cfg, run.params, key, refs, known, name)
            stats["judge_nll"] = float(judge_nll(judge, out, p).mean())
            sample_rows.append({"trained": run.label, "sampler": name, **stats})
            texts[f"{run.label}/{name}"] = [task.decode(o) for o in out[:2]]

    train_rows = [{"policy": r.label, "params": r.n_params, "steps": r.final["step"],
                   "train_s": r.train_s,
                   "val_loss_left_to_right": r.final.get("val_loss_left_to_right"),
                   "val_loss_random": r.final.get("val_loss_random"),
                   "curves": common.val_curves(r)} for r in runs]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_curves(runs, out_dir / "val_loss.png")

    cfg0, tc0 = runs[0].model_cfg, runs[0].train_cfg
    body = [
        "## Setup", "",
        f"- data: tiny-shakespeare characters (V={task.vocab_size}), windows of N={n}; "
        "validation = nanoGPT's last 10%",
        f"- model: {cfg0.n_layer} layers x {cfg0.n_embd} wide, {cfg0.n_head} heads, "
        f"{cfg0.pos_encoding} positions, start token; {runs[0].n_params:,} parameters",
        f"- training (identical for the three policies except the order): {tc0.max_steps} steps "
        f"x {tc0.batch_size} sequences x {n} tokens, lr {tc0.learning_rate:g} cosine to "
        f"{tc0.min_lr:g}, warmup {tc0.warmup_steps}; curriculum = P(random batch) rising "
        "linearly from 0 to 1 over the run, drawn per batch",
        f"- validation loss: {tc0.eval_batches} batches of {tc0.batch_size} windows, the same "
        "windows for every model; random order = one uniform permutation per window",
        "",
        "## Validation loss at the same budget", "",
        common.md_table(
            ["trained order", "steps", "train time", "val loss, left-to-right",
             "val ppl, left-to-right", "val loss, random order"],
            [[r["policy"], r["steps"], f"{r['train_s'] / 60:.1f} min",
              r["val_loss_left_to_right"], float(np.exp(r["val_loss_left_to_right"])),
              r["val_loss_random"]] for r in train_rows]),
        "", "![validation loss](val_loss.png)", "",
        "## Sampling: model calls and sample quality", "",
        f"{len(refs)} samples per cell, each from a prompt of the first {p} characters of a "
        f"validation window, {n - p} characters generated, temperature 1. Iterations: per "
        "sample (AR: one per token; burst: draft + verify rounds). Forward passes: sequential "
        "model calls of the batched call (AR 1 + R; burst 1 + 2 x the slowest row's iterations). "
        "Judge NLL: nats per generated character under the left-to-right-trained model; the "
        f"real continuations score {ref_nll:.3f}.", "",
        common.md_table(
            ["trained order", "sampler", "iterations (mean)", "iterations (max)",
             "forward passes", "tokens / iteration", "judge NLL"],
            [[r["trained"], common.STRATEGY_LABELS[r["sampler"]], r["iterations_mean"],
              r["iterations_max"], r["forward_passes_mean"], r["tokens_per_iteration"],
              r["judge_nll"]] for r in sample_rows]),
        "", "## Samples (first two per cell; the prompt is the first "
        f"{p} characters)", ""]
    for name, values in texts.items():
        body += [f"**{name}**", "", "```"] + [v.replace("```", "'''") + "\n" for v in values]
        body += ["```", ""]
    body += [
        "## Published reference", "",
        common.md_table(["claim", "status", "ours"], [
            ["random-order training plateaus at a higher left-to-right val perplexity than "
             "left-to-right training", "UNVERIFIED", "see the table above"],
            ["the curriculum beats left-to-right on WikiText-103, reduces the gap on "
             "OpenWebText", "UNVERIFIED (no numbers confirmed)",
             "shakespeare-char only; see the table above"],
            ["shakespeare-char demo: random-order val loss 1.881 at step 5000 (10.7M model)",
             "official repository, not the paper", "not run at that size"],
            ["burst sampling: 255 characters in 13-20 steps (demo gif); an order of magnitude "
             "fewer steps", "paper (abstract) / demo", "see iterations above"],
        ]), ""]
    payload = {"training": train_rows, "sampling": sample_rows, "samples": texts,
               "reference_judge_nll": ref_nll, "prompt_len": p, "seq_len": n}
    return common.write_results(args, "Text: left-to-right vs random vs curriculum training",
                                "\n".join(body), payload, runs=runs)


if __name__ == "__main__":
    main()
