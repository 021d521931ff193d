"""The roofline projection: its arithmetic against the formulas it states, FLOPs that cover the
matmuls of the passes, and the launcher's output and errors."""

import pytest
from cli_helpers import run_module

from bench import projection
from sigma_jax import ModelConfig

CFG = ModelConfig(vocab_size=50, block_size=64, n_layer=2, n_head=2, n_embd=32)


def test_projected_times_and_break_even_calls_follow_their_formulas():
    n, w = 64, 8
    costs = projection.pass_costs(CFG, 4, n, w)
    matmul_params = CFG.n_layer * 12 * CFG.n_embd ** 2 + CFG.vocab_size * CFG.n_embd
    for c in costs.values():
        assert c["flops"] >= 2 * 4 * c["queries"] * matmul_params  # at least the matmuls
    assert costs["verify_pass"]["queries"] == w and costs["burst_pass_all"]["queries"] == n
    for device, (flops_s, bytes_s) in projection.DEVICES.items():
        times = projection.project(costs, device)
        for name, c in costs.items():
            assert times[name] == max(c["flops"] / flops_s, c["bytes"] / bytes_s)
        even = projection.break_even_calls(times, n)
        ar = (n + 1) * times["ar_step"]
        exact = even["burst"] / 2 * (times["burst_pass"] + times["verify_pass"])
        jacobi = times["burst_pass_all"] + (even["burst_jacobi"] - 1) * times["verify_pass"]
        assert exact == pytest.approx(ar) and jacobi == pytest.approx(ar)


@pytest.mark.parametrize("length, window, message", [
    (0, 1, "--length must be an integer in [1, 2147483646]; got 0"),
    (-5, 1, "--length must be an integer in [1, 2147483646]; got -5"),
    (2**31 - 1, 64, "--length must be an integer in [1, 2147483646]; got 2147483647"),
    (32, 0, "--window must be an integer >= 1; got 0"),
    (32, 33, "--window must be in [1, --length] = [1, 32]; got 33"),
])
def test_length_and_window_are_bounded(length, window, message):
    with pytest.raises(ValueError) as error:
        projection.check_sizes(length, window)
    assert str(error.value) == message
    projection.check_sizes(32, 32)
    projection.check_sizes(2**31 - 2, 64)


@pytest.mark.integration
def test_the_launcher_prints_a_labelled_projection(tmp_path):
    out = run_module("-m", "launch.projection", "--preset=tiny", "--length=32", "--window=8",
                     "--batches=1,2", "--devices=h100", "--measure",
                     f"--out={tmp_path / 'rows.jsonl'}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "# PROJECTION (not measured)" in out.stdout and "# measured on cpu" in out.stdout
    assert out.stdout.count("ms/call  measured") == 8  # every pass of both batches
    assert out.stdout.count("beats cached AR below") == 4
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 12
    bad = run_module("-m", "launch.projection", "--devices=v100")
    assert bad.returncode == 2 and "unknown device 'v100'" in bad.stderr
    none = run_module("-m", "launch.projection", "--devices=")
    assert none.returncode == 2 and "--devices names no device" in none.stderr
