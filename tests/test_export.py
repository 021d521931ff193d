"""Portable engine artifacts: written by `sampling.export.export`, run in a subprocess that
imports only jax and numpy, they serve requests with bitwise the tokens of the library; the
same functions export for cuda and tpu from this CPU-only machine; the manifest records every
sampler option; bad arguments fail with one line before anything is written."""

import dataclasses
import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_helpers import subprocess_env
from sampler_helpers import SMALL, peaked_params

from sigma_jax.sampling import Request, SampleOptions, serve
from sigma_jax.sampling.export import FUNCTIONS, export, manifest_options

N = 10

# The loader a user would write: jax and numpy only. argv: artifact directory, requests .npz.
LOADER = r'''
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax import export

directory, requests_path = sys.argv[1], sys.argv[2]
manifest = json.load(open(f"{directory}/manifest.json"))
fn = {name: export.deserialize(bytearray(open(f"{directory}/{file}", "rb").read()))
      for name, file in manifest["files"].items()}
npz = np.load(f"{directory}/params.npz")
params = [jnp.asarray(npz[f"p{i}"]) for i in range(len(manifest["params"]))]
req = np.load(requests_path)
queue = list(range(len(req["lengths"])))
slots = [None] * manifest["slots"]
state = fn["init"].call()
out = {}
while queue or any(s is not None for s in slots):
    for s in range(len(slots)):
        if slots[s] is None and queue:
            i = queue.pop(0)
            state = fn["insert"].call(params, state, np.int32(s), req["tokens"][i],
                                      req["known"][i], np.int32(req["lengths"][i]), req["keys"][i])
            slots[s] = i
    state = fn["step"].call(params, state)
    done = np.asarray(fn["finished"].call(state))
    for s in np.flatnonzero(done):
        tokens = fn["result"].call(state, np.int32(s))[0]
        out[f"r{slots[s]}"] = np.asarray(tokens)
        slots[s] = None
assert "sigma_jax" not in sys.modules, "the loader must not import sigma_jax"
np.savez(sys.argv[3], **out)
'''


@pytest.mark.integration
def test_artifacts_serve_bitwise_without_the_library(tmp_path):
    params = peaked_params(SMALL, 4)
    options = SampleOptions("burst_jacobi", order="spread", window=3)
    manifest = export(SMALL, params, options, 2, N, tmp_path / "art")
    assert manifest["state"] and json.loads((tmp_path / "art/manifest.json").read_text())
    assert SampleOptions(**manifest["options"]) == options
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, N + 1, 5).astype(np.int32)
    tokens = rng.integers(0, SMALL.vocab_size, (5, N)).astype(np.int32)
    known = (rng.random((5, N)) < 0.3) & (np.arange(N)[None] < lengths[:, None])
    seeds = np.arange(5) + 50
    keys = np.stack([np.asarray(jax.random.key_data(jax.random.key(s))) for s in seeds])
    np.savez(tmp_path / "requests.npz", lengths=lengths, tokens=tokens, known=known, keys=keys)
    (tmp_path / "loader.py").write_text(LOADER)
    proc = subprocess.run([sys.executable, str(tmp_path / "loader.py"), str(tmp_path / "art"),
                           str(tmp_path / "requests.npz"), str(tmp_path / "out.npz")],
                          env=subprocess_env(), capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    requests = [Request(tokens[i, :lengths[i]], known[i, :lengths[i]], jax.random.key(seeds[i]))
                for i in range(5)]
    for result in serve(SMALL, params, requests, slots=2, options=options, capacity=N):
        np.testing.assert_array_equal(got[f"r{result.index}"][:lengths[result.index]],
                                      result.tokens)


@pytest.mark.integration
def test_the_engine_exports_for_accelerators_from_a_cpu_host(tmp_path):
    shapes = jax.eval_shape(lambda: peaked_params(SMALL, 0))
    for options in (SampleOptions("ar"), SampleOptions("burst", window=4),
                    SampleOptions("burst_jacobi", order="spread", draft_support=8,
                                  first_drafts="start")):
        manifest = export(SMALL, shapes, options, np.int64(4), N, tmp_path / options.sampler,
                          platforms=("cuda", "tpu"))
        assert manifest["platforms"] == ["cuda", "tpu"] and manifest["slots"] == 4
        written = json.loads((tmp_path / options.sampler / "manifest.json").read_text())
        assert SampleOptions(**written["options"]) == options
        for name in FUNCTIONS:
            exported = jax.export.deserialize(bytearray(
                (tmp_path / options.sampler / f"{name}.bin").read_bytes()))
            assert exported.platforms == ("cuda", "tpu")
        assert not (tmp_path / options.sampler / "params.npz").exists()


def test_the_manifest_records_every_option_the_artifacts_sample_with():
    """Every field of SampleOptions, each set away from its default by one of these, is in
    the manifest's options, and they read back from its JSON as the options exported."""
    names = [field.name for field in dataclasses.fields(SampleOptions)]
    for options in (SampleOptions("burst_jacobi", order="spread", window=3, top_k=5,
                                  draft_support=7, first_drafts="start",
                                  temperature=np.float32(0.7), top_p=0.9, max_iters=np.int64(4)),
                    SampleOptions("burst_paper", n_orders=2, known_order="ascending"),
                    SampleOptions("ar", order="fractal", temperature=0)):
        entry = json.loads(json.dumps(manifest_options(options)))
        assert list(entry) == names
        assert SampleOptions(**entry) == options


def test_bad_arguments_fail_with_one_line_before_anything_is_written(tmp_path):
    shapes = jax.eval_shape(lambda: peaked_params(SMALL, 0))
    vector = lambda n: jax.ShapeDtypeStruct((n,), jnp.float32)
    wrong_tree = dict(shapes, wte=jax.ShapeDtypeStruct((12, 16), jnp.float32))
    wrong_shape = dict(shapes, ln_f=dict(shapes["ln_f"], scale=vector(8)))
    extra = dict(shapes, extra=vector(3))
    hint = "platforms must be a non-empty tuple of platform names such as ('cpu',) or ('cuda', " \
           "'tpu'); got "
    for bad, message in [
            (dict(platforms="cpu"), hint + "'cpu'"),
            (dict(platforms=()), hint + "()"),
            (dict(platforms=("gpu",)), "platforms[0] must name the GPU platform, 'cuda' "
                                       "(NVIDIA) or 'rocm' (AMD), not 'gpu'"),
            (dict(platforms=("cpu", "metal")), "platforms[1] must be one of 'cpu', 'cuda', "
                                               "'rocm', 'tpu'; got 'metal'"),
            (dict(platforms=("cpu", "cpu")), "platforms must name each platform once; got "
                                             "('cpu', 'cpu')"),
            (dict(iterations=0), "iterations must be an integer >= 1; got 0"),
            (dict(slots=0), "slots must be an integer >= 1; got 0"),
            (dict(capacity=SMALL.block_size + 1), "capacity must be an integer in [1, 10]; got 11"),
            (dict(options=None), "options must be a sigma_jax.SampleOptions, e.g. "
                                 "SampleOptions('burst_jacobi'); got None"),
            (dict(params=wrong_tree), "params lack 'wte/embedding', which this ModelConfig "
                                      "needs: params and cfg are of different models"),
            (dict(params=wrong_shape), "params 'ln_f/scale' has shape (8,), but this ModelConfig "
                                       "needs (16,): params and cfg are of different models"),
            (dict(params=extra), "params hold 'extra', which this ModelConfig has no use for: "
                                 "params and cfg are of different models")]:
        kwargs = dict(params=shapes, options=SampleOptions("burst"), slots=2, capacity=N) | bad
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            export(SMALL, directory=tmp_path / "art", **kwargs)
        assert not (tmp_path / "art").exists()
    (tmp_path / "file").write_text("kept")
    with pytest.raises(ValueError, match="artifacts to .*file: it is a file; pass a directory$"):
        export(SMALL, shapes, SampleOptions("burst"), 2, N, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "kept"
