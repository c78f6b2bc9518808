"""FLARE against its float64 oracle (tests/reference/flare_oracle.py).

The proxy is the contract's FakeProxy: features(w, x) = ReLU(x W + b) with (W, b) read from
the first 15 coordinates of w, recomputed here in NumPy for the oracle. Tolerance: float32
kernel sums over ≤ 32² pairs of O(1) values: ~1e-6 relative; trust scores and the model to
ATOL 1e-5. Nearest-neighbour counts must match exactly (checked through the scores).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmc_jax.aggregators import get_aggregator
from spmc_jax.aggregators.flare import pairwise_mmd2
from tests.reference import flare_oracle

from .conftest import FakeProxy, make_ctx, make_env

D = 40
ATOL = 1e-5


def _plr(proxy: FakeProxy, w: np.ndarray, m: int) -> np.ndarray:
    f, c = proxy.N_FEATURES, proxy.N_CLASSES
    x = np.asarray(proxy.x, np.float64)[:m]
    w = np.asarray(w, np.float64)
    return np.maximum(x @ w[: f * c].reshape(f, c) + w[f * c : f * c + c], 0.0)


def test_pairwise_mmd_matches_oracle():
    rng = np.random.default_rng(0)
    plr = rng.normal(size=(4, 6, 3))
    plr[3] += 3.0  # a shifted distribution: larger MMD to the others
    got = np.asarray(pairwise_mmd2(jnp.asarray(plr, jnp.float32), 0.5))
    for i in range(4):
        for j in range(4):
            exp = 0.0 if i == j else flare_oracle.mmd2_unbiased(plr[i], plr[j], 0.5)
            assert got[i, j] == pytest.approx(exp, abs=ATOL)
    assert got[3, :3].min() > got[:3, :3].max()


@pytest.mark.parametrize(("n", "m", "tau"), [(8, 16, 0.5)])
def test_flare_matches_oracle(n, m, tau):
    rng = np.random.default_rng(n)
    g = rng.normal(size=D).astype(np.float32)
    w = (g + 0.1 * rng.normal(size=(n, D))).astype(np.float32)
    w[-1, :15] = g[:15] - 2.0 * (w[0, :15] - g[:15]) - 1.0  # an outlying model
    valid = np.ones(n, bool)
    valid[1] = False
    w[1] = g
    env = make_env(n, D)
    ctx = make_ctx(g, n, valid=valid)
    agg = get_aggregator("flare", env, aux_samples=m, tau=tau)
    out, _, info = jax.jit(agg.aggregate)(jnp.asarray(w), (), ctx)
    plrs = [_plr(env.proxy, w[i], m) for i in range(n)]
    k = max(1, int(0.5 * n))
    exp, ts = flare_oracle.flare(g, w, plrs, valid, k, tau, 1.0 / FakeProxy.N_CLASSES)
    np.testing.assert_allclose(np.asarray(info.client_weights), ts, atol=ATOL)
    np.testing.assert_allclose(np.asarray(out), exp, atol=ATOL)
    assert ts[-1] == ts[valid].min() and ts[1] == 0.0


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({"aux_samples": 1}, "aux_samples=1"),
        ({"neighbor_fraction": 0.0}, "neighbor_fraction=0.0"),
        ({"tau": 0.0}, "tau=0.0"),
        ({"gamma": -1.0}, "gamma=-1.0"),
    ],
)
def test_flare_rejects_bad_options(opts, match):
    with pytest.raises(ValueError, match=match):
        get_aggregator("flare", make_env(10, D), **opts)
