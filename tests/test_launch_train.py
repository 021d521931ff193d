"""The training launcher as a user runs it: `python -m launch.train` in subprocesses.

- Bad input (unknown preset, unknown key, ill-typed value, invalid value, missing data, an
  empty or unusable --workdir) exits 2 with one line on stderr, before any work.
- A run SIGKILLed after its step-20 checkpoint resumes (same command, same workdir) and ends
  bit-identical to an uninterrupted run of the tiny preset (50 steps).
- A run sent SIGTERM checkpoints the step it was on and exits (status 128 + 15) within 30 s.

The subprocesses share the tests' persistent compilation cache (tests/conftest.py), so only the
first of them compiles the tiny model; the uninterrupted reference runs in this process.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from cli_helpers import subprocess_env

from launch import flags as launch_flags
from launch.train import build
from sigma_jax import checkpoint, metrics_log
from sigma_jax.config import ModelConfig
from sigma_jax.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
SETS = ["checkpoint_every=20", "eval_every=0"]  # the tiny preset otherwise (50 steps)
TINY = ["--config=tiny"] + [arg for item in SETS for arg in ("--set", item)]


@pytest.fixture(scope="module")
def env():
    return subprocess_env(PYTHONPATH=str(REPO))


def _launch(args, env, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "launch.train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.integration
def test_bad_input_exits_2_with_one_line_naming_the_problem(env, tmp_path):
    (tmp_path / "afile").write_text("x")
    cases = {
        "unknown preset": (["--config=no_such_preset"], "no_such_preset"),
        "unknown key": (["--config=tiny", "--set", "n_lyer=3"], "n_lyer"),
        "ill-typed value": (["--config=tiny", "--set", "max_steps=many"], "max_steps"),
        "invalid value": (["--config=tiny", "--set", "order_policy=sideways"], "order_policy"),
        "missing data": (["--config=shakespeare_char", "--set",
                          "data_path=/nonexistent/input.txt"], "/nonexistent/input.txt"),
        "empty workdir": (["--config=tiny", "--workdir="], "--workdir is empty"),
        "workdir under a file": (["--config=tiny", f"--workdir={tmp_path / 'afile' / 'run'}"],
                                 "afile is not a directory"),
    }
    procs = {name: _launch([f"--workdir={tmp_path / name}", *args], env)
             for name, (args, _) in cases.items()}  # run side by side; a later --workdir wins
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert proc.returncode == 2, (name, out, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert cases[name][1] in lines[0], (name, lines[0])
        assert not (tmp_path / name).exists(), name  # no work was started


_HANG_AFTER_25 = textwrap.dedent("""
    import sys, time
    from launch.train import build
    from sigma_jax.train import train

    model_cfg, train_cfg, task = build("tiny", sys.argv[2:])

    def log(line):
        print(line, flush=True)
        if line.startswith("step 25/"):
            time.sleep(600)  # parked here until the test SIGKILLs the process

    train(model_cfg, train_cfg, sys.argv[1], task=task, log=log)
""")


@pytest.mark.integration
def test_sigkill_after_a_checkpoint_then_resume_is_bit_exact(env, tmp_path):
    script = tmp_path / "hang.py"
    script.write_text(_HANG_AFTER_25)
    killed_dir, log_path = tmp_path / "killed", tmp_path / "hang.log"
    with open(log_path, "w") as log:
        victim = subprocess.Popen([sys.executable, str(script), str(killed_dir), *SETS],
                                  cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        # Meanwhile, the uninterrupted reference, in this process.
        model_cfg, train_cfg, task = build("tiny", SETS)
        reference = train(model_cfg, train_cfg, tmp_path / "ref", task=task, log=lambda s: None)
        deadline = time.monotonic() + 300
        while not ((killed_dir / "checkpoints" / "20").is_dir()
                   and "step 25/" in log_path.read_text()):
            assert victim.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the step-20 checkpoint never appeared"
            time.sleep(0.2)
        victim.send_signal(signal.SIGKILL)  # parked at step 25: step 20 is saved, 25 is not
        assert victim.wait(timeout=60) == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            victim.kill()
    assert sorted(p.name for p in (killed_dir / "checkpoints").iterdir()) == ["20"]

    resumed = _launch([*TINY, f"--workdir={killed_dir}"], env)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resumed from step 20" in out

    ref_cfg, ref_params, ref_step = checkpoint.load(tmp_path / "ref")
    cfg, params, step = checkpoint.load(killed_dir)
    assert cfg == ref_cfg and step == ref_step == 50
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_array_equal(a, b)
    rows = metrics_log.read_metrics(killed_dir / "metrics.jsonl")
    assert rows[-1]["step"] == 50
    assert rows[-1]["loss"] == reference["loss"]
    assert rows[-1]["val_loss_left_to_right"] == reference["val_loss_left_to_right"]
    assert [r["step"] for r in rows] == sorted({r["step"] for r in rows})

    # Every checkpoint torn: one warning line per checkpoint tried, then one error line, rc 2.
    for manifest in (killed_dir / "checkpoints").glob("*/params/manifest.ocdbt"):
        manifest.write_bytes(b"")
    torn = _launch([*TINY, f"--workdir={killed_dir}", "--set", "max_steps=60"], env)
    _, err = torn.communicate(timeout=300)
    lines = err.strip().splitlines()
    assert torn.returncode == 2, err
    assert lines[-1].startswith("error: no checkpoint in ") and "can be restored" in lines[-1]
    assert all(line.startswith("warning: checkpoint ") for line in lines[:-1]), err


@pytest.mark.integration
def test_sigterm_saves_the_last_finished_step_and_exits_promptly(env, tmp_path):
    """SIGTERM mid-run: the launcher finishes the step under way, checkpoints it, and exits with
    128 + 15 well within 30 s; the checkpoint is that step, and it loads."""
    workdir, log_path = tmp_path / "term", tmp_path / "term.log"
    sets = ["max_steps=100000", "checkpoint_every=100000", "eval_every=0", "log_every=5"]
    args = ["--config=tiny", *(a for item in sets for a in ("--set", item))]
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "launch.train", *args,
                                 f"--workdir={workdir}"], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while "step 25/" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "training never reached step 25"
            time.sleep(0.2)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        seconds = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log_path.read_text()
    assert code == 128 + signal.SIGTERM, out
    assert seconds < 30, f"exit took {seconds:.1f} s after SIGTERM"
    line = next(x for x in out.splitlines() if x.startswith("signal "))
    step = int(line.split(" at step ")[1].split(":")[0])
    assert step >= 25 and "checkpoint saved" in line
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [step]
    assert checkpoint.load(workdir)[2] == step


# ---------------------------------------------------------------- --set parsing (in process)


def test_set_values_are_typed_by_the_dataclass_fields():
    groups = {"model": (ModelConfig, {"n_layer": 2, "d_ff": None, "dropout": 0.0}),
              "train": (TrainConfig, {"seed": 0, "data_path": None})}
    out = launch_flags.apply_overrides(
        ["n_layer=4", "d_ff=none", "model.dropout=0.1", "bos=false", "train.seed=7",
         "data_path=/x=y", "learning_rate=3e-4", "order_policy=randcur:20"], groups)
    assert out["model"] == {"n_layer": 4, "d_ff": None, "dropout": 0.1, "bos": False}
    assert out["train"] == {"seed": 7, "data_path": "/x=y", "learning_rate": 3e-4,
                            "order_policy": "randcur:20"}
    assert groups["model"][1]["n_layer"] == 2  # inputs are not modified


@pytest.mark.parametrize("item, message", [
    ("n_layer", "key=value"),
    ("nope=1", "unknown key 'nope'"),
    ("model.seed=1", "model has no field 'seed'"),
    ("optim.lr=1", "unknown group 'optim'"),
    ("n_layer=2.5", "model.n_layer must be int"),
    ("bos=maybe", "model.bos must be bool"),
    ("d_ff=big", "model.d_ff must be int or none"),
    ("dropout=x", "model.dropout must be float"),
])
def test_bad_set_items_are_one_line_errors(item, message):
    groups = {"model": (ModelConfig, {}), "train": (TrainConfig, {})}
    with pytest.raises(ValueError, match=message):
        launch_flags.apply_overrides([item], groups)


def test_an_ambiguous_key_needs_a_prefix():
    from dataclasses import make_dataclass

    sample = make_dataclass("SampleConfig", [("seed", int, 0)])
    groups = {"train": (TrainConfig, {}), "sample": (sample, {})}
    with pytest.raises(ValueError, match="ambiguous key 'seed'.*train.seed or sample.seed"):
        launch_flags.apply_overrides(["seed=1"], groups)
    assert launch_flags.apply_overrides(["sample.seed=1"], groups)["sample"] == {"seed": 1}


# ---------------------------------------------------------------- presets


def test_every_preset_builds_and_takes_its_vocabulary_from_the_task():
    from sigma_jax.presets import PRESETS, build_model_config

    vocab = {"shakespeare_char": 65, "text_bpe": 50257, "maze": 5, "product": 2, "step": 2,
             "permutation": 100, "flights": 450}
    assert {"tiny", "shakespeare_char", "shakespeare_char_cpu", "maze", "product", "step",
            "permutation", "flights", "gpt2_small"} <= set(PRESETS)
    for name, preset in PRESETS.items():
        model_cfg = build_model_config(preset.model, vocab[preset.train.task])
        if preset.train.seq_len is not None:
            assert preset.train.seq_len <= model_cfg.block_size, name
        if name == "gpt2_small":  # the padded BPE vocabulary
            assert model_cfg.vocab_size == 50304 and preset.train.global_batch == 480
        else:
            assert model_cfg.vocab_size == vocab[preset.train.task], name
    with pytest.raises(ValueError, match="smaller than the task"):
        build_model_config(PRESETS["gpt2_small"].model, 60000)


def test_preset_lookup_lists_the_presets_and_a_numpy_vocabulary_is_checked():
    from sigma_jax.presets import PRESETS, build_model_config, get_preset

    assert get_preset("tiny") is PRESETS["tiny"]
    with pytest.raises(ValueError, match="^unknown preset 'nope'; presets: tiny, .*, "
                                         "gpt2_small$"):
        get_preset("nope")
    with pytest.raises(ValueError, match="^vocab_size 5 is smaller than the task's vocabulary "
                                         "11; leave it unset"):
        build_model_config({"vocab_size": np.int64(5), "block_size": 4}, 11)
    model_cfg = build_model_config({"vocab_size": np.int64(12), "block_size": 4}, 11)
    assert model_cfg.vocab_size == 12 and type(model_cfg.vocab_size) is int
