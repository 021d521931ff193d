"""The memory suite (bench/memory.py) at a tiny size: a row for every entry and batch with XLA's
positive temporaries, the KV-cache bytes of the config, targets, and an error row (not a crash)
for a configuration that fails."""

import jax
import pytest

from bench import memory
from bench.config import BenchConfig
from bench.report import ResultWriter
from sigma_jax import ModelConfig, init_params
from sigma_jax.presets import PRESETS

# One layer keeps the ten compiles quick; bfloat16 as at GPT-2-small size.
CFG = ModelConfig(vocab_size=16, block_size=16, n_layer=1, n_head=2, n_embd=16,
                  dtype="bfloat16", param_dtype="bfloat16")
N, W, BATCHES = 16, 4, (1, 4)
ENTRIES = ("sample_ar", "sample_burst[exact]", "sample_burst[jacobi]", "sample_burst[paper]",
           "train_step")


@pytest.fixture(scope="module")
def rows():
    """The suite's rows, with cached AR made to fail at batch 4 (two-line message)."""
    config = BenchConfig(suites=("memory",), preset="tiny", lengths=(N,), batches=BATCHES,
                         burst_window=W, n_orders=(2,))
    params = jax.eval_shape(lambda: init_params(CFG, jax.random.key(0)))  # nothing allocated
    real = memory.sample_ar_call

    def failing(cfg, params, key, tokens, known, **kwargs):
        if tokens.shape[0] == 4:
            raise ValueError("no room for this batch\nsecond line")
        return real(cfg, params, key, tokens, known, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(memory, "sample_ar_call", failing)
        return memory.run_memory_suite(config, CFG, params, PRESETS["tiny"].train,
                                       ResultWriter(None), log=lambda *a: None)


def _row(rows, entry, batch):
    (row,) = [r for r in rows if r["entry"] == entry and r["batch"] == batch]
    return row


def test_every_entry_and_batch_has_a_row(rows):
    assert len(rows) == len(ENTRIES) * len(BATCHES)
    for b in BATCHES:
        for entry in ENTRIES:
            row = _row(rows, entry, b)
            assert row["suite"] == "memory" and row["length"] == N
            if (entry, b) == ("sample_ar", 4):
                continue
            assert "error" not in row, row.get("error")
            assert row["temp_bytes"] > 0 and row["argument_bytes"] > 0, entry
            assert row["output_bytes"] > 0 and row["compile_s"] > 0, entry


def test_kv_cache_bytes_follow_the_config(rows):
    itemsize = 2  # bfloat16
    for b in BATCHES:
        for entry, new_slots in (("sample_ar", 1), ("sample_burst[exact]", W),
                                 ("sample_burst[jacobi]", W), ("sample_burst[paper]", W)):
            row = _row(rows, entry, b)
            if "error" in row:
                continue
            capacity = N + 1 + new_slots  # every token, the start token, one block of new slots
            expected = 2 * CFG.n_layer * b * capacity * CFG.n_embd * itemsize
            assert row["kv_cache_bytes"] == expected, entry
            assert row["temp_minus_kv_bytes"] == row["temp_bytes"] - expected
        assert _row(rows, "train_step", b)["kv_cache_bytes"] is None


def test_targets(rows):
    for b in BATCHES:
        exact = _row(rows, "sample_burst[exact]", b)
        assert exact["target_bytes"] == exact["kv_cache_bytes"] + memory.KV_SLACK_BYTES
        assert exact["target_ok"] is True  # a few kB of temporaries
        jacobi = _row(rows, "sample_burst[jacobi]", b)
        assert jacobi["target_bytes"] == memory.JACOBI_RATIO * exact["temp_bytes"]
        assert jacobi["target_ok"] == (jacobi["temp_bytes"] <= jacobi["target_bytes"])
        assert _row(rows, "train_step", b)["target_ok"] is None


def test_a_failing_configuration_is_an_error_row(rows):
    row = _row(rows, "sample_ar", 4)
    assert row["error"] == "ValueError: no room for this batch"
    assert "temp_bytes" not in row and row["target_ok"] is None
    assert "temps <= KV cache" in row["target"]
    assert "no room for this batch" in memory.format_memory_table(rows)
