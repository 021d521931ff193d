"""One sampling program against one loop per host device, side by side on the shipped model.

    PYTHONPATH=. python experiments/time_host_devices.py [--devices=2] [--batch=16] [--length=256]
        [--rounds=3] [--train | --serve]

The process asks for --devices CPU devices (`jax_num_cpu_devices`, before any JAX call). Each
sampler (cached AR; `burst_jacobi` and exact burst, spread, W = 16) runs unconditional rows two
ways, both compiled ahead of time: `sample_call(...)` on one device, and `sample_sharded` on a
(devices, 1, 1) mesh, where each device runs the loop over its own rows. They are timed in
interleaved rounds (one, lanes, one, lanes, ...), --calls calls each with a fresh key, and every
lanes call is checked token for token against the one-device call of the same key. One JSON
line per run: sampler, setting, median and min ms per batch call, model calls, tokens/s
(generated tokens over the median), compile seconds; then, per sampler, the lanes/one ratio of
tokens/s in each round.

--serve times the serving engine instead (`serve`, 16 slots, 4 iterations per call) on --calls
x 16 unconditional requests of --length: one engine on one device against one engine per device
with its share of the slots (`serve(devices=...)`), interleaved, tokens checked equal; one JSON
line per run (tokens/s) and the ratio per round.

--train times the reference train step (`experiments/time_train_step.py`'s configuration)
instead, on one device and on the (devices, 1, 1) mesh, interleaved, --calls steps each per
round: one JSON line per run (median seconds per step, tokens/s, loss).
"""

import argparse
import json
import time

import jax


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--train", action="store_true")
    parser.add_argument("--serve", action="store_true")
    args = parser.parse_args()
    jax.config.update("jax_num_cpu_devices", args.devices)
    if args.train:
        return time_train(args.devices, args.rounds, args.calls)
    if args.serve:
        return time_serve(args.length, args.rounds, 16 * args.calls)

    import numpy as np

    from sigma_jax import pretrained
    from sigma_jax import sharding as sh
    from sigma_jax.sampling import SampleOptions, prepare, sample_sharded

    cfg, params, _, _ = pretrained.load("shakespeare_char")
    mesh = sh.make_mesh(sh.MeshConfig(data=args.devices))
    tokens = np.zeros((args.batch, args.length), np.int32)
    known = np.zeros((args.batch, args.length), bool)
    samplers = {
        "ar": SampleOptions("ar", order="random"),
        "burst_jacobi W=16": SampleOptions("burst_jacobi", order="spread", window=16),
        "burst W=16": SampleOptions("burst", order="spread", window=16),
    }

    def one(options):
        start = time.perf_counter()
        compiled = prepare(cfg, params, jax.random.key(0), tokens, known, options).lower().compile()
        compile_s = time.perf_counter() - start
        return lambda seed: compiled(*prepare(cfg, params, jax.random.key(seed), tokens, known,
                                              options).args), compile_s

    def lanes(options):
        start = time.perf_counter()
        jax.block_until_ready(sample_sharded(cfg, params, jax.random.key(0), tokens, known,
                                             options, mesh=mesh))
        compile_s = time.perf_counter() - start  # compile and one call
        return lambda seed: sample_sharded(cfg, params, jax.random.key(seed), tokens, known,
                                           options, mesh=mesh), compile_s

    for name, options in samplers.items():
        runs = {"one": one(options), "lanes": lanes(options)}
        ratios, seed = [], 1
        for round_ in range(args.rounds):
            rates = {}
            for setting, (run, compile_s) in runs.items():
                times, outs = [], []
                for call in range(args.calls):
                    start = time.perf_counter()
                    out, stats = jax.block_until_ready(run(seed + call))
                    times.append(time.perf_counter() - start)
                    outs.append(np.asarray(out))
                median = float(np.median(times))
                rates[setting] = (outs, args.batch * args.length / median)
                print(json.dumps({
                    "sampler": name, "setting": setting, "round": round_ + 1,
                    "devices": args.devices if setting == "lanes" else 1, "batch": args.batch,
                    "length": args.length, "median_ms": round(1e3 * median, 1),
                    "min_ms": round(1e3 * min(times), 1),
                    "model_calls": int(stats.forward_passes),
                    "tokens_per_s": round(rates[setting][1]),
                    "compile_s": round(compile_s, 2)}), flush=True)
            same = all((a == b).all() for a, b in zip(rates["one"][0], rates["lanes"][0],
                                                          strict=True))
            if not same:
                raise SystemExit(f"{name}: the lanes' tokens differ from one device's")
            ratios.append(rates["lanes"][1] / rates["one"][1])
            seed += args.calls
        print(json.dumps({"sampler": name, "lanes_over_one": [round(r, 2) for r in ratios],
                          "same_tokens": True}), flush=True)


def time_serve(length: int, rounds: int, count: int) -> None:
    """The engine on one device and one engine per device, interleaved (see the docstring)."""
    import numpy as np

    from sigma_jax import pretrained
    from sigma_jax.sampling import Request, SampleOptions, serve

    cfg, params, _, _ = pretrained.load("shakespeare_char")
    requests = [Request(np.zeros(length, np.int32), np.zeros(length, bool), jax.random.key(i))
                for i in range(count)]
    samplers = {"ar": SampleOptions("ar", order="random"),
                "burst_jacobi W=16": SampleOptions("burst_jacobi", order="spread", window=16)}
    for name, options in samplers.items():
        def run(devices, options=options):
            start = time.perf_counter()
            results = list(serve(cfg, params, requests, slots=16, options=options,
                                 steps_per_call=4, devices=devices))
            return count * length / (time.perf_counter() - start), {
                r.index: r.tokens for r in results}
        run(None), run(jax.devices())  # compiles
        ratios = []
        for round_ in range(rounds):
            rates = {}
            for setting, devices in (("one", None), ("devices", jax.devices())):
                rates[setting] = run(devices)
                print(json.dumps({"serve": name, "setting": setting, "round": round_ + 1,
                                  "devices": 1 if devices is None else len(devices),
                                  "requests": count, "length": length,
                                  "tokens_per_s": round(rates[setting][0])}), flush=True)
            one, per_device = rates["one"][1], rates["devices"][1]
            if any((one[i] != per_device[i]).any() for i in one):
                raise SystemExit(f"{name}: the engines' tokens differ from one engine's")
            ratios.append(rates["devices"][0] / rates["one"][0])
        print(json.dumps({"serve": name, "devices_over_one": [round(r, 2) for r in ratios],
                          "same_tokens": True}), flush=True)


def time_train(devices: int, rounds: int, steps: int) -> None:
    """The reference train step on 1 device and on `devices` devices (data), interleaved."""
    import numpy as np

    from experiments.time_train_step import CFG, TRAIN
    from sigma_jax import sharding as sh
    from sigma_jax import train

    batch = np.random.default_rng(0).integers(0, CFG.vocab_size, (32, 256)).astype(np.int32)
    runs = {}
    for n in (1, devices):
        mesh = sh.make_mesh(sh.MeshConfig(data=n))
        with jax.set_mesh(mesh):
            state = train.init_state(CFG, TRAIN, mesh=mesh)
            placed = sh.place_local_batch(batch, mesh)
            step = train.make_train_step(CFG, TRAIN, mesh)
            state, metrics = jax.block_until_ready(step(state, placed))  # compiles
        runs[n] = [mesh, step, state, placed]
    for round_ in range(rounds):
        for n, run in runs.items():
            mesh, step, state, placed = run
            times = []
            with jax.set_mesh(mesh):
                for _ in range(steps):
                    start = time.perf_counter()
                    state, metrics = jax.block_until_ready(step(state, placed))
                    times.append(time.perf_counter() - start)
            run[2] = state
            median = float(np.median(times))
            print(json.dumps({"train_step": True, "devices": n, "round": round_ + 1,
                              "median_s": round(median, 4),
                              "tokens_per_s": round(batch.size / median),
                              "loss": float(metrics["loss"])}), flush=True)


if __name__ == "__main__":
    main()
