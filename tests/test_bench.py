"""The benchmark harness: counters from SampleStats, timing fields, JSON rows, plots, the usage
errors of the launchers (bench, step_time) and their flag checks (list flags, output paths), and
that nothing on the benchmark path needs grain."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from cli_helpers import subprocess_env

from bench import harness, models, report, roofline, sampling, suites, training
from bench.config import BenchConfig
from launch.flags import given, output_path, positive_ints
from sigma_jax import ModelConfig, count_params, init_params
from sigma_jax.sampling import SampleOptions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ModelConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16)
N, B = 8, 2
SAMPLING_KEYS = {"suite", "sampler", "length", "batch", "forward_passes", "iterations",
                 "tokens_per_s", "ms_per_seq", "compile_s", "weights", "tokens_per_iteration"}
TRAINING_KEYS = {"suite", "tokens_per_s", "mfu", "step_ms", "compile_s", "flops_per_token"}


@pytest.fixture(scope="module")
def params():
    return init_params(TINY, jax.random.key(0))


@pytest.fixture(scope="module")
def sampling_rows(params):
    option_sets = [SampleOptions("ar"), SampleOptions("burst"),
                   SampleOptions("burst_jacobi", order="spread")]
    return {s.sampler: sampling.measure_sampler(TINY, params, s, N, B, repeats=2, seed=1)
            for s in option_sets}


def _check_row(name, row):
    options = SampleOptions(name, order=row["order"])
    expected = options.expected_forward_passes(N, row["n_known"], row["iterations_max"])
    assert row["forward_passes_max"] == expected, name
    assert row["generated_per_seq"] == N and row["finished_frac"] == 1.0
    assert row["compile_s"] > 0 and row["lower_s"] > 0
    assert row["tokens_per_s"] > 0 and row["ms_per_seq"] > 0
    assert row["time_min_s"] <= row["time_median_s"] <= row["time_max_s"]
    if options.is_burst:
        assert 1 <= row["iterations"] <= N
        assert row["tokens_per_iteration"] == pytest.approx(N / row["iterations"])


def _subprocess(code_or_args, **kwargs):
    env = subprocess_env(PYTHONPATH=REPO)
    args = code_or_args if isinstance(code_or_args, list) else ["-c", code_or_args]
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=120, **kwargs)


@pytest.mark.integration
def test_sampler_counters_follow_sample_stats(sampling_rows):
    for name, row in sampling_rows.items():
        _check_row(name, row)
        assert row["repeats"] == 2
    assert sampling_rows["burst_jacobi"]["order"] == "spread"
    ar = sampling_rows["ar"]
    assert ar["forward_passes"] == N + 1 and ar["iterations"] == N
    assert ar["tokens_per_iteration"] == 1.0


@pytest.mark.slow
def test_sampler_counters_uncached_and_paper(params):
    for options in (SampleOptions("ar_nocache"),
                    SampleOptions("burst_paper", window=4, n_orders=3)):
        row = sampling.measure_sampler(TINY, params, options, N, B, repeats=2, seed=1)
        _check_row(options.sampler, row)
    assert row["window_eff"] == 4 and row["n_orders"] == 3


def test_product_law_weights_accept_every_candidate(params):
    product = models.variant_params("product", TINY, params)
    row = sampling.measure_sampler(TINY, product, SampleOptions("burst"), N, B,
                                   repeats=1, warmup=2, weights="product")
    assert row["iterations_max"] == 1 and row["forward_passes"] == 3
    assert row["weights"] == "product"


def test_kernel_matches_public_function(params):
    tokens, known = sampling.unconditional_inputs(TINY, B, N)
    key = jax.random.key(5)
    assert sampling.kernel_matches_public(TINY, params, SampleOptions("burst"), key,
                                          tokens, known)


@pytest.mark.slow
def test_kernel_matches_public_function_all_samplers(params):
    tokens, known = sampling.unconditional_inputs(TINY, B, N)
    for options in (SampleOptions("ar"), SampleOptions("ar_nocache"),
                    SampleOptions("burst_paper", window=4, n_orders=2)):
        assert sampling.kernel_matches_public(TINY, params, options, jax.random.key(5), tokens,
                                              known)


def test_time_calls_warms_up_and_times():
    calls = []
    timing, outs = harness.time_calls(lambda i: calls.append(i) or jax.numpy.ones(3) * i, 3,
                                      warmup=2)
    assert calls == [0, 1, 2, 3, 4] and len(outs) == 3 and len(timing.times_s) == 3
    assert float(outs[0][0]) == 2.0
    with pytest.raises(ValueError):
        harness.time_calls(lambda i: None, 0)


def test_cost_numbers_handles_dict_list_and_missing():
    class Fake:
        def __init__(self, cost):
            self.cost = cost

        def cost_analysis(self):
            return self.cost

        def memory_analysis(self):
            return None

    assert harness.cost_numbers(Fake({"flops": 6.0, "bytes accessed": 36.0}))["xla_flops"] == 6.0
    assert harness.cost_numbers(Fake([{"flops": 2.0}]))["xla_flops"] == 2.0
    assert harness.cost_numbers(Fake(None))["xla_flops"] is None


def test_flops_formula(params):
    n_matmul = models.matmul_params(TINY, params)
    assert n_matmul == count_params(params) - params["pos"]["wpe"].size
    assert models.model_flops_per_token(TINY, params, 8) == 6 * n_matmul + 12 * 1 * 16 * 8


@pytest.mark.integration
def test_rows_plots_and_training(tmp_path, sampling_rows):
    mm = roofline.measure_matmul(64, np.float32, repeats=2)
    assert mm["flops_s"] > 0
    train = training.measure_training(TINY, 2, N, repeats=2, matmul_flops_s=mm["flops_s"])
    assert train["step_ms"] > 0 and train["tokens_per_s"] > 0 and 0 < train["mfu"]
    assert train["step_source"] == "sigma_jax.train.make_train_step"

    writer = report.ResultWriter(tmp_path)
    for row in [*sampling_rows.values(), train, mm]:
        writer.add(row)
    lines = {}
    for suite in ("sampling", "training", "roofline"):
        lines[suite] = [json.loads(x) for x in (tmp_path / f"{suite}.jsonl").read_text()
                        .splitlines()]
    assert len(lines["sampling"]) == 3
    for row in lines["sampling"]:
        assert SAMPLING_KEYS <= row.keys()
    assert TRAINING_KEYS <= lines["training"][0].keys()

    paths = report.plot_sampling(writer.rows["sampling"], tmp_path)
    assert {os.path.basename(p) for p in paths} >= {"calls_vs_length.png",
                                                     "tokens_per_s_vs_batch.png"}
    for p in paths:
        assert os.path.getsize(p) > 1000
    table = report.format_table(writer.rows["sampling"], report.SAMPLING_COLUMNS)
    assert "burst[random](W=all)" in table and "tok/s" in table


def test_decode_roofline_row(params):
    row = roofline.measure_decode(TINY, params, 2, 7, repeats=2, copy_bytes_s=1e9)
    assert row["bytes_per_call"] == models.param_bytes(params) + models.kv_bytes(TINY, 2, 8)
    assert row["bw_frac_copy"] > 0 and row["ms_per_call"] > 0


def test_bench_config_validation():
    with pytest.raises(ValueError, match="lengths"):
        BenchConfig(lengths=(0,))
    with pytest.raises(ValueError, match="suites"):
        BenchConfig(suites=("sampling", "nope"))
    with pytest.raises(ValueError, match="checkpoint"):
        BenchConfig(weights=("checkpoint",))
    with pytest.raises(ValueError, match="init"):
        BenchConfig(workdir="/tmp", weights=("checkpoint", "init"))
    for budget in (float("nan"), -1.0, 0.0):
        with pytest.raises(ValueError, match="budget_s must be a number of seconds > 0"):
            BenchConfig(budget_s=budget)
    assert BenchConfig(budget_s=float("inf")).budget_s == float("inf")
    for seed in (-1, 2**63):
        with pytest.raises(ValueError) as error:
            BenchConfig(seed=seed)
        assert str(error.value) == f"seed must be an integer in [0, {2**63 - 1}]; got {seed}"
    assert BenchConfig(seed=2**63 - 1).seed == 2**63 - 1
    assert BenchConfig(lengths=(16, 64), batches=(1, 4, 8)).points() == [
        (16, 1), (64, 1), (64, 4), (64, 8)]


def test_list_flags_take_positive_integers():
    assert positive_ints("batches", ["1", " 16"]) == (1, 16)
    for bad in (["x"], ["0"], ["1", "-2"]):
        with pytest.raises(ValueError, match="--batches takes positive integers"):
            positive_ints("batches", bad)
    with pytest.raises(ValueError, match="--batches must not be empty"):
        positive_ints("batches", [])


def test_empty_flags_are_refused_not_defaulted():
    assert given("weights", None, ("init",)) == ("init",)
    assert given("weights", ["init", "product"], ("init",)) == ["init", "product"]
    assert given("budget_s", 0.0, 150.0) == 0.0 and given("out", "none", "x") == "none"
    for value in ([], [""], "", " "):
        with pytest.raises(ValueError) as error:
            given("weights", value, ("init",), "weights (init, peaked)")
        assert str(error.value) == ("--weights must not be empty: give weights (init, peaked), "
                                    "or leave the flag out")


def test_output_paths_are_checked_before_any_work(tmp_path):
    """A file path in a folder (made if missing) that is not a folder; a folder (made if
    missing) that is not a file; anything else a one-line ValueError naming the flag."""
    afile = tmp_path / "afile"
    afile.write_text("kept")
    assert output_path(tmp_path / "new" / "rows.jsonl", "out") == tmp_path / "new" / "rows.jsonl"
    assert (tmp_path / "new").is_dir() and not (tmp_path / "new" / "rows.jsonl").exists()
    assert output_path(afile, "json") == afile and afile.read_text() == "kept"
    assert output_path(tmp_path / "d" / "e", "out", folder=True).is_dir()
    bad = [((tmp_path, "json"), {}, "--json=.* is a folder; give a file path"),
           ((afile / "x", "out"), {}, "afile is a file, not a folder"),
           ((afile / "x" / "y", "out"), {"folder": True}, "afile is a file, not a folder"),
           ((afile, "out"), {"folder": True}, "--out=.*afile is a file, not a folder")]
    if os.path.isdir("/proc/self"):  # Linux: nothing can be made under /proc
        bad.append((("/proc/sigma_jax_x/rows.jsonl", "out"), {}, "cannot create the folder"))
    for args, kwargs, message in bad:
        with pytest.raises(ValueError, match=message) as error:
            output_path(*args, **kwargs)
        assert "\n" not in str(error.value)
    assert afile.read_text() == "kept"


@pytest.mark.parametrize("args", [
    ["--lengths=0"],
    ["--preset=no_such_preset", "--suite=sampling"],
    ["--batches="],  # an empty list is refused, not replaced by the defaults
])
@pytest.mark.integration
def test_launcher_bad_input_exits_2(args):
    result = _subprocess(["-m", "launch.bench", "--out=none", *args])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr


@pytest.mark.parametrize("args, message", [
    (["--steps=0"], "--steps must be an integer >= 1"),
    (["--warmup=0"], "--warmup must be >= 1 (the first step compiles"),
    (["--meshes="], "--meshes must be comma-separated meshes data:fsdp:tensor"),
    (["--meshes=1:1:1,,1:1:1"], "none empty; got '1:1:1,,1:1:1'"),
    (["--meshes=1:1:1,2:x:1"], "2:x:1"),
    (["--json=tests"], "--json=tests is a folder"),
])
@pytest.mark.integration
def test_step_time_bad_flags_exit_2_before_any_step(args, message):
    result = _subprocess(["-m", "launch.step_time", "--config=tiny", "--steps=1", *args])
    assert result.returncode == 2 and result.stdout == "", result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


@pytest.mark.integration
def test_import_without_grain():
    code = ("import sys; sys.modules['grain'] = None\n"
            "import bench.models as b, bench.suites, launch.bench\n"
            "b.preset_model_config('gpt2_small'); b.preset_model_config('tiny')\n"
            "from sigma_jax import train, checkpoint\n"
            "print('ok')\n")
    result = _subprocess(code)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.slow
def test_run_end_to_end(tmp_path):
    config = BenchConfig(preset="tiny", lengths=(8, 16), batches=(1, 2), windows=(4, None),
                         n_orders=(2,), samplers=("ar", "burst", "burst_paper"),
                         repeats=1, train_batch=2, train_reference=False, matmul_n=64,
                         copy_bytes=1 << 20, out=str(tmp_path))
    result = suites.run(config, argv=["test"], log=lambda *a: None)
    assert (tmp_path / "env.json").exists()
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["command"] == "test" and env["device_kind"]
    rows = result["rows"]["sampling"]
    assert not [r for r in rows if r.get("error")]
    assert {r["weights"] for r in rows} == {"init", "product", "peaked"}
    assert len(result["plots"]) == 3


@pytest.mark.slow
def test_launcher_end_to_end(tmp_path):
    result = _subprocess(["-m", "launch.bench", "--preset=tiny", "--lengths=8", "--batches=1",
                          "--windows=none", "--n_orders=2", "--weights=init", "--repeats=1",
                          "--train_batch=2", "--notrain_reference", f"--out={tmp_path}"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "== sampling ==" in result.stdout
    for name in ("sampling.jsonl", "training.jsonl", "roofline.jsonl", "env.json"):
        assert (tmp_path / name).exists()


@pytest.mark.integration
def test_the_sampling_grid_measures_exact_burst_along_each_order():
    config = BenchConfig(suites=("sampling",), preset="tiny", lengths=(8,), batches=(1,),
                         windows=(None,), weights=("init",), samplers=("ar", "burst_jacobi"),
                         orders=("random", "spread"), repeats=1, out=None)
    rows = suites.run(config, argv=["test"], log=lambda *a: None)["rows"]["sampling"]
    got = {(r["sampler"], r["order"]) for r in rows if r["part"] == "grid"}
    assert got == {("ar", "random"), ("burst_jacobi", "random"), ("burst_jacobi", "spread")}
    assert "spread" in report.format_table(rows, report.SAMPLING_COLUMNS)
    with pytest.raises(ValueError, match="order must be one of"):
        BenchConfig(preset="tiny", orders=("zigzag",))
