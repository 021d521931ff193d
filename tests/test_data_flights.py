"""Flights task: cleaning, tokens, split by flight, and the altitude metrics on known values."""

import os
from pathlib import Path

import numpy as np
import pytest

from sigma_jax.data import DataError, load_task
from sigma_jax.data import flights as fl

DATA = Path(os.environ.setdefault("SIGMA_JAX_DATA", "/work/shared/data"))
QUICKSTART = DATA / "flights" / "quickstart.json.gz"
needs_file = pytest.mark.skipif(not QUICKSTART.is_file(),
                                reason=f"ADS-B sample not at {QUICKSTART} (set SIGMA_JAX_DATA)")


@pytest.fixture(scope="module")
def task():
    if not QUICKSTART.is_file():
        pytest.skip(f"ADS-B sample not at {QUICKSTART} (set SIGMA_JAX_DATA)")
    return load_task("flights")


@needs_file
def test_shapes_and_vocab(task):
    assert (task.vocab_size, task.seq_len, task.prompt_len) == (450, 256, 64)
    train = task.train.rows  # [n, 256]
    val = task.val.rows
    assert train.dtype == np.int32 and train.shape[1] == 256 and len(train) > 150
    assert 10 <= len(val) <= 0.2 * (len(train) + len(val))
    for rows in (train, val):
        assert rows.min() >= 0 and rows.max() < 450
    assert task.decode(np.array([350, 351])) == "35000 35100"
    short = load_task("flights", seq_len=64, prompt_len=8)
    assert short.train[0].shape == (64,) and short.prompt_len == 8


@needs_file
def test_no_spikes_left(task):
    segments = fl.load_segments(str(QUICKSTART.resolve()))
    for pieces in segments.values():
        for t, a in pieces:
            assert a.min() >= 0 and a.max() <= 100_000
            dt = np.diff(t)
            assert (dt > 0).all() and (dt <= fl.GAP_S).all()
            assert (np.abs(np.diff(a)) <= np.maximum(fl.MAX_STEP_FT, fl.MAX_RATE_FT_S * dt)).all()
            assert not fl._isolated_jumps(t, a).any()
    rows = np.concatenate([task.train.rows, task.val.rows])
    jumps = (np.abs(np.diff(rows, axis=1)) >= fl.CONTINUITY_JUMP).any(axis=1)
    assert jumps.mean() < 0.02  # the data itself is (almost) continuous


def test_clean_track_removes_planted_faults():
    t = np.arange(400.0)
    alt = 3000.0 + 10.0 * t  # a steady climb, 600 ft/min
    ground = np.zeros(400, bool)
    alt[50] += 5000  # isolated spike
    alt[60] = -50  # negative
    alt[70] = 120_000  # above 100,000 ft
    alt[80] = np.nan  # missing
    alt[:5], ground[:5] = 38_000, True  # garbage on the ground
    alt[380:] = 36_000  # a stuck value reported at the end
    t[200:] += 1000  # a 1,000 s gap: two flights
    pieces = fl.clean_track(t, alt, ground)
    sizes = [p[0].size for p in pieces]
    assert sizes[0] == 191 and 178 <= sizes[1] <= 180  # the median test may trim a step's edge
    for pt, pa in pieces:
        assert np.allclose(pa, 3000.0 + 10.0 * (pt - 1000.0 * (pt >= 1200)))
    assert fl.clean_track(t[:40], alt[:40], ground[:40]) == []  # too short
    flat = fl.clean_track(t[:100], np.full(100, 4625.0), ground[:100] & False)
    assert flat == []  # a constant (stale) reading


@needs_file
def test_split_by_flight(task):
    segments = fl.load_segments(str(QUICKSTART.resolve()))
    train_keys, val_keys = fl.split_keys(segments, 0.1)
    assert train_keys.isdisjoint(val_keys) and train_keys | val_keys == set(segments)
    assert len(val_keys) == round(0.1 * len(segments))
    assert fl.split_keys(segments, 0.1) == (train_keys, val_keys)  # deterministic
    n_train = sum(len(segments[k]) for k in train_keys)
    assert (len(task.train), len(task.val)) == (n_train, sum(len(segments[k]) for k in val_keys))
    train_rows = {r.tobytes() for r in task.train.rows}
    assert not any(r.tobytes() in train_rows for r in task.val.rows)


def test_tokenize_and_resample():
    ft = np.array([-30.0, 49.0, 51.0, 35_000.0, 99_000.0])
    assert fl.tokenize(ft).tolist() == [0, 0, 1, 350, 449]
    assert np.allclose(fl.resample(np.array([0.0, 10.0]), np.array([0.0, 1000.0]), 5),
                       [0, 250, 500, 750, 1000])


def test_metric_values_on_hand_built_sequences():
    refs = np.zeros((4, 8), np.int32)
    samples = np.zeros((4, 8), np.int32)
    samples[0, 2:] = 1  # 1 token = 100 ft off on every generated position: 10,000 ft^2
    samples[1, 2:] = [3, 3, 3, 3, 3, 3]  # 300 ft: 90,000 ft^2; first jump is 3 tokens
    samples[2, 5] = 9  # one jump of 9 up and 9 down: no continuity error; MSE 81/6 tok^2
    samples[3, 0], samples[3, 1] = 10, 20  # prompt part only: MSE 0, jumps of 10 -> error
    got = fl.altitude_metrics(samples, refs, prompt_len=2)
    mse_ft = np.mean([10_000, 90_000, 81 / 6 * 10_000, 0])
    assert got["altitude_mse_ft"] == pytest.approx(mse_ft)
    assert got["altitude_rmse_ft"] == pytest.approx(np.sqrt(mse_ft))
    assert got["continuity_error_rate"] == 0.25
    assert got["mse_error_rate"] == 0.0  # no sample reaches 50 token^2
    samples[0, 2:] = 8  # 64 token^2 >= 50
    assert fl.altitude_metrics(samples, refs, prompt_len=2)["mse_error_rate"] == 0.25
    with pytest.raises(ValueError):
        fl.altitude_metrics(samples, refs[:, :4], prompt_len=2)


@needs_file
def test_task_metrics_bind_prompt_len(task):
    refs = np.stack([task.val[i] for i in range(4)])
    perfect = task.metrics(refs, refs)
    assert perfect["altitude_mse_ft"] == 0.0
    shifted = refs.copy()
    shifted[:, :task.prompt_len] += 5  # changes only the prompt: no MSE, but a jump
    assert task.metrics(shifted, refs)["altitude_mse_ft"] == 0.0


def test_missing_flights_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SIGMA_JAX_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("SIGMA_JAX_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError) as e:
        load_task("flights")
    assert "\n" not in str(e.value) and "flights/quickstart.json.gz" in str(e.value)
    bad = tmp_path / "bad.json.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(DataError, match="gzip"):
        load_task("flights", data_path=str(bad))
    with pytest.raises(DataError, match="prompt_len"):
        load_task("flights", data_path=str(bad), prompt_len=300)


@pytest.mark.parametrize("options, message", [
    ({"seq_len": True}, "seq_len must be an integer >= 2; got True"),
    ({"prompt_len": np.int64(8)}, "prompt_len must be an integer in [0, 7]; got 8"),
    ({"prompt_len": 2.0}, "prompt_len must be an integer in [0, 7]; got 2.0"),
    ({"val_fraction": "0.1"}, "val_fraction must be a finite number in (0, 1); got '0.1'"),
])
def test_bad_options_raise_one_line_before_reading(tmp_path, options, message):
    with pytest.raises(DataError) as e:  # the file is never opened
        load_task("flights", data_path=str(tmp_path / "missing.json.gz"),
                  **{"seq_len": 8, **options})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_decode_takes_integer_ids():
    assert fl.decode(np.array([350, 351], np.int64)) == "35000 35100"
    with pytest.raises(DataError, match=r"^tokens must hold integer token ids; got dtype float64$"):
        fl.decode([350.0])
