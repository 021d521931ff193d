"""The sample CLI: prompt syntax, infilling through the launcher, and one-line usage errors (bad
flags, prompts, run configs and checkpoints)."""

import json
import re
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run_module

from launch.flags import one_line
from launch.prompt import parse_prompt, read_prompt

ROOT = Path(__file__).resolve().parents[1]


def _encode(text):
    return np.array([ord(c) - ord("a") for c in text])


def test_prompt_syntax_matches_the_published_example():
    tokens, known = parse_prompt("abcd<missing>5</missing>jklm", _encode, 20, 32)
    assert known.tolist() == [True] * 4 + [False] * 5 + [True] * 4 + [False] * 7
    np.testing.assert_array_equal(tokens[:4], [0, 1, 2, 3])
    np.testing.assert_array_equal(tokens[9:13], [9, 10, 11, 12])


def test_prompt_errors():
    with pytest.raises(ValueError, match="more than --length"):
        parse_prompt("abcdef<missing>10</missing>", _encode, 12, 32)
    with pytest.raises(ValueError, match="block_size"):
        parse_prompt("ab", _encode, 40, 32)
    for text, gap in [("ab<missing>-3</missing>", "<missing>-3</missing>"),
                      ("<missing>x</missing>cd", "<missing>x</missing>"),
                      ("ab</missing>", "</missing>"), ("ab<missing>", "<missing>")]:
        with pytest.raises(ValueError, match=f"malformed gap '{gap}' in the prompt"):
            parse_prompt(text, _encode, 12, 32)


def test_prompt_files(tmp_path):
    (tmp_path / "prompt.txt").write_text("abc")
    assert read_prompt(f"FILE:{tmp_path / 'prompt.txt'}") == "abc"
    (tmp_path / "binary").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match=f"prompt file {tmp_path} is a folder"):
        read_prompt(f"FILE:{tmp_path}")
    with pytest.raises(ValueError, match="binary is not UTF-8 text"):
        read_prompt(f"FILE:{tmp_path / 'binary'}")
    with pytest.raises(FileNotFoundError, match="not found"):
        read_prompt(f"FILE:{tmp_path / 'absent'}")


@pytest.mark.parametrize("text, message", [
    ("[]", "is not a run config"),
    ("{}", "is not a run config"),
    ('{"model": {}, "train": {}}', "is not a run config"),
    ('{"model": {"bogus": 1}, "train": {"task": "product"}}', "unknown model field 'bogus'"),
    ('{"model": {"vocab_size": 2}, "train": {"task": "product"}}', "bad model config"),
    ("{bad", "is not valid JSON"),
    (b"\xff\xfe", "is not UTF-8 text"),
])
def test_a_malformed_run_config_is_one_line_naming_the_file(tmp_path, text, message):
    from launch.sample import load_run_config

    path = tmp_path / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=message) as error:
        load_run_config(str(tmp_path))
    assert str(error.value).startswith(str(path)) or f" {path} " in str(error.value)
    assert "\n" not in str(error.value)


def test_one_line_cuts_orbax_errors():
    spec = "[tensorstore_spec='{\\\"a\\\":{\\\"b\\\":[1]}}']"
    text = f"DATA_LOSS: Error reading x: length (0) < 16 {spec} {spec[:17]}[1]{spec[17:]}\nmore"
    assert one_line(text) == "DATA_LOSS: Error reading x: length (0) < 16"
    cut = one_line("a" * 500 + " the cause", limit=100)
    assert len(cut) == 100 and " ... " in cut and cut.endswith(" the cause")


def test_closed_loop_reports_are_dropped_and_others_kept(monkeypatch):
    from launch.flags import drop_closed_loop_reports

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    drop_closed_loop_reports()
    drop_closed_loop_reports()  # idempotent: one filter
    closed = types.SimpleNamespace(object=None, exc_value=RuntimeError("Event loop is closed"))
    other = types.SimpleNamespace(object=None, exc_value=RuntimeError("something else"))
    sys.unraisablehook(closed)
    sys.unraisablehook(other)
    assert seen == [other]


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    """A 2-step character-level run: enough for a checkpoint with the text vocabulary."""
    workdir = tmp_path_factory.mktemp("char_run")
    out = run_module("-m", "launch.train", "--config=tiny", f"--workdir={workdir}",
               "--set", "task=shakespeare_char", "--set", "max_steps=2", "--set", "eval_every=2",
               "--set", "checkpoint_every=2", "--set", "log_every=1", "--set", "warmup_steps=1")
    assert out.returncode == 0, out.stderr[-2000:]
    return workdir


@pytest.mark.parametrize("sampler, order", [("burst", "random"), ("ar", "random"),
                                           ("burst_jacobi", "spread")])
@pytest.mark.integration
def test_infilling_through_the_cli_keeps_the_prompt(char_run, sampler, order):
    out = run_module("-m", "launch.sample", f"--workdir={char_run}", f"--sampler={sampler}",
               "--prompt=ROMEO<missing>6</missing>the king", "--length=24", "--num_samples=2",
               *(["--window=4"] if sampler != "ar" else []), f"--order={order}",
               "--known_order=ascending")
    assert out.returncode == 0, out.stderr[-2000:]
    chunks = re.split(r"^--- sample \d+:.*\n", out.stdout, flags=re.M)[1:]
    samples = [chunk[:-1] for chunk in chunks]  # each sample ends with one newline
    assert len(samples) == 2
    for text in samples:
        assert len(text) == 24 and text.startswith("ROMEO") and text[11:19] == "the king"
    assert "model calls" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["--prompt=" + "x" * 40], "more than --length"),
    (["--prompt=ROMEO ~ JULIET"], "~"),
    (["--length=999"], "block_size"),
    (["--temperature=-1"], "temperature"),
    (["--sampler=burst_paper", "--order=spread"], "order='random'"),
    (["--temperature=nan"], "temperature"),
    (["--top_k=1000"], "top_k must be an integer in [1, "),
    (["--window=30", "--length=24"], "window must be an integer in [1, 24]"),
    (["--sampler=ar", "--window=4"], "window applies to the burst samplers only"),
    (["--prompt=ab<missing>300000000</missing>", "--length=16"], "more than --length 16"),
    (["--top_p=0"], "top_p"),
    (["--sampler=burst_jacobi", "--draft_support=0"], "draft_support must be an integer >= 1"),
    (["--sampler=burst", "--first_drafts=start"], "first_drafts applies to burst_jacobi only"),
    (["--mesh=2:1:1"], "needs 2 devices, which must divide the 1 available device (on a CPU "
                       "host, ask for 2 with jax_num_cpu_devices"),
])
@pytest.mark.integration
def test_bad_input_exits_2_with_one_line(char_run, args, message):
    """Every flag the samplers reject fails before any work: nothing on stdout (no header)."""
    out = run_module("-m", "launch.sample", f"--workdir={char_run}", *args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert out.stdout == ""


@pytest.mark.integration
def test_missing_checkpoint_exits_2(tmp_path):
    out = run_module("-m", "launch.sample", f"--workdir={tmp_path / 'nothing'}")
    assert out.returncode == 2
    assert "launch.train" in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.integration
def test_step_applies_to_a_workdir_only():
    out = run_module("-m", "launch.sample", "--pretrained=shakespeare_char", "--step=3")
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "drop --step" in lines[0], out.stderr


@pytest.fixture
def two_checkpoints(char_run, tmp_path):
    """A copy of char_run with a second checkpoint, 4, a copy of its checkpoint 2."""
    run = tmp_path / "run"
    shutil.copytree(char_run, run)
    shutil.copytree(run / "checkpoints" / "2", run / "checkpoints" / "4")
    return run


def _corrupt(run, step):
    (run / "checkpoints" / str(step) / "params" / "manifest.ocdbt").write_bytes(b"")


def _assert_one_short_line(text: str):
    assert "\n" not in text and "tensorstore_spec" not in text and len(text) < 600, text


@pytest.mark.integration
def test_unloadable_checkpoints_are_one_line_errors(two_checkpoints, capsys):
    """Each names the workdir and the step with the first line of the cause, cut; nothing else
    is printed."""
    from launch.sample import load_checkpoint

    run = two_checkpoints
    _corrupt(run, 4)
    with pytest.raises(ValueError, match=f"^cannot load checkpoint 4 of {run}: .*--step"):
        load_checkpoint(str(run), 4, None)
    shutil.rmtree(run / "checkpoints" / "2" / "config")
    with pytest.raises(ValueError, match=f"^cannot load checkpoint 2 of {run}: .*config"):
        load_checkpoint(str(run), 2, None)
    _corrupt(run, 2)
    with pytest.raises(ValueError, match=f"^cannot load any checkpoint of {run}: ") as error:
        load_checkpoint(str(run), None, None)
    _assert_one_short_line(str(error.value))
    assert capsys.readouterr().err == ""


@pytest.mark.integration
def test_a_skipped_checkpoint_is_one_warning_line(two_checkpoints):
    """The latest checkpoint is corrupt: the previous one samples, after one warning line (no
    traceback of the abandoned reads)."""
    _corrupt(two_checkpoints, 4)
    out = run_module("-m", "launch.sample", f"--workdir={two_checkpoints}", "--num_samples=1",
                     "--length=8")
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"{two_checkpoints} step 2:" in out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: checkpoint 4 "), out.stderr
    _assert_one_short_line(lines[0])


@pytest.mark.integration
def test_animate_redraws_until_every_position_is_filled(char_run):
    out = run_module("-m", "launch.sample", f"--workdir={char_run}", "--animate", "--window=8",
               "--prompt=ROMEO:", "--length=24", "--sampler=burst_jacobi", "--order=spread")
    assert out.returncode == 0, out.stderr[-2000:]
    frames = re.findall(r"\[iteration (\d+), (\d+)/24 filled\]", out.stdout)
    assert int(frames[0][0]) == 0 and int(frames[0][1]) == 6  # the prompt is known at the start
    assert int(frames[-1][1]) == 24 and len(frames) >= 1 + 18 // 8



JACOBI_CLI = ("--sampler=burst_jacobi", "--window=4", "--order=spread")
PROMPT, LENGTH = "ROMEO<missing>6</missing>the king", 24


def run_jacobi_cli(char_run, *args):
    """launch.sample with burst_jacobi (spread, W = 4) on PROMPT at LENGTH, plus `args`."""
    out = run_module("-m", "launch.sample", f"--workdir={char_run}", *JACOBI_CLI,
                     f"--prompt={PROMPT}", f"--length={LENGTH}", *args)
    assert out.returncode == 0, out.stderr[-2000:]
    return out


def assert_the_librarys_samples(char_run, stdout: str, seed: int, count: int, batch: int):
    """Every printed sample is the library's one-shot sample with its key (`sample_keys`)."""
    import jax

    from launch.prompt import parse_prompt as parse
    from launch.sample import load_run_config, sample_keys
    from sigma_jax import checkpoint
    from sigma_jax.sampling import SampleOptions, sample

    # A sample's text may hold newlines: it runs from its header to the next header (or the end).
    parts = re.split(r"^--- sample (\d+):[^\n]*\n", stdout, flags=re.M)[1:]
    printed = dict(zip(parts[::2], parts[1::2], strict=True))
    cfg, params, _ = checkpoint.load(char_run)
    _, task = load_run_config(char_run)
    tokens, known = parse(PROMPT, task.encode, LENGTH, cfg.block_size)
    options = SampleOptions("burst_jacobi", order="spread", window=4)
    assert sorted(map(int, printed)) == list(range(count))
    for i, key in enumerate(sample_keys(jax.random.key(seed), count, batch)):
        want, _ = sample(cfg, params, key[None], tokens[None], known[None], options)
        text = task.decode(np.asarray(want)[0])
        assert printed[str(i)][:len(text) + 1] == text + "\n"  # printed with its own newline


@pytest.mark.integration
def test_more_samples_than_the_batch_go_through_the_engine(char_run):
    """--num_samples above --batch_size: every sample is the library's one-shot sample with its
    key, printed as its engine slot completes."""
    out = run_jacobi_cli(char_run, "--num_samples=5", "--batch_size=2", "--seed=3")
    assert "engine, 2 slots" in out.stdout
    assert_the_librarys_samples(char_run, out.stdout, seed=3, count=5, batch=2)


@pytest.mark.integration
def test_host_devices_run_one_loop_per_device_with_the_same_samples(char_run):
    """--host_devices=3: the auto mesh holds 3 CPU devices on data, and more samples than the
    batch go through one engine per device that gets a slot (2 of the 3 for 2 slots); every
    sample is the library's one-shot sample with its key. A bad value fails first. (The static
    batches on a data mesh, one loop per device, run through this launcher in
    tests/test_multihost.py.)"""
    out = run_jacobi_cli(char_run, "--num_samples=3", "--batch_size=2", "--seed=5",
                         "--host_devices=3")
    assert "mesh=3:1:1" in out.stdout and "engine, 2 slots" in out.stdout
    assert_the_librarys_samples(char_run, out.stdout, seed=5, count=3, batch=2)

    bad = run_module("-m", "launch.sample", f"--workdir={char_run}", "--host_devices=0")
    assert bad.returncode == 2 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1 and "--host_devices" in bad.stderr


@pytest.mark.integration
def test_a_config_json_that_does_not_fit_the_checkpoint_is_one_line(char_run, tmp_path):
    """config.json names the task whose vocabulary decodes the samples: one that the checkpoint's
    model does not fit (here a seq_len past its block size) is refused, not decoded into garbage."""
    run = tmp_path / "run"
    shutil.copytree(char_run, run)
    configs = json.loads((run / "config.json").read_text())
    configs["train"]["seq_len"] = 10_000
    (run / "config.json").write_text(json.dumps(configs))
    out = run_module("-m", "launch.sample", f"--workdir={run}", "--num_samples=1", "--length=8")
    assert out.returncode == 2 and out.stdout == "", out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "config.json does not match checkpoint 2" in lines[0], out.stderr


@pytest.mark.parametrize("seed, message", [
    (-1, "--seed must be an integer in [0, 9223372036854775807]; got -1"),
    (2**63, "--seed must be an integer in [0, 9223372036854775807]; got 9223372036854775808"),
])
def test_seeds_outside_the_key_range_are_refused(monkeypatch, seed, message):
    """Checked with the other flags (`check_flags`), before any work; 0 and 2^63 - 1 pass."""
    import launch.sample as launch_sample

    defaults = {name: launch_sample.FLAGS[name].default for name in launch_sample.FLAGS}
    for good in (0, 2**63 - 1):
        monkeypatch.setattr(launch_sample, "FLAGS",
                            types.SimpleNamespace(**{**defaults, "workdir": "w", "seed": good}))
        assert launch_sample.check_flags().sampler == "burst"
    monkeypatch.setattr(launch_sample, "FLAGS",
                        types.SimpleNamespace(**{**defaults, "workdir": "w", "seed": seed}))
    with pytest.raises(ValueError) as error:
        launch_sample.check_flags()
    assert str(error.value) == message
