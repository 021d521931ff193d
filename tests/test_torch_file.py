"""The torch checkpoint reader on hand-made files: valid layouts (and unusual but sound
pickles) load to the values written, with memory about that of the parameters; the printable
helpers of its error messages. Files are built opcode by opcode (tests/torch_craft.py); torch
is not needed. The crafted attacks are in tests/test_torch_file_crafted.py."""

import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch_craft as tc
from cli_helpers import ROOT, run_module, subprocess_env

from sigma_jax.convert import from_official, read_official
from sigma_jax.torch_errors import MAX_MESSAGE, printable, short_repr
from sigma_jax.torch_file import load_torch_file


def test_a_hand_made_checkpoint_loads_to_the_values_written(tmp_path):
    tc.write_tiny(tmp_path / "tiny.pt")
    cfg, params = from_official(tmp_path / "tiny.pt")
    _, _, _, values = tc.tiny_model()
    assert (cfg.n_layer, cfg.n_embd, cfg.block_size, cfg.vocab_size) == (1, 4, 2, 3)
    assert cfg.tie_embeddings
    np.testing.assert_array_equal(params["wte"]["embedding"], values["transformer.wte.weight"])
    np.testing.assert_array_equal(params["pos"]["wpe"], values["transformer.wpe.weight"])
    np.testing.assert_array_equal(params["h"]["mlp"]["c_fc"]["kernel"][0],
                                  values["transformer.h.0.mlp.c_fc.weight"].T)
    assert read_official(tmp_path / "tiny.pt").iter_num == 5


def test_strided_views_read_the_elements_they_address(tmp_path):
    # one storage of 24 floats 0..23; views: transposed, sliced with gaps, offset, big-endian
    storage = np.arange(24, dtype=np.float32)
    full = storage.reshape(4, 6)
    views = {
        "transposed": (tc.Tensor("0", 24, (6, 4), (1, 6)), full.T),
        "every other column": (tc.Tensor("0", 24, (4, 3), (6, 2)), full[:, ::2]),
        "offset row": (tc.Tensor("0", 24, (5,), (1,), offset=19), storage[19:24]),
        "permuted 3-d": (tc.Tensor("0", 24, (3, 2, 4), (2, 1, 6)),
                         storage.reshape(4, 3, 2).transpose(1, 2, 0)),
        "empty": (tc.Tensor("0", 24, (0, 5), (5, 1 << 61), offset=24),
                  np.zeros((0, 5), np.float32)),
        "scalar": (tc.Tensor("0", 24, (), (), offset=7), np.float32(7)),
        "size-1 dim, huge stride": (tc.Tensor("0", 24, (1, 4), (1 << 61, 1)), storage[None, :4]),
    }
    value = {name: tensor for name, (tensor, _) in views.items()}
    for order, raw in (("little", storage.astype("<f4")), ("big", storage.astype(">f4"))):
        path = tmp_path / f"{order}.pt"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("ckpt/data.pkl", tc.pickle_of(value))
            z.writestr("ckpt/byteorder", order)
            z.writestr("ckpt/data/0", raw.tobytes())
        loaded = load_torch_file(path)
        for name, (_, want) in views.items():
            got = loaded[name].numpy()
            assert got.shape == want.shape and got.dtype == np.float32, name
            np.testing.assert_array_equal(got, want, err_msg=f"{order}: {name}")


def test_short_repr_and_printable_are_bounded_and_escape_controls():
    shared = [0] * 100
    for _ in range(40):  # 100^40 leaves if expanded
        shared = [shared] * 100
    text = short_repr(shared, 50)
    assert text.startswith("[[[[") and text.endswith("...") and len(text) <= 53
    cycle = []
    cycle.append(cycle)
    assert short_repr(cycle, 20).startswith("[[[[[")
    assert short_repr(1 << 4000) == "<int of 4001 bits>"
    text = short_repr("a\x1bb" * 100, 10)
    assert text.startswith("'a\\x1bb") and text.endswith("...") and text.isprintable()
    assert "\x1b" not in short_repr({"k\x1b": tc.ESC})
    assert printable("x\ny\u202e") == "x\\x0ay\\u202e"
    assert printable(printable("\x1b" * 1000)) == printable("\x1b" * 1000)
    assert len(printable("\x1b" * 1000)) == MAX_MESSAGE


def test_unusual_but_sound_pickles_load(tmp_path):
    # a step number up to 2^62, a memo index of 2^32 - 1 (a dict memo, not an array of that size)
    tc.write_tiny(tmp_path / "late.pt", iter_num=1 << 40)
    assert read_official(tmp_path / "late.pt").iter_num == 1 << 40
    memo = tc.Raw(b"K\x07r\xff\xff\xff\xff0j\xff\xff\xff\xff")  # put, pop, get
    tc.write_tiny(tmp_path / "memo.pt", iter_num=memo)
    assert read_official(tmp_path / "memo.pt").iter_num == 7


_LOAD_CHILD = """
import json, resource, sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, "tests")
import torch_craft as tc
from sigma_jax.convert import convert_state_dict, from_official
jnp.zeros(1).block_until_ready()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cfg, params = from_official(sys.argv[1])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
args, _, _, values = tc.tiny_model(json.loads(sys.argv[2]))
same = all(np.array_equal(params["h"]["mlp"]["c_fc"]["kernel"][i],
                          values[f"transformer.h.{i}.mlp.c_fc.weight"].T)
           for i in range(cfg.n_layer))
want = convert_state_dict(args, values)[1]
same &= jax.tree.all(jax.tree.map(np.array_equal, params, want))
print(json.dumps({"base_kib": base, "peak_kib": peak, "same": bool(same),
                  "param_bytes": sum(x.nbytes for x in jax.tree.leaves(params))}))
"""


@pytest.mark.integration
def test_a_valid_checkpoint_needs_about_the_memory_of_its_parameters(tmp_path):
    # 44 MiB of float32 weights; the child's peak after its imports may grow by 1.25x + 32 MiB
    args = dict(tc.TINY_ARGS, n_layer=6, n_embd=384, block_size=64, vocab_size=2000)
    tc.write_tiny(tmp_path / "big.pt", model_args=args)
    out = subprocess.run([sys.executable, "-c", _LOAD_CHILD, str(tmp_path / "big.pt"),
                          json.dumps(args)], cwd=ROOT, env=subprocess_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["same"] and report["param_bytes"] > 40 << 20, report
    growth = (report["peak_kib"] - report["base_kib"]) << 10
    assert growth <= 1.25 * report["param_bytes"] + (32 << 20), report


@pytest.mark.integration
def test_a_step_beyond_int32_is_refused_by_the_launcher(tmp_path):
    tc.write_tiny(tmp_path / "late.pt", iter_num=1 << 40)
    workdir = tmp_path / "run"
    out = run_module("-m", "launch.convert", f"--official={tmp_path / 'late.pt'}",
                     f"--workdir={workdir}", "--task=shakespeare_char")
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "iter_num" in lines[0], lines
    assert not workdir.exists()
