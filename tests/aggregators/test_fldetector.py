"""FLDetector and its pieces against float64 / scikit-learn oracles
(tests/reference/fldetector_oracle.py).

* L-BFGS product: float32 vs float64 on well-conditioned pairs (y = H s, H SPD, cond ≈ 10):
  RTOL 1e-3 (the solve of a 2N×2N system amplifies float32 rounding by its condition).
* 2-means: W_2 equals scikit-learn's KMeans inertia (the 1-D optimum) to 1e-5 relative,
  same partition.
* Gap statistic decision and the multi-round rule: exact decisions; the models to
  ATOL 1e-4 (L-BFGS in float32 enters the distances, not the aggregate, which is a mean).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.cluster import KMeans

from spmc_jax.aggregators import get_aggregator
from spmc_jax.aggregators._kmeans1d import gap_says_clustered, two_means
from spmc_jax.aggregators.fldetector import lbfgs_hvp
from spmc_jax.config import Config
from spmc_jax.engine import Simulation
from tests.reference import fldetector_oracle

from .conftest import make_ctx, make_env


def _spd(d, rng):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return q @ np.diag(np.linspace(1.0, 10.0, d)) @ q.T


@pytest.mark.parametrize("n_pairs", [1, 3, 5])
def test_lbfgs_hvp_matches_oracle(n_pairs):
    rng = np.random.default_rng(n_pairs)
    d, win = 12, 5
    h = _spd(d, rng)
    s = rng.normal(size=(win, d))
    y = s @ h
    v = rng.normal(size=d)
    got = lbfgs_hvp(jnp.asarray(s, jnp.float32), jnp.asarray(y, jnp.float32), n_pairs, v)
    exp = fldetector_oracle.lbfgs_hvp(list(s[win - n_pairs :]), list(y[win - n_pairs :]), v)
    np.testing.assert_allclose(np.asarray(got), exp, rtol=1e-3, atol=1e-4)
    # The secant condition: B s_last = y_last.
    last = lbfgs_hvp(jnp.asarray(s, jnp.float32), jnp.asarray(y, jnp.float32), n_pairs, s[-1])
    np.testing.assert_allclose(np.asarray(last), y[-1], rtol=1e-3, atol=1e-3)
    assert not np.any(np.asarray(lbfgs_hvp(jnp.asarray(s), jnp.asarray(y), 0, v)))


@pytest.mark.parametrize("seed", range(4))
def test_two_means_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(0, 1, 9), rng.normal(4 + seed, 1, 5)])
    valid = np.ones(16, bool)
    valid[[2, 15]] = False
    xf = np.concatenate([x, [0.0, 0.0]])[np.r_[0:2, 14, 2:14, 15]]  # invalid at 2 and 15
    km = KMeans(n_clusters=2, n_init=10, random_state=0).fit(xf[valid][:, None])
    w1, w2, upper = two_means(jnp.asarray(xf, jnp.float32), jnp.asarray(valid))
    assert float(w2) == pytest.approx(km.inertia_, rel=1e-5)
    assert float(w1) == pytest.approx(np.sum((xf[valid] - xf[valid].mean()) ** 2), rel=1e-5)
    high = km.labels_ == np.argmax(km.cluster_centers_[:, 0])
    np.testing.assert_array_equal(np.asarray(upper)[valid], high)
    assert not np.asarray(upper)[~valid].any()


@pytest.mark.parametrize(("gap", "expect"), [(0.0, False), (6.0, True)])
def test_gap_statistic_matches_oracle(gap, expect):
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.uniform(0, 1, 10), gap + rng.uniform(0, 1, 4)])
    key = jax.random.key(7)
    gap_fn = jax.jit(gap_says_clustered, static_argnums=3)
    got = bool(gap_fn(jnp.asarray(x, jnp.float32), jnp.ones(14, bool), key, 20))
    refs = np.asarray(jax.random.uniform(key, (20, 14)), np.float64)
    assert got == fldetector_oracle.gap_statistic_clusters(x, refs) == expect


def test_fldetector_rounds_match_oracle_remove_attackers_and_restart_once():
    """7 rounds against the oracle: the first detection removes both noise attackers and
    returns g_0 (nobody kept); every later round averages the 6 benign clients only."""
    n, d, bad = 8, 20, (6, 7)
    rng = np.random.default_rng(0)
    h = _spd(d, rng) * 0.05
    targets = rng.normal(size=(n, d)) * 0.1
    env = make_env(n, d, param_mask=np.ones(d, bool))
    agg = get_aggregator("fldetector", env, window=4)
    step = jax.jit(agg.aggregate)
    oracle = fldetector_oracle.FLDetector(window=4)
    g0 = rng.normal(size=d).astype(np.float32) * 0.1
    g = g0
    state = agg.init(jnp.asarray(g))
    ids = list(range(n))
    kept_per_round = []
    for t in range(7):
        # Benign: a gradient step on a quadratic (consistent across rounds); attackers: noise.
        delta = -(g[None, :] - targets) @ h
        for i in bad:
            delta[i] = rng.normal(size=d) * 0.3
        w = (g + delta).astype(np.float32)
        ctx = make_ctx(g, n, seed=t, round_index=t)
        out, state, info = step(jnp.asarray(w), state, ctx)
        k_gap = jax.random.fold_in(ctx.key, 1)

        def refs(m, k_gap=k_gap):
            return np.asarray(jax.random.uniform(k_gap, (20, n)), np.float64)[:, :m]

        exp, kept = oracle.round(g, w, ids, refs, t)
        np.testing.assert_array_equal(np.flatnonzero(np.asarray(info.client_weights)), kept)
        np.testing.assert_allclose(np.asarray(out), exp, atol=1e-4)
        kept_per_round.append(kept)
        g = np.asarray(out)
    r = oracle.restart_round
    assert r is not None and int(state.restart_round) == r
    assert kept_per_round[r] == []
    assert all(k == list(range(8)) for k in kept_per_round[:r])
    assert all(k == list(range(6)) for k in kept_per_round[r + 1 :]) and r < 6
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(state.removed)), bad)
    assert int(state.n_pairs) == min(4, 6 - r - 1)  # the history restarted after round r


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({"window": 0}, "window=0"),
        ({"start_round": -1}, "start_round=-1"),
        ({"n_refs": 1}, "n_refs=1"),
    ],
)
def test_fldetector_rejects_bad_options(opts, match):
    with pytest.raises(ValueError, match=match):
        get_aggregator("fldetector", make_env(10, 8), **opts)


def test_fldetector_run_removes_attackers_restarts_once_and_keeps_them_out(blobs):
    """A real Simulation (MLP on blobs, 6 clients, 2 Gaussian-noise attackers), round by
    round: exactly one round aggregates nobody and ends on the round-0 model itself; the
    removed set is the attackers; every later round gives them weight 0 and the 4 benign
    clients 1/4, and the restart round stays recorded."""
    cfg = Config(
        defense="fldetector", defense_opts=(("window", "2"),), attack="gaussian",
        model="mlp", clients=6, gamma=1 / 3, rounds=5, local_epochs=1, batch_size=16,
        eval_batch=150, subsample=480, partition="iid",
    )  # fmt: skip
    sim = Simulation(cfg, blobs)
    state = sim.init_state()
    g0 = np.asarray(state.global_flat)
    bad = np.flatnonzero(sim.plan.malicious)
    assert len(bad) == 2
    restarts, after = [], []
    for r in range(cfg.rounds):
        state, outs = sim.run_rounds(state, sim.data, 1, jnp.asarray(r, jnp.int32))
        w = np.asarray(outs.client_weights[0], np.float64)
        ids = np.asarray(outs.client_ids[0])
        if not w.any():
            restarts.append(r)
            np.testing.assert_array_equal(np.asarray(state.global_flat), g0)
        elif restarts:
            after.append(r)
            np.testing.assert_array_equal(w[np.isin(ids, bad)], 0.0)
            np.testing.assert_allclose(w[~np.isin(ids, bad)], 0.25, atol=1e-6)
        assert int(state.agg_state.restart_round) == (restarts[0] if restarts else -1)
    assert len(restarts) == 1 and after == list(range(restarts[0] + 1, cfg.rounds))
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(state.agg_state.removed)), bad)
