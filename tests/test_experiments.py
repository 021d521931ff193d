"""The experiment drivers: metric sanity checks (fast) and end-to-end --smoke runs.

Each smoke run trains tiny models for a few steps, samples with every strategy and writes its
results files into a temporary folder. The slower drivers are marked slow; the synthetic driver
stays in the default run.
"""

import json

import jax
import numpy as np
import pytest

from experiments import common, flights, maze, positions, synthetic, text
from sigma_jax import ModelConfig, init_params
from sigma_jax.data import load_task
from sigma_jax.data import maze as maze_lib


def smoke(driver, tmp_path, *extra):
    out, work = tmp_path / "out", tmp_path / "work"
    record = driver.main(["--smoke", "--quiet", f"--out={out}", f"--workdir={work}", *extra])
    assert (out / "results.md").exists()
    saved = json.loads((out / "results.json").read_text())
    assert saved["size"] == "smoke" and saved["wall_s"] > 0
    assert "--smoke" in saved["command"] and saved["hardware"]["cores"] >= 1
    return record, out


# ---------------------------------------------------------------- fast checks


def test_common_args_and_tables(tmp_path):
    args = common.parse_args("maze", ["--smoke", f"--out={tmp_path}"], "x")
    assert args.size == "smoke" and args.out == str(tmp_path)
    assert args.workdir.endswith("exp_maze_smoke")
    default = common.parse_args("text", [], "x")
    assert default.out.endswith("experiments/results/text") and default.steps is None
    assert common.parse_args("text", ["--size=published"], "x").out.endswith("text/published")
    assert common.parse_args("text", ["--steps=7"], "x").steps == 7
    table = common.md_table(["a", "b"], [["x", 1.23456], ["y", 12345678]])
    assert table.splitlines()[0] == "| a | b |" and "1.235" in table and "12,345,678" in table
    assert common.to_jsonable({"a": np.float32(1.5), "b": np.arange(2)}) == {"a": 1.5,
                                                                           "b": [0, 1]}


@pytest.mark.integration
def test_sample_statistics_on_an_untrained_model():
    cfg = ModelConfig(vocab_size=5, block_size=10, n_layer=1, n_head=2, n_embd=16)
    params = init_params(cfg, jax.random.key(0))
    refs = np.tile(np.arange(10) % 5, (3, 1)).astype(np.int32)
    known = common.prefix_known(3, 10, 4)
    for strategy in ("ar_random", "burst", "burst_paper"):
        out, stats = common.sample(cfg, params, jax.random.key(1), refs, known, strategy,
                                   chunk=2)
        assert out.shape == refs.shape and (out[:, :4] == refs[:, :4]).all()
        assert stats["generated_mean"] == 6 and stats["finished"] == 1.0
        assert 1 <= stats["iterations_mean"] <= stats["iterations_max"] <= 6
        if strategy == "ar_random":
            assert stats["iterations_max"] == 6 and stats["forward_passes_mean"] == 7
    with pytest.raises(ValueError, match="unknown strategy"):
        common.sample(cfg, params, jax.random.key(1), refs, known, "beam")


def test_maze_metric_scores_reference_and_rejects_corruptions():
    task = load_task("maze", height=7, width=9, n_walls=3, dist_min=4)
    h, w = 7, 9
    for i in range(5):
        ref = task.val[i]
        assert maze.status_of(ref, ref, h, w) == "optimal"
        assert task.metrics(ref[None], ref[None]) == {"accuracy": 1.0, "proportion_optimal": 1.0}
        path = np.flatnonzero(ref[h * w:] == maze_lib.PATH) + h * w
        broken = ref.copy()
        broken[path[len(path) // 2]] = maze_lib.EMPTY  # a gap in the path
        assert maze.status_of(broken, ref, h, w) == "wrong"
        walled = ref.copy()
        walled[h * w + np.flatnonzero(ref[:h * w] == maze_lib.WALL)[0]] = maze_lib.PATH
        assert maze.status_of(walled, ref, h, w) == "wrong"
        erased = ref.copy()
        erased[h * w:] = ref[:h * w]  # no path at all
        assert maze.status_of(erased, ref, h, w) == "wrong"


def test_maze_longer_path_is_correct_but_not_optimal():
    # An open 5x7 room: the straight path is optimal; a detour through the row below is not.
    h, w = 5, 7
    room = np.ones((h, w), np.int32)
    room[1:4, 1:6] = maze_lib.EMPTY
    room[1, 1], room[1, 5] = maze_lib.START, maze_lib.GOAL
    straight, detour = room.copy(), room.copy()
    straight[1, 2:5] = maze_lib.PATH
    detour[2, 1:6] = maze_lib.PATH
    ref = np.concatenate([room.ravel(), straight.ravel()])
    longer = np.concatenate([room.ravel(), detour.ravel()])
    assert maze.status_of(ref, ref, h, w) == "optimal"
    assert maze.status_of(longer, ref, h, w) == "correct"


def test_flights_errors_baselines_and_masks():
    rng = np.random.default_rng(0)
    refs = np.cumsum(rng.integers(-1, 2, (3, 32)), axis=1).astype(np.int32) + 200
    known = flights.infill_known(3, 32, 5)
    assert known.sum(1).tolist() == [5, 5, 5] and known[:, 0].all() and known[:, -1].all()
    self_err = flights.masked_errors(refs, refs, known)
    assert self_err["altitude_mse_ft"] == 0.0 and self_err["mse_error_rate"] == 0.0
    assert self_err["continuity_error_rate"] == 0.0
    off = refs + 2  # 200 ft everywhere
    assert flights.masked_errors(off, refs, known)["altitude_mse_ft"] == pytest.approx(200.0**2)
    jump = refs.copy()
    jump[0, 10] += 10
    assert flights.masked_errors(jump, refs, known)["continuity_error_rate"] == pytest.approx(1 / 3)
    interp = flights.interpolate(refs, known)
    assert (interp[known] == refs[known]).all()


def test_walk_bayes_loss_matches_brute_force_enumeration():
    """The closed form (nearest known neighbours, binomial steps mod 16) against counting all
    16 * 2^(n-1) equally likely walks consistent with what is known."""
    import itertools
    import math

    n, v = 5, positions.WALK_V
    walks = np.array([[(s + sum(steps[:p])) % v for p in range(n)]
                      for s in range(v) for steps in itertools.product((0, 1), repeat=n - 1)])
    rng = np.random.default_rng(3)
    tokens = walks[rng.choice(len(walks), 4)]
    order = np.stack([rng.permutation(n) for _ in range(4)])
    total = 0.0
    for row, perm in zip(tokens, order, strict=True):
        for t, p in enumerate(perm):
            consistent = np.all(walks[:, perm[:t]] == row[perm[:t]], axis=1)
            total -= math.log(np.mean(walks[consistent, p] == row[p]))
    np.testing.assert_allclose(positions.walk_bayes_loss(tokens, order), total / tokens.size,
                               rtol=1e-10)


# ---------------------------------------------------------------- smoke runs


def check_synthetic_rows(rows):
    for r in rows:
        assert 0.0 <= r["correct_rate"] <= 1.0 and r["finished"] == 1.0
        assert r["reference_correct_rate"] >= 0.75  # real data passes its own check
        n = r["seq_len"]
        assert r["generated_mean"] == n
        assert 1 <= r["iterations_mean"] <= r["iterations_max"] <= n  # at most R iterations
        if r["sampler"] == "ar_random":
            assert r["iterations_max"] == n and r["forward_passes_mean"] == n + 1
        else:
            assert r["forward_passes_mean"] == 1 + 2 * r["iterations_max"]


@pytest.mark.integration
def test_positions_smoke(tmp_path):
    record, out = smoke(positions, tmp_path)
    assert (out / "curves.png").exists()
    rows = record["rows"]
    assert [r["encoding"] for r in rows] == list(positions.ENCODINGS) * 2
    for r in rows:
        assert len(r["curve"]) == r["steps"] // 2 and np.isfinite(r["val_loss_random"])
    refs = record["references"]["random walk"]
    assert 0 < refs["Bayes optimum"] < refs["unigram ln 16"]


@pytest.mark.integration
def test_synthetic_smoke_product(tmp_path):
    record, out = smoke(synthetic, tmp_path, "--tasks=product")
    assert (out / "iterations_vs_length.png").exists()
    rows = record["results"]
    check_synthetic_rows(rows)
    burst = {(r["seq_len"], r["sampler"]) for r in rows if r["sampler"].startswith("burst")}
    assert burst == {(n, s) for n in (8, 16) for s in ("burst", "burst_paper")}
    assert [r["seq_len"] for r in record["training"]] == [16]  # one shared product model


@pytest.mark.slow  # ~2 minutes on 2 cores: three more trainings and their samplers
@pytest.mark.integration
def test_synthetic_smoke_all_tasks(tmp_path):
    record, _ = smoke(synthetic, tmp_path, "--tasks=step,permutation")
    check_synthetic_rows(record["results"])
    assert {r["task"] for r in record["results"]} == {"step", "permutation"}


@pytest.mark.integration
def test_text_smoke(tmp_path):
    record, out = smoke(text, tmp_path)
    assert (out / "val_loss.png").exists()
    assert [r["policy"] for r in record["training"]] == list(text.POLICIES)
    for r in record["training"]:
        assert np.isfinite(r["val_loss_left_to_right"]) and np.isfinite(r["val_loss_random"])
    cells = {(r["trained"], r["sampler"]) for r in record["sampling"]}
    assert cells == {(p, s) for p in text.POLICIES for s in text.SAMPLERS}
    for r in record["sampling"]:
        assert r["finished"] == 1.0 and 1 <= r["iterations_mean"] <= 24
        assert r["forward_passes_mean"] >= 1 + (2 if r["sampler"].startswith("burst") else 24)
    assert "left_to_right" in (out / "results.md").read_text()


@pytest.mark.integration
def test_maze_smoke(tmp_path):
    record, out = smoke(maze, tmp_path)
    assert (out / "mazes.png").exists()
    assert record["reference_metrics"] == {"accuracy": 1.0, "proportion_optimal": 1.0}
    strategies = [r["strategy"] for r in record["strategies"]]
    assert strategies == [*common.STRATEGIES, "ar_left_to_right"]
    for r in record["strategies"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["proportion_optimal"] <= 1.0
        assert r["correct"] == round(r["accuracy"] * r["n"])


@pytest.mark.integration
def test_flights_smoke(tmp_path):
    record, out = smoke(flights, tmp_path)
    for name in ("flights_prediction", "flights_infilling", "density_prediction",
                 "density_infilling"):
        assert (out / f"{name}.png").exists()
    rows = record["results"]
    assert {r["pattern"] for r in rows} == {"prediction", "infilling"}
    for r in rows:
        assert r["altitude_mse_ft"] >= 0 and 0 <= r["continuity_error_rate"] <= 1
    for d in record["densities"].values():
        assert np.isfinite(d["nll_per_point"]) and d["posterior_mean_rmse_ft"] >= 0
