"""Benchmarks of sigma_jax: a timing harness and three suites (sampling, training, decode roofline).

- `harness`: device facts, ahead-of-time compilation (`compile_aot`) and timed calls (`time_calls`).
- `models`: preset configs for random weights, weight variants, parameter / FLOP / byte counts.
- `sampling`, `training`, `roofline`: one measurement each, returned as a result row (a dict).
- `report`: JSON-lines results, env.json, text tables and plots.
- `config`: `BenchConfig` (what a run measures) and `load_model`.
- `suites`: the suites and `run`; `python -m launch.bench` is the command line.

Nothing here imports grain.
"""
