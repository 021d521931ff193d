"""The samplers draw exactly the recorded tokens: every sampler along every order it takes, on
the shipped model at N = 64 with scattered known tokens, against `fixtures/samples/shipped_n64.npz`
(written by `fixtures/samples/make_samples.py`). A change that alters any draw, its key stream or
its arithmetic fails here."""

import sys
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "samples"
sys.path.insert(0, str(FIXTURES))
import make_samples  # noqa: E402

from sigma_jax import pretrained  # noqa: E402


@pytest.mark.integration
def test_every_sampler_draws_the_recorded_tokens():
    cfg, params, _, _ = pretrained.load("shakespeare_char")
    want = np.load(FIXTURES / "shipped_n64.npz")
    got = make_samples.sample_all(cfg, params)
    assert sorted(got) == sorted(want.files)
    tokens, known = make_samples.inputs(cfg)
    for case in want.files:
        np.testing.assert_array_equal(got[case][known], tokens[known], err_msg=case)
        np.testing.assert_array_equal(got[case], want[case], err_msg=case)
