"""The shipped suite (bench/shipped.py) at a tiny size on the shipped model: cached AR and exact
burst at N = 16, B = 1, one round. Rows exist, model calls match an independent count (AR: the
start token's pass plus one per token; burst: `model_calls` of the row's iterations), speed
figures are positive and consistent, and the AR row's ratio to itself is 1."""

import pytest

from bench import shipped
from bench.config import BenchConfig
from bench.report import ResultWriter
from sigma_jax.sampling import SampleOptions
from sigma_jax.sampling.options import model_calls

N, B = 16, 1
AR = SampleOptions("ar", order="random")
BURST = SampleOptions("burst", order="spread", window=4)


@pytest.fixture(scope="module")
def rows():
    config = BenchConfig(suites=("shipped",), lengths=(N,), batches=(B,), repeats=1)
    writer = ResultWriter(None)
    out = shipped.run_shipped_suite(config, writer, log=lambda *a: None, options=[AR, BURST])
    assert writer.rows["shipped"] == out
    return out


def _row(rows, options):
    (row,) = [r for r in rows if r["label"] == options.label]
    return row


def test_rows_exist(rows):
    assert [r["label"] for r in rows] == [AR.label, BURST.label]
    for row in rows:
        assert "error" not in row and "skipped" not in row, row
        assert row["suite"] == "shipped" and row["model"] == shipped.SHIPPED_MODEL
        assert (row["length"], row["batch"], row["repeats"]) == (N, B, 1)
        assert row["generated_per_seq"] == N and row["finished_frac"] == 1.0


def test_model_calls_match_an_independent_count(rows):
    ar = _row(rows, AR)
    assert ar["forward_passes"] == N + 1  # the start token's pass, then one per token
    assert ar["forward_passes"] == model_calls("ar", N)
    burst = _row(rows, BURST)
    assert burst["iterations_max"] >= N / BURST.window  # at most W tokens per iteration
    assert burst["forward_passes"] == model_calls("exact", burst["iterations_max"])
    assert burst["forward_passes"] == BURST.expected_forward_passes(N, 0, burst["iterations_max"])


def test_speed_figures(rows):
    for row in rows:
        assert row["tokens_per_s"] > 0 and row["ms_per_batch"] > 0
        assert row["tokens_per_s"] == pytest.approx(B * N / row["time_median_s"])
        assert row["ms_per_call"] == pytest.approx(row["ms_per_batch"] / row["forward_passes"])
        assert row["ms_per_batch_min"] <= row["ms_per_batch"]
        assert row["compile_s"] > 0
        assert row["vs_ar"] == pytest.approx(row["tokens_per_s"] / rows[0]["tokens_per_s"])
        assert row["vs_ar_min"] <= row["vs_ar_max"] and len(row["vs_ar_rounds"]) == 1


def test_the_ar_row_is_the_reference(rows):
    ar = _row(rows, AR)
    assert ar["vs_ar"] == 1.0 and ar["vs_ar_rounds"] == [1.0]
    assert ar["vs_ar_min"] == ar["vs_ar_max"] == 1.0


def test_table_and_note(rows):
    printed = []
    shipped.print_shipped_table(rows, log=printed.append)
    text = "\n".join(printed)
    assert BURST.label in text and "x AR min..max" in text and "side by side" in text


def test_default_options_merge_windows_past_the_length():
    labels = [o.label for o in shipped.shipped_options(256)]
    assert labels == ["ar[random]", "burst[spread](W=16)", "burst_jacobi[spread](W=16)",
                      "burst_jacobi[spread](W=32)", "burst_jacobi[spread](W=all)"]
    labels = [o.label for o in shipped.shipped_options(16)]
    assert labels == ["ar[random]", "burst[spread](W=all)", "burst_jacobi[spread](W=all)"]


def test_launcher_defaults_when_the_suite_runs_alone():
    """(In the same process: launch.bench's flags cannot be defined beside launch.sample's.)
    The shipped suite's defaults; flags given explicitly empty are refused, not defaulted."""
    import subprocess
    import sys

    code = ("from launch import bench as lb\n"
            "lb.FLAGS(['bench', '--suite=shipped'])\n"
            "c = lb.build_config(False)\n"
            "print(c.lengths, c.batches, c.repeats, c.budget_s, c.out)\n"
            "lb.FLAGS.unparse_flags(); lb.FLAGS(['bench', '--suite=shipped', '--repeats=2'])\n"
            "print(lb.build_config(False).repeats)\n"
            "for flag in ('--weights=', '--samplers=', '--out='):\n"
            "    lb.FLAGS.unparse_flags(); lb.FLAGS(['bench', flag])\n"
            "    try:\n"
            "        lb.build_config(False)\n"
            "    except ValueError as e:\n"
            "        print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    first, second, *empty = result.stdout.strip().splitlines()
    assert first == "(256,) (1, 16) 5 None experiments/results/shipped"
    assert second == "2"
    assert empty == [
        "--weights must not be empty: give weights (init, peaked, product, checkpoint), or "
        "leave the flag out",
        "--samplers must not be empty: give samplers (ar, ar_nocache, burst, burst_jacobi, "
        "burst_paper), or leave the flag out",
        "--out must not be empty: give a folder or 'none', or leave the flag out"]
