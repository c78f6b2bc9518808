"""SignGuard and its MeanShift against scikit-learn / float64 oracles.

MeanShift (`_meanshift.mean_shift`) must reproduce sklearn.cluster.MeanShift (all points as
seeds) exactly in its partition and to 1e-5 in its centres and bandwidth (float32 means of
O(1) features vs float64). SignGuard is compared with tests/reference/signguard_oracle.py
(sklearn's MeanShift inside) given the same sampled coordinates; ATOL 1e-5 (float32 sums
of ≤ 12 O(0.1) updates); the selected set must match exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.cluster import MeanShift, estimate_bandwidth

from spmc_jax.aggregators import get_aggregator
from spmc_jax.aggregators._meanshift import mean_shift
from tests.reference import signguard_oracle

from .conftest import make_ctx, make_env

D = 64
ATOL = 1e-5
N_POINTS = 24  # one shape: each (quantile, cluster_all) compiles once

_mean_shift = jax.jit(mean_shift, static_argnames=("quantile", "cluster_all"))


def _compact(result):
    kept = np.flatnonzero(np.asarray(result.kept))
    lab = np.asarray(result.labels)
    return np.array([-1 if v < 0 else int(np.searchsorted(kept, v)) for v in lab]), kept


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("quantile", "cluster_all"), [(0.3, True), (0.5, False)])
def test_mean_shift_matches_sklearn(seed, quantile, cluster_all):
    rng = np.random.default_rng(seed)
    n, k = N_POINTS, seed % 3 + 1
    x = rng.normal(size=(k, 3))[rng.integers(0, k, n)] * 2 + 0.3 * rng.normal(size=(n, 3))
    x = x.astype(np.float32)
    bw = estimate_bandwidth(x.astype(np.float64), quantile=quantile)
    ref = MeanShift(bandwidth=bw, cluster_all=cluster_all).fit(x.astype(np.float64))
    res = _mean_shift(x, quantile=quantile, cluster_all=cluster_all)
    labels, kept = _compact(res)
    assert float(res.bandwidth) == pytest.approx(bw, abs=ATOL)
    np.testing.assert_array_equal(labels, ref.labels_)
    np.testing.assert_allclose(np.asarray(res.centers)[kept], ref.cluster_centers_, atol=ATOL)


def test_mean_shift_ignores_invalid_points():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(N_POINTS, 3)) * 0.1
    x[14:] += 5.0
    valid = np.ones(N_POINTS, bool)
    valid[[0, 17]] = False
    res = _mean_shift(
        jnp.asarray(x, jnp.float32), jnp.asarray(valid), quantile=0.3, cluster_all=True
    )
    labels, _ = _compact(res)
    bw = estimate_bandwidth(x[valid], quantile=0.3)
    ref = MeanShift(bandwidth=bw).fit(x[valid])
    np.testing.assert_array_equal(labels[valid], ref.labels_)
    assert (labels[~valid] == -1).all()


def _data(n, seed, n_bad):
    rng = np.random.default_rng(seed)
    g = rng.normal(size=D).astype(np.float32)
    delta = 0.1 * rng.normal(size=(n, D)) + 0.05  # benign: mostly positive coordinates
    delta[n - n_bad :] = -np.abs(delta[n - n_bad :])  # sign-flipped attackers
    delta[0] *= 5.0  # too large: caught by the norm filter
    delta[1] *= 2.0  # large but within R: clipped to the median norm
    return g, (g + delta).astype(np.float32)


@pytest.mark.parametrize(("n", "n_bad"), [(10, 3)])
def test_signguard_matches_oracle(n, n_bad):
    g, w = _data(n, n, n_bad)
    valid = np.ones(n, bool)
    valid[2] = False
    w[2] = g
    env = make_env(n, D)
    ctx = make_ctx(g, n, seed=n, valid=valid)
    agg = get_aggregator("signguard", env, coord_fraction=0.5)
    out, _, info = jax.jit(agg.aggregate)(jnp.asarray(w), (), ctx)
    # The same coordinate draw as the rule (first use of ctx.key).
    idx = jnp.asarray(np.flatnonzero(env.param_mask), jnp.int32)
    coords = np.asarray(jax.random.choice(ctx.key, idx, (int(0.5 * idx.shape[0]),), replace=False))
    exp, sel = signguard_oracle.signguard(g, w, coords, env.param_mask, valid)
    np.testing.assert_allclose(np.asarray(out), exp, atol=ATOL)
    weights = np.asarray(info.client_weights)
    np.testing.assert_array_equal(np.flatnonzero(weights), sel)
    assert 0 not in sel and not set(sel) & set(range(n - n_bad, n))
    assert 1 in sel


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({"lower": 3.0}, "lower=3.0"),
        ({"coord_fraction": 0.0}, "coord_fraction=0.0"),
        ({"bandwidth_quantile": 1.5}, "bandwidth_quantile=1.5"),
    ],
)
def test_signguard_rejects_bad_options(opts, match):
    with pytest.raises(ValueError, match=match):
        get_aggregator("signguard", make_env(10, D), **opts)
