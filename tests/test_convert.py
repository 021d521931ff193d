"""Published σ-GPT PyTorch checkpoints: read without torch, same weights, same logits, sampled.

The fixtures (tests/fixtures/official/README.md says how they were made) are checkpoints written
by the published PyTorch code's own train.py, and the logits and mean loss its own forward pass
computed on validation rows read in random orders. Nothing here imports torch.
"""

import dataclasses
import io
import json
import os
import pickle
import re
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch_craft as tc
from cli_helpers import run_module

from sigma_jax import checkpoint, torch_file
from sigma_jax.convert import (
    COMPILED_PREFIX,
    CheckpointError,
    convert_state_dict,
    from_official,
    load_torch_file,
    read_official,
)
from sigma_jax.model import forward, init_params
from sigma_jax.train import loss_fn

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "official"
MODELS = ("nobias", "bias")  # bias: trained with torch.compile, so its keys carry _orig_mod.


def _published(name):
    data = np.load(FIXTURES / f"{name}_logits.npz")
    return {k: data[k] for k in data.files}


@pytest.fixture(scope="module", params=MODELS)
def converted(request):
    cfg, params = from_official(FIXTURES / f"{request.param}.pt")
    return request.param, cfg, params


def test_the_config_is_the_published_text_model(converted):
    name, cfg, _ = converted
    assert (cfg.pos_encoding, cfg.bos, cfg.tie_embeddings, cfg.bias) == (
        "learned", False, True, name == "bias")
    assert cfg.vocab_size == 65 and cfg.n_layer == 2 and cfg.n_head == 2


def test_params_have_the_tree_shapes_and_dtypes_of_init_params(converted):
    _, cfg, params = converted
    expected = jax.eval_shape(init_params, cfg, jax.random.key(0))
    assert jax.tree.structure(params) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected), strict=True):
        assert (got.shape, got.dtype) == (want.shape, want.dtype)
    # one learned table of width n_embd / 2, one row per position, no start row
    assert params["pos"]["wpe"].shape == (cfg.block_size, cfg.n_embd // 2)


def test_logits_match_the_published_forward(converted):
    name, cfg, params = converted
    ref = _published(name)
    rows, order = jnp.asarray(ref["rows"]), jnp.asarray(ref["order"])  # [B, N]
    tokens = jnp.take_along_axis(rows, order, axis=1)[:, :-1]  # slot t holds x[order[t]]
    logits = forward(cfg, params, tokens, order[:, :-1], order[:, 1:])  # [B, N-1, V]
    assert logits.shape == ref["logits"].shape
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], rtol=0, atol=1e-5)


def test_mean_loss_matches_the_published_loss(converted):
    name, cfg, params = converted
    ref = _published(name)
    loss = loss_fn(cfg, params, jnp.asarray(ref["rows"]), jnp.asarray(ref["order"]))
    assert abs(float(loss) - float(ref["loss"])) < 1e-6


def test_with_and_without_the_compiled_prefix_the_params_are_the_same():
    ckpt = load_torch_file(FIXTURES / "nobias.pt")
    assert not any(k.startswith(COMPILED_PREFIX) for k in ckpt["model"])
    prefixed = {COMPILED_PREFIX + k: v for k, v in ckpt["model"].items()}
    cfg, params = from_official(FIXTURES / "nobias.pt")
    cfg2, params2 = convert_state_dict(ckpt["model_args"], prefixed)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    # and the other way round: the compiled run's file, its keys stripped by hand
    compiled = load_torch_file(FIXTURES / "bias.pt")
    assert all(k.startswith(COMPILED_PREFIX) for k in compiled["model"])
    stripped = {k.removeprefix(COMPILED_PREFIX): v for k, v in compiled["model"].items()}
    jax.tree.map(np.testing.assert_array_equal, convert_state_dict(compiled["model_args"],
                                                                   stripped)[1],
                 from_official(FIXTURES / "bias.pt")[1])


def test_a_missing_unexpected_or_doubled_entry_is_named():
    ckpt = load_torch_file(FIXTURES / "bias.pt")  # keys with the _orig_mod. prefix
    args, weights = ckpt["model_args"], ckpt["model"]
    lost = "transformer.h.1.mlp.c_fc.bias"
    dropped = {k: v for k, v in weights.items() if k != COMPILED_PREFIX + lost}
    per_layer = "(model_args: bias=True, n_layer=2: 12 entries per layer)"
    with pytest.raises(CheckpointError, match=f"^the state dict lacks {re.escape(lost)} "
                                              f"{re.escape(per_layer)}$"):
        convert_state_dict(args, dropped)
    stray = "transformer.h.9.mlp.c_fc.bias"
    with pytest.raises(CheckpointError, match=re.escape(
            f"lacks {lost}, and has {stray!r}, which the model has no place for")):
        convert_state_dict(args, {**dropped, stray: weights[COMPILED_PREFIX + lost]})
    with pytest.raises(CheckpointError, match=re.escape(
            f"the state dict holds {lost!r} both with and without the _orig_mod. prefix")):
        convert_state_dict(args, {**weights, lost: weights[COMPILED_PREFIX + lost]})


def test_numpy_scalars_in_model_args_count_as_their_python_values():
    ckpt = load_torch_file(FIXTURES / "bias.pt")
    args, weights = ckpt["model_args"], ckpt["model"]
    numpy_args = {**args, "n_layer": np.int64(2), "n_embd": np.int32(args["n_embd"]),
                  "bias": np.bool_(True), "dropout": np.float64(args["dropout"])}
    cfg, params = convert_state_dict(numpy_args, weights)
    expected_cfg, expected = convert_state_dict(args, weights)
    assert cfg == expected_cfg and type(cfg.n_layer) is int and type(cfg.bias) is bool
    jax.tree.map(np.testing.assert_array_equal, params, expected)
    for name, value, message in [
        ("n_layer", np.float64(2.0), "n_layer is np.float64(2.0), not an integer in [1, 2^31)"),
        ("n_layer", 2.0, "n_layer is 2.0, not an integer in [1, 2^31)"),
        ("n_layer", "2", "n_layer is '2', not an integer in [1, 2^31)"),
        ("n_layer", np.bool_(True), "n_layer is np.True_, not an integer in [1, 2^31)"),
        ("n_layer", np.int64(0), "n_layer is np.int64(0), not an integer in [1, 2^31)"),
        ("bias", np.int64(1), "bias is np.int64(1), not a bool"),
        ("dropout", "0.1", "dropout is '0.1', not a number"),
    ]:
        with pytest.raises(CheckpointError) as error:
            convert_state_dict({**args, name: value}, weights)
        assert str(error.value) == f"model_args {message}"


def test_reader_keeps_the_rest_of_the_checkpoint_plain():
    ckpt = load_torch_file(FIXTURES / "nobias.pt")
    assert ckpt["iter_num"] == read_official(FIXTURES / "nobias.pt").iter_num > 0
    assert ckpt["config"]["dataset"] == "shakespeare_char"
    group = ckpt["optimizer"]["param_groups"][0]
    assert isinstance(group["betas"], tuple) and isinstance(group["params"], list)
    assert ckpt["best_val_loss"].numpy().shape == ()


def _unsafe_archive(path: Path, marker: Path) -> None:
    """A zip laid out like a torch checkpoint whose pickle calls os.system when loaded."""

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("ckpt/data.pkl", pickle.dumps({"model": Exploit()}, protocol=2))
        z.writestr("ckpt/version", "3\n")


def test_restricted_reader_refuses_any_other_global(tmp_path):
    marker = tmp_path / "ran"
    _unsafe_archive(tmp_path / "evil.pt", marker)
    with pytest.raises(CheckpointError, match=r"refused to load (posix|os|nt)\.system"):
        load_torch_file(tmp_path / "evil.pt")
    assert not marker.exists()
    # torch.save(model) of the published model class: a module, not tensors
    with pytest.raises(CheckpointError, match="refused to load"):
        load_torch_file(FIXTURES / "module.pt")


def test_tensor_views_outside_their_storage_are_refused(tmp_path):
    # a storage of 4 floats, and a tensor record claiming 3 x 3 of it
    storage = torch_file._Storage("x", "ckpt/data/0", np.dtype(np.float32), 4, False)
    with pytest.raises(CheckpointError, match="past the end"):
        torch_file._rebuild_tensor(storage, 0, (3, 3), (3, 1))
    with pytest.raises(CheckpointError, match="negative"):
        torch_file._rebuild_tensor(storage, 0, (2,), (-1,))


# ---------------------------------------------------------------- the launcher


@pytest.fixture(scope="module")
def converted_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("converted") / "run"
    workdir.mkdir()  # an empty workdir is taken
    out = run_module("-m", "launch.convert", f"--official={FIXTURES / 'nobias.pt'}",
               f"--workdir={workdir}")
    assert out.returncode == 0, out.stderr[-2000:]
    return workdir


@pytest.mark.integration
def test_convert_writes_a_run_that_checkpoint_load_takes(converted_run):
    configs = json.loads((converted_run / "config.json").read_text())
    assert configs["train"]["task"] == "shakespeare_char"
    assert configs["task"]["vocab_size"] == 65
    cfg, params, step = checkpoint.load(converted_run)
    want_cfg, want_params = from_official(FIXTURES / "nobias.pt")
    assert cfg == want_cfg
    assert step == read_official(FIXTURES / "nobias.pt").iter_num
    jax.tree.map(np.testing.assert_array_equal, params, want_params)
    assert not [p for p in converted_run.parent.iterdir() if p.name != "run"]  # no temp left


@pytest.mark.integration
def test_sample_from_the_converted_run(converted_run):
    out = run_module("-m", "launch.sample", f"--workdir={converted_run}", "--sampler=burst",
               "--prompt=ROMEO:<missing>8</missing>the", "--length=24", "--num_samples=2")
    assert out.returncode == 0, out.stderr[-2000:]
    samples = [chunk[:-1] for chunk in re.split(r"^--- sample \d+:.*\n", out.stdout,
                                                   flags=re.M)[1:]]
    assert len(samples) == 2
    for text in samples:
        assert len(text) == 24 and text.startswith("ROMEO:") and text[14:17] == "the"


def _bad_inputs(tmp: Path) -> dict:
    (tmp / "notes.txt").write_text("not a checkpoint\n")
    _unsafe_archive(tmp / "evil.pt", tmp / "ran")
    data = (FIXTURES / "nobias.pt").read_bytes()
    (tmp / "truncated.pt").write_bytes(data[: len(data) // 2])
    return {
        "text file": (tmp / "notes.txt", "not a PyTorch checkpoint"),
        "unsafe pickle": (tmp / "evil.pt", "refused to load"),
        "whole module": (FIXTURES / "module.pt", "refused to load"),
        "bare state dict": (FIXTURES / "state_dict.pt", "not a published"),
        "odd width": (FIXTURES / "width6.pt", "n_embd"),
        "truncated": (tmp / "truncated.pt", "truncated"),
        "unknown vocabulary": (FIXTURES / "vocab7.pt", "matches no known task"),
        "missing file": (tmp / "absent.pt", "no checkpoint file"),
    }


@pytest.mark.parametrize("case", ["text file", "unsafe pickle", "whole module", "bare state dict",
                                  "odd width", "truncated", "unknown vocabulary",
                                  "missing file"])
@pytest.mark.integration
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, case):
    path, message = _bad_inputs(tmp_path)[case]
    workdir = tmp_path / "run"
    out = run_module("-m", "launch.convert", f"--official={path}", f"--workdir={workdir}")
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines
    assert not workdir.exists()
    assert not (tmp_path / "ran").exists()
    assert not list(tmp_path.glob(".run.tmp*"))  # no temporary run directory left behind


@pytest.mark.integration
def test_a_non_empty_workdir_is_refused(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    out = run_module("-m", "launch.convert", f"--official={FIXTURES / 'nobias.pt'}",
               f"--workdir={tmp_path}")
    assert out.returncode == 2 and "not an empty directory" in out.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_an_unusable_workdir_is_refused_before_any_work(tmp_path):
    from launch.convert import check_workdir

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match=f"afile/sub cannot be created: {afile} is not a dir"):
        check_workdir(afile / "sub")
    with pytest.raises(ValueError, match="afile exists and is not an empty directory"):
        check_workdir(afile)
    check_workdir(tmp_path / "new" / "run")  # absent, under a writable directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_the_pre_zip_format_needs_torch():
    # legacy.pt: vocab7.pt re-saved by torch.save(_use_new_zipfile_serialization=False)
    try:
        import torch  # noqa: F401
    except ImportError:
        with pytest.raises(CheckpointError, match="pre-zip format"):
            load_torch_file(FIXTURES / "legacy.pt")
    else:
        new, old = read_official(FIXTURES / "vocab7.pt"), read_official(FIXTURES / "legacy.pt")
        assert (old.model_cfg, old.iter_num) == (new.model_cfg, new.iter_num)
        jax.tree.map(np.testing.assert_array_equal, old.params, new.params)


def test_pickle_errors_are_checkpoint_errors(tmp_path):
    # a well-formed archive whose pickle stops half-way
    buffer = io.BytesIO()
    pickle.dump({"model_args": {"n_layer": 1}}, buffer, protocol=2)
    with zipfile.ZipFile(tmp_path / "cut.pt", "w") as z:
        z.writestr("ckpt/data.pkl", buffer.getvalue()[:-5])
    with pytest.raises(CheckpointError, match="damaged"):
        load_torch_file(tmp_path / "cut.pt")


# ---------------------------------------------------------------- reading into place


@pytest.mark.parametrize("storage, dtype", [("HalfStorage", "<f2"), ("FloatStorage", "<f4"),
                                            ("DoubleStorage", "<f8")])
def test_a_head_stored_apart_is_tied_exactly_when_it_equals_the_embedding(tmp_path, storage,
                                                                          dtype):
    _, tensors, storages, _ = tc.tiny_model()
    tensors = {name: dataclasses.replace(t, storage=storage) for name, t in tensors.items()}
    storages = {k: np.frombuffer(v, "<f4").astype(dtype).tobytes() for k, v in storages.items()}
    wte = tensors["transformer.wte.weight"]
    tensors["lm_head.weight"] = dataclasses.replace(wte, key="head")
    for nudged in (False, True):  # the last element one step up: still equal as float32 in f8
        head = np.frombuffer(storages[wte.key], dtype).copy()
        head[-1] = np.nextafter(head[-1], np.inf) if nudged else head[-1]
        tc.write_tiny(tmp_path / "m.pt", state_dict=tensors,
                      storages=dict(storages, head=head.tobytes()))
        cfg, params = from_official(tmp_path / "m.pt")
        assert cfg.tie_embeddings is not nudged
        if nudged:
            np.testing.assert_array_equal(params["lm_head"]["kernel"],
                                          head.astype(np.float32).reshape(wte.shape).T)


@pytest.mark.parametrize("dtype", ["<f4", ">f4", "<f2", ">f8", "bfloat16"])
def test_a_whole_storage_streams_into_a_strided_slot_crc_checked(tmp_path, dtype):
    # 600 x 1000 elements: a few MAX_READ chunks; written into a transposed float32 slot
    storage = {"<f4": "FloatStorage", ">f4": "FloatStorage", "<f2": "HalfStorage",
               ">f8": "DoubleStorage", "bfloat16": "BFloat16Storage"}[dtype]
    dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    values = np.random.default_rng(0).standard_normal((600, 1000)).astype(dtype)
    tensor = tc.Tensor("0", values.size, values.shape, (1000, 1), storage=storage)
    with zipfile.ZipFile(tmp_path / "good.pt", "w") as z:
        z.writestr("ckpt/data.pkl", tc.pickle_of({"w": tensor}))
        z.writestr("ckpt/byteorder", "big" if dtype.byteorder == ">" else "little")
        z.writestr("ckpt/data/0", values.tobytes())
    data = bytearray((tmp_path / "good.pt").read_bytes())
    data[data.index(values.tobytes()) + values.nbytes - 7] ^= 1  # in the last chunk: bad CRC
    (tmp_path / "flipped.pt").write_bytes(data)
    lazy = load_torch_file(tmp_path / "good.pt")["w"]
    slot = np.empty((1000, 600), np.float32).T
    torch_file.read_into([lazy], [slot])
    np.testing.assert_array_equal(slot, values.astype(np.float32))
    assert lazy.numpy().dtype == dtype.newbyteorder("=")
    np.testing.assert_array_equal(lazy.numpy(), values)
    with pytest.raises(CheckpointError, match="damaged"):
        load_torch_file(tmp_path / "flipped.pt")["w"].numpy()
