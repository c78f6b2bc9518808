"""LASA against its float64 oracle (tests/reference/lasa_oracle.py), on a 3-tensor layout
(a weight matrix, a bias, a second weight matrix) plus BatchNorm-like statistics.

Tolerance: float32 clipping and means of O(0.1) updates over ≤ 10 clients: ~1e-7; ATOL 1e-5.
The top-k selections and per-layer filters must agree exactly (a mismatch moves a whole
coordinate by O(0.1), far above ATOL).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmc_jax.aggregators import get_aggregator
from spmc_jax.flat import LeafInfo
from tests.reference import lasa_oracle

from .conftest import make_ctx, make_env

# (start, stop, shape): kernel 4x5, bias 5, kernel 5x3; statistics 40..48.
TENSORS = [(0, 20, (4, 5)), (20, 25, (5,)), (25, 40, (5, 3))]
D = 48
ATOL = 1e-5


def _env(n):
    mask = np.arange(D) < 40
    layout = tuple(LeafInfo(f"t{j}", a, b, s, True) for j, (a, b, s) in enumerate(TENSORS))
    layout += (LeafInfo("stats", 40, D, (8,), False),)
    return dataclasses.replace(make_env(n, D, param_mask=mask), layout=layout)


@pytest.mark.parametrize(("n", "sparsity"), [(10, 0.3)])
def test_lasa_matches_oracle(n, sparsity):
    rng = np.random.default_rng(n)
    g = rng.normal(size=D).astype(np.float32)
    delta = 0.1 * rng.normal(size=(n, D)) + 0.05  # benign: mostly positive
    delta[-1, :40] = -np.abs(delta[-1, :40])  # all parameters negative
    delta[-2, 25:40] *= 6.0  # oversized last layer
    w = (g + delta).astype(np.float32)
    valid = np.ones(n, bool)
    valid[0] = False
    w[0] = g
    ctx = make_ctx(g, n, valid=valid)
    agg = get_aggregator("lasa", _env(n), sparsity=sparsity)
    out, _, info = jax.jit(agg.aggregate)(jnp.asarray(w), (), ctx)
    layers = [(a, b, len(s) >= 2) for a, b, s in TENSORS]
    exp, share = lasa_oracle.lasa(g, w, layers, valid, sparsity)
    np.testing.assert_allclose(np.asarray(out), exp, atol=ATOL)
    np.testing.assert_allclose(np.asarray(info.client_weights), share, atol=ATOL)
    assert share[0] == 0.0
    # The filters fired: the sign-flipped client is dropped everywhere, the oversized one
    # from some layers.
    assert share[-1] == 0.0 and share[-2] < np.median(share[valid])


@pytest.mark.parametrize(
    ("opts", "match"),
    [({"sparsity": 1.0}, "sparsity=1.0"), ({"norm_bound": 0.0}, "norm_bound=0.0")],
)
def test_lasa_rejects_bad_options(opts, match):
    with pytest.raises(ValueError, match=match):
        get_aggregator("lasa", _env(10), **opts)
