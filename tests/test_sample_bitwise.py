"""The samplers draw exactly the recorded tokens: every sampler along every order it takes, on
the shipped model at N = 64 with scattered known tokens, against `fixtures/samples/shipped_n64.npz`
(written by `fixtures/samples/make_samples.py` at an earlier commit). A change that alters any
draw, its key stream or its arithmetic fails here."""

import sys
from pathlib import Path

import jax
import numpy as np
import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "samples"
sys.path.insert(0, str(FIXTURES))
import make_samples  # noqa: E402

from sigma_jax import pretrained  # noqa: E402


@pytest.fixture(scope="module")
def shipped():
    cfg, params, _, _ = pretrained.load("shakespeare_char")
    return cfg, params


def test_the_fixture_covers_every_case():
    want = np.load(FIXTURES / "shipped_n64.npz")
    assert sorted(case for case, _, _ in make_samples.cases()) == sorted(want.files)


@pytest.mark.parametrize("sampler", [name for name, _, _ in make_samples.SAMPLERS])
@pytest.mark.integration
def test_every_sampler_draws_the_recorded_tokens(shipped, sampler):
    cfg, params = shipped
    want = np.load(FIXTURES / "shipped_n64.npz")
    tokens, known = make_samples.inputs(cfg)
    for case, fn, options in make_samples.cases():
        if case.split("/")[0] != sampler:
            continue
        got = np.asarray(fn(cfg, params, jax.random.key(7), tokens, known, **options)[0])
        np.testing.assert_array_equal(got[known], tokens[known], err_msg=case)
        np.testing.assert_array_equal(got, want[case], err_msg=case)
