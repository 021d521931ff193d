"""The serving benchmark end to end at a tiny size: it runs, prints every figure, checks that the
engine's tokens equal the static batches', and writes its rows and plot; its flag checks and
the workload's seed range."""

import json

import numpy as np
import pytest
from cli_helpers import run_module


@pytest.mark.parametrize("sampler, host_devices", [("burst_jacobi", 1), ("ar", 2)])
@pytest.mark.integration
def test_serve_bench_runs_and_writes_rows(tmp_path, sampler, host_devices):
    """With 2 host devices: one engine per device, each static batch split over them."""
    out = run_module("-m", "launch.serve_bench", "--requests=6", "--slots=2",
                     "--min_length=8", "--max_length=24", f"--samplers={sampler}",
                     "--window=4", "--rounds=1", f"--out={tmp_path}",
                     f"--host_devices={host_devices}")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "serving.jsonl").read_text().splitlines()]
    assert [(r["sampler"], r["kind"]) for r in rows] == [(sampler, "engine"), (sampler, "static")]
    for r in rows:
        assert r["requests"] == 6 and r["tokens_per_s"] > 0 and 0 < r["occupancy"] <= 1
        assert r["calls_p50"] <= r["calls_p99"] and r["seconds_p50"] <= r["seconds_p99"]
    assert (tmp_path / "serving.png").stat().st_size > 0
    assert out.stdout.count("engine/static tokens/s") == 1


@pytest.mark.parametrize("args, message", [
    (["--max_length=999"], "block_size"),
    (["--host_devices=0"], "--host_devices must be >= 1"),
    (["--slots=3", "--host_devices=2"], "must divide over the --host_devices"),
    (["--samplers=ar,ar_nocache"], "the engine does not run ar_nocache"),
    (["--window=-1"], "--window must be >= 0"),
    (["--out=pyproject.toml"], "--out=pyproject.toml is a file, not a folder"),
])
def test_serve_bench_refuses_bad_flags(args, message):
    """Before any run: nothing on stdout (no header), nothing written."""
    out = run_module("-m", "launch.serve_bench", *args)
    assert out.returncode == 2 and message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and out.stdout == ""


def test_workload_seeds_keep_every_request_key_in_range():
    from bench.serving import check_seed, mixed_workload

    largest = (2**63 - 1 - 5) // 100_003
    assert check_seed(largest, 6) == largest
    for seed in (-1, largest + 1):
        with pytest.raises(ValueError) as error:
            check_seed(seed, 6, "--seed")
        assert str(error.value) == f"--seed must be an integer in [0, {largest}]; got {seed}"
    work = mixed_workload(np.arange(50), 6, 4, 8, seed=largest)
    assert len(work.requests) == 6
