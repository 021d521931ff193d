"""Shipped models: the file format, its integrity check, and the shipped reference model itself."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_helpers import run_module

from sigma_jax import ModelConfig, init_params, log_prob, pretrained

# Scored by the shipped model below: Shakespeare's own words (Sonnet 18), not in tiny-shakespeare.
SONNET = ("Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n"
          "Rough winds do shake the darling buds of May,\nAnd summer's lease hath all too short "
          "a date;\nSometime too hot the eye of heaven shines,\nAnd often is his gold complexion "
          "dimm'd;\nAnd every fair from fair sometime declines,\nBy chance or nature's changing "
          "course untrimm'd")


def _tiny():
    cfg = ModelConfig(vocab_size=4, block_size=8, n_layer=1, n_head=2, n_embd=8)
    return cfg, init_params(cfg, jax.random.key(0))


def test_save_then_read_gives_the_same_model(tmp_path):
    cfg, params = _tiny()
    digest = pretrained.save(tmp_path / "m.msgpack", cfg, params, "abcd")
    cfg2, params2, chars = pretrained.read(tmp_path / "m.msgpack", digest)
    assert cfg2 == cfg and chars == "abcd"
    assert jax.tree.structure(params2) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_an_altered_file_is_refused_before_decoding(tmp_path):
    cfg, params = _tiny()
    path = tmp_path / "m.msgpack"
    digest = pretrained.save(path, cfg, params, "abcd")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt or altered"):
        pretrained.read(path, digest)


def test_bad_files_and_names_are_one_line_errors(tmp_path):
    junk = tmp_path / "junk.msgpack"
    junk.write_bytes(b"not msgpack at all")
    with pytest.raises(ValueError, match="not a sigma_jax weights file"):
        pretrained.read(junk)
    with pytest.raises(FileNotFoundError):
        pretrained.read(tmp_path / "absent.msgpack")
    for name in ("shakespear_char", ["shakespeare_char"], None):
        with pytest.raises(ValueError, match="shipped: shakespeare_char"):
            pretrained.load(name)
    cfg, params = _tiny()
    with pytest.raises(ValueError, match="sorted, distinct"):
        pretrained.save(tmp_path / "m.msgpack", cfg, params, "dcba")


def test_every_shipped_file_matches_its_recorded_sha256():
    for name, entry in pretrained.MODELS.items():
        path = pretrained.WEIGHTS_DIR / entry.file
        assert path.stat().st_size <= 8 << 20, name
        assert pretrained.file_sha256(path) == entry.sha256, name


@pytest.fixture(scope="module")
def shipped():
    return pretrained.load("shakespeare_char")


def test_the_shipped_model_has_the_models_parameters_and_vocabulary(shipped):
    cfg, params, encode, decode = shipped
    fresh = jax.eval_shape(init_params, cfg, jax.random.key(0))
    assert jax.tree.structure(params) == jax.tree.structure(fresh)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(fresh), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
    assert decode(encode(SONNET)) == SONNET and cfg.vocab_size == 65


def test_the_shipped_model_reads_shakespeare_far_below_the_unigram_entropy(shipped):
    """Unseen Shakespeare: random-order NLL per character well under the unigram entropy of
    tiny-shakespeare (3.33 nats), and left to right (easier for such a model) lower still."""
    cfg, params, encode, _ = shipped
    tokens = jnp.asarray(encode(SONNET)[: cfg.block_size])[None]  # [1, N]
    n = tokens.shape[1]
    known = jnp.zeros_like(tokens, bool)
    random_nll = -float(jnp.mean(log_prob(cfg, params, tokens, known, jax.random.key(0),
                                          n_orders=4))) / n
    l2r = jnp.arange(n, dtype=jnp.int32)[None]
    l2r_nll = -float(log_prob(cfg, params, tokens, known, order=l2r)[0, 0]) / n
    assert random_nll < 2.8, random_nll
    assert l2r_nll < random_nll, (l2r_nll, random_nll)


@pytest.mark.integration
def test_sample_cli_infills_from_the_shipped_model_without_data(tmp_path):
    no_data = str(tmp_path / "no_data")
    out = run_module("-m", "launch.sample", "--pretrained=shakespeare_char",
                     "--prompt=ROMEO:<missing>12</missing>JULIET:", "--length=32",
                     "--num_samples=1", "--temperature=0.8", SIGMA_JAX_DATA=no_data)
    assert out.returncode == 0, out.stderr[-2000:]
    text = re.split(r"^--- sample \d+:.*\n", out.stdout, flags=re.M)[1][:-1]
    assert len(text) == 32 and text.startswith("ROMEO:") and text[18:25] == "JULIET:"
    both = run_module("-m", "launch.sample", "--pretrained=shakespeare_char",
                      f"--workdir={tmp_path}", SIGMA_JAX_DATA=no_data)
    assert both.returncode == 2 and len(both.stderr.strip().splitlines()) == 1
