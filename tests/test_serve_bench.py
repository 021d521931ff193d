"""The serving benchmark end to end at a tiny size: it runs, prints every figure, checks that the
engine's tokens equal the static batches', and writes its rows and plot."""

import json

import pytest
from cli_helpers import run_module


@pytest.mark.integration
def test_serve_bench_runs_and_writes_rows(tmp_path):
    out = run_module("-m", "launch.serve_bench", "--requests=6", "--slots=2",
                     "--min_length=8", "--max_length=24", "--samplers=burst_jacobi",
                     "--window=4", "--rounds=1", f"--out={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "serving.jsonl").read_text().splitlines()]
    assert [(r["sampler"], r["kind"]) for r in rows] == [
        ("burst_jacobi", "engine"), ("burst_jacobi", "static")]
    for r in rows:
        assert r["requests"] == 6 and r["tokens_per_s"] > 0 and 0 < r["occupancy"] <= 1
        assert r["calls_p50"] <= r["calls_p99"] and r["seconds_p50"] <= r["seconds_p99"]
    assert (tmp_path / "serving.png").stat().st_size > 0
    assert out.stdout.count("engine/static tokens/s") == 1


def test_serve_bench_refuses_bad_flags():
    out = run_module("-m", "launch.serve_bench", "--max_length=999")
    assert out.returncode == 2 and "block_size" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
