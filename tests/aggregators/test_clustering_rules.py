"""The clustering-family defenses (FLAME, Multi-Metrics, Auror, RFLBAT) against float64
NumPy oracles (tests/reference/<rule>_oracle.py, scikit-learn for clustering steps), plus
a 2-round `Simulation` run of each on the synthetic blobs set.

Inputs: client models g + update, updates drawn around a shared benign direction with a
planted attacker group (scaled / flipped / off-direction) so the clustering decisions are
far from ties; D = 40 coordinates, the last N_STATS posing as BatchNorm statistics.
Tolerances: float32 vs float64 on O(1) values with sums over ≤ 12 rows: ATOL = 2e-5.
Which clients are kept must match exactly.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmc_jax.aggregators import get_aggregator
from spmc_jax.aggregators.base import AggregatorEnv, RoundContext
from spmc_jax.config import Config
from spmc_jax.engine import run
from tests.reference import (
    auror_oracle,
    deepsight_oracle,
    flame_oracle,
    multi_metrics_oracle,
    rflbat_oracle,
)

from .conftest import FakeProxy, make_env

D = 40
N_STATS = 5
PARAM_MASK = np.arange(D) < D - N_STATS
ATOL = 2e-5
RTOL = 1e-5
# Compile time dominates these tests; XLA's backend optimisations change only fusion and
# ulp-level rounding (inside ATOL), as in test_contract.py.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@functools.cache
def _env(n: int, m: int = 0) -> AggregatorEnv:
    return AggregatorEnv(n_clients=n, num_malicious=m, lr=0.01, rounds=5, param_mask=PARAM_MASK)


_BUILT: dict = {}


def _build(name, env, **opts):
    key = (name, id(env), tuple(sorted(opts.items())))
    if key not in _BUILT:
        agg = get_aggregator(name, env, **opts)
        _BUILT[key] = (agg.init, jax.jit(agg.aggregate, compiler_options=FAST_COMPILE))
    return _BUILT[key]


def _ctx(g, n, valid, seed=0) -> RoundContext:
    return RoundContext(
        global_flat=jnp.asarray(g, jnp.float32),
        round=jnp.asarray(0, jnp.int32),
        key=jax.random.key(seed),
        n_samples=jnp.full((n,), 100.0, jnp.float32),
        valid=jnp.asarray(valid),
        client_ids=jnp.arange(n, dtype=jnp.int32),
    )


def _run(name, env, w, ctx, **opts):
    init, aggregate = _build(name, env, **opts)
    out, _, info = aggregate(jnp.asarray(w, jnp.float32), init(ctx.global_flat), ctx)
    return np.asarray(out), np.asarray(info.client_weights)


def planted(n, n_bad, seed, kind="flip", invalid=False):
    """g, client models and valid mask: benign updates share a direction; the last n_bad
    clients are attackers (kind: 'flip' = opposite direction, 'scale' = 8x larger norm,
    'offdir' = a common other direction)."""
    rng = np.random.default_rng(seed)
    g = rng.normal(size=D)
    base = rng.normal(size=D)
    upd = 0.3 * (base[None, :] + 0.6 * rng.normal(size=(n, D)))
    upd *= rng.uniform(0.5, 1.5, size=(n, 1))
    other = rng.normal(size=D)
    for i in range(n - n_bad, n):
        if kind == "flip":
            upd[i] = -upd[i]
        elif kind == "scale":
            upd[i] *= 8.0
        else:
            upd[i] = 0.3 * (other + 0.05 * rng.normal(size=D))
    w = g[None, :] + upd
    valid = np.ones(n, bool)
    if invalid:
        valid[1] = False
        w[1] = g  # what the engine hands over for a non-finite row
    return g.astype(np.float32), w.astype(np.float32), valid


# ----------------------------------------------------------------------------- FLAME


@pytest.mark.parametrize(
    ("n", "n_bad", "kind", "invalid"),
    [
        (10, 3, "flip", False),
        (10, 4, "offdir", True),
        (10, 2, "scale", False),
    ],
)
def test_flame_matches_oracle(n, n_bad, kind, invalid):
    g, w, valid = planted(n, n_bad, seed=n + n_bad, kind=kind, invalid=invalid)
    ctx = _ctx(g, n, valid, seed=4)
    out, weights = _run("flame", _env(n), w, ctx, noise_lambda=0.0)
    exp, exp_w, admitted = flame_oracle.flame(w, g, valid, PARAM_MASK)
    np.testing.assert_array_equal(weights > 0, admitted)
    np.testing.assert_allclose(weights, exp_w, atol=1e-6)
    np.testing.assert_allclose(out, exp, atol=ATOL, rtol=RTOL)
    if kind in ("flip", "offdir"):  # the attacker group leaves the majority cluster
        assert not admitted[n - n_bad :].any()


def test_flame_noise_is_lambda_times_median_norm():
    n = 10
    g, w, valid = planted(n, 3, seed=1)
    ctx = _ctx(g, n, valid, seed=9)
    out, weights = _run("flame", _env(n), w, ctx, noise_lambda=0.5)
    # The rule draws its noise as N(0, I) from ctx.key; the oracle scales it by λ·S.
    z = np.asarray(jax.random.normal(ctx.key, (D,), jnp.float32))
    exp, exp_w, _ = flame_oracle.flame(w, g, valid, PARAM_MASK, noise=z, noise_lambda=0.5)
    np.testing.assert_allclose(weights, exp_w, atol=1e-6)
    np.testing.assert_allclose(out, exp, atol=ATOL, rtol=RTOL)
    clean, _ = _run("flame", _env(n), w, ctx, noise_lambda=0.0)
    np.testing.assert_array_equal(out[~PARAM_MASK], clean[~PARAM_MASK])  # no noise on stats
    assert np.abs(out[PARAM_MASK] - clean[PARAM_MASK]).max() > 1e-3


def test_flame_rejects_bad_options():
    with pytest.raises(ValueError, match="noise_lambda=-1"):
        get_aggregator("flame", _env(5), noise_lambda=-1.0)
    with pytest.raises(ValueError, match="min_samples=0"):
        get_aggregator("flame", _env(5), min_samples=0)


# ----------------------------------------------------------------------------- Multi-Metrics


@pytest.mark.parametrize(
    ("n", "n_bad", "kind", "invalid", "p", "reference_metrics"),
    [
        (10, 3, "scale", False, 0.3, False),
        (10, 3, "offdir", True, 0.4, False),
        (10, 2, "flip", False, 0.6, True),
    ],
)
def test_multi_metrics_matches_oracle(n, n_bad, kind, invalid, p, reference_metrics):
    g, w, valid = planted(n, n_bad, seed=20 + n, kind=kind, invalid=invalid)
    ctx = _ctx(g, n, valid)
    opts = dict(p=p, reference_metrics=reference_metrics)
    out, weights = _run("multi_metrics", _env(n), w, ctx, **opts)
    exp, exp_w, scores = multi_metrics_oracle.multi_metrics(w, g, valid, PARAM_MASK, **opts)
    # The kept set must be the oracle's, and clear of a near-tie at the cut.
    k = int((exp_w > 0).sum())
    ranked = np.sort(scores[valid])
    assert ranked[k] - ranked[k - 1] > 1e-3 * ranked[k]
    np.testing.assert_array_equal(weights > 0, exp_w > 0)
    np.testing.assert_allclose(weights, exp_w, atol=1e-7)
    np.testing.assert_allclose(out, exp, atol=ATOL, rtol=RTOL)
    assert weights[~valid].sum() == 0
    if kind == "scale":
        assert weights[n - n_bad :].sum() == 0  # 8x-norm attackers score highest


def test_multi_metrics_rejects_bad_p():
    for p in (0.0, 1.5):
        with pytest.raises(ValueError, match=f"p={p}"):
            get_aggregator("multi_metrics", _env(5), p=p)


# ----------------------------------------------------------------------------- Auror


@pytest.mark.parametrize(
    ("n", "n_bad", "kind", "invalid", "alpha"),
    [(10, 3, "offdir", False, 0.3), (10, 2, "flip", True, 0.3), (10, 0, "flip", False, 5.0)],
)
def test_auror_matches_oracle(n, n_bad, kind, invalid, alpha):
    g, w, valid = planted(n, n_bad, seed=40 + n, kind=kind, invalid=invalid)
    ctx = _ctx(g, n, valid)
    out, weights = _run("auror", _env(n), w, ctx, alpha=alpha)
    exp, exp_w, gaps = auror_oracle.auror(w, g, valid, PARAM_MASK, alpha)
    assert np.min(np.abs(gaps - alpha)) > 1e-4  # no feature decision near the threshold
    np.testing.assert_allclose(weights, exp_w, atol=1e-7)
    np.testing.assert_allclose(out, exp, atol=ATOL, rtol=RTOL)
    if n_bad:
        assert weights[n - n_bad :].sum() == 0 and (weights > 0).sum() == valid.sum() - n_bad
    else:  # α above every feature gap: no indicative feature, plain mean of the valid
        np.testing.assert_allclose(weights, 1.0 / n, atol=1e-7)


def test_two_means_1d_is_the_optimal_split():
    from spmc_jax.aggregators._cluster import two_means_1d

    rng = np.random.default_rng(5)
    u = rng.normal(size=(9, 12)) * rng.uniform(0.1, 3, size=12)
    valid = np.ones(9, bool)
    valid[4] = False
    got = np.asarray(two_means_1d(jnp.asarray(u, jnp.float32), jnp.asarray(valid)))
    np.testing.assert_allclose(got, auror_oracle.feature_gaps(u[valid]), atol=1e-5)


def test_auror_rejects_bad_alpha():
    with pytest.raises(ValueError, match="alpha=0"):
        get_aggregator("auror", _env(5), alpha=0.0)


# ----------------------------------------------------------------------------- RFLBAT


@pytest.mark.parametrize(
    ("n", "n_bad", "kind", "invalid", "split"),
    [(10, 3, "offdir", False, True), (10, 3, "offdir", True, None), (10, 2, "scale", False, None)],
)
def test_rflbat_matches_oracle(n, n_bad, kind, invalid, split):
    from spmc_jax.aggregators.rflbat import reference_sets

    g, w, valid = planted(n, n_bad, seed=60 + n, kind=kind, invalid=invalid)
    ctx = _ctx(g, n, valid, seed=2)
    out, weights = _run("rflbat", _env(n), w, ctx)
    refs = np.asarray(reference_sets(ctx.key, 5, n), np.float64)
    exp, exp_w, k = rflbat_oracle.rflbat(w, g, valid, PARAM_MASK, refs)
    np.testing.assert_allclose(weights, exp_w, atol=1e-7)
    np.testing.assert_allclose(out, exp, atol=ATOL, rtol=RTOL)
    assert weights[~valid].sum() == 0
    if split:  # the gap statistic separates the tight attacker group (high cosine): dropped
        assert k >= 2 and weights[n - n_bad :].sum() == 0


def test_rflbat_rejects_bad_options():
    with pytest.raises(ValueError, match="eps1=0"):
        get_aggregator("rflbat", _env(5), eps1=0.0)
    with pytest.raises(ValueError, match="k_max=0"):
        get_aggregator("rflbat", _env(5), k_max=0)


# ----------------------------------------------------------------------------- DeepSight


def deepsight_clients(n, n_bad, seed, invalid=False):
    """Benign updates close to a shared one, spread over every output neuron; the last
    n_bad push most of their output-layer energy into one neuron (a backdoor target) with
    a shared direction. Two well-separated groups in every view, so that the ensemble
    distances (multiples of 1/5) have no ambiguous ties."""
    rng = np.random.default_rng(seed)
    g = 0.5 * rng.normal(size=D)
    upd = 0.2 * (rng.normal(size=D)[None, :] + 0.05 * rng.normal(size=(n, D)))
    f, c = FakeProxy.N_FEATURES, FakeProxy.N_CLASSES
    target = np.zeros((f, c))
    target[:, 1] = rng.normal(size=f)
    for i in range(n - n_bad, n):
        kernel = 0.02 * rng.normal(size=(f, c)) + 1.5 * target
        upd[i, : f * c] = kernel.ravel()
        upd[i, f * c : f * c + c] = [0.01, 1.0, 0.01] + 0.005 * rng.normal(size=c)
    w = g[None, :] + upd
    valid = np.ones(n, bool)
    if invalid:
        valid[0] = False
        w[0] = g
    return g.astype(np.float32), w.astype(np.float32), valid


@pytest.mark.parametrize(("n", "n_bad", "invalid"), [(10, 3, False), (10, 3, True)])
def test_deepsight_matches_oracle(n, n_bad, invalid):
    env = _deepsight_env(n)
    g, w, valid = deepsight_clients(n, n_bad, seed=7 + int(invalid), invalid=invalid)
    ctx = _ctx(g, n, valid, seed=3)
    out, weights = _run("deepsight", env, w, ctx, n_samples=64)
    f, c = FakeProxy.N_FEATURES, FakeProxy.N_CLASSES
    xs = np.asarray(jax.random.normal(ctx.key, (3, 64, f)))  # the rule's DDif inputs
    exp, exp_w, suspicious, accepted = deepsight_oracle.deepsight(
        w, g, valid, PARAM_MASK, slice(0, f * c), (f, c), slice(f * c, f * c + c), xs
    )
    np.testing.assert_array_equal(weights > 0, accepted)
    np.testing.assert_allclose(weights, exp_w, atol=1e-6)
    np.testing.assert_allclose(out, exp, atol=ATOL, rtol=RTOL)
    assert suspicious[n - n_bad :].all() and not suspicious[: n - n_bad].any()
    assert not accepted[n - n_bad :].any()


@functools.cache
def _deepsight_env(n):
    return make_env(n, D, param_mask=PARAM_MASK)


def test_deepsight_needs_the_output_layer():
    env = dataclasses.replace(_deepsight_env(5), output_layer="cls")
    with pytest.raises(ValueError, match="output_layer='cls'"):
        get_aggregator("deepsight", env)
    with pytest.raises(ValueError, match="tau=0"):
        get_aggregator("deepsight", _deepsight_env(5), tau=0.0)


# ----------------------------------------------------------------------------- end to end

TINY = dict(
    clients=4, rounds=2, local_epochs=1, batch_size=16, gamma=0.25, eval_batch=150, model="mlp"
)


@pytest.mark.parametrize(
    ("name", "opts", "check"),
    [
        (
            "flame",
            (("noise_lambda", "0.001"),),
            # a majority (>= 3 of 4) admitted, each weight <= 1/L
            lambda w: (w > 0).sum() >= 3 and w.max() <= 1.0 / (w > 0).sum() + 1e-6,
        ),
        # a uniform mean over the kept clients, a majority
        ("auror", (("alpha", "0.02"),), lambda w: (w > 0).sum() >= 3 and np.ptp(w[w > 0]) < 1e-7),
        ("rflbat", (("eps2", "4.0"),), lambda w: (w > 0).sum() >= 1 and np.ptp(w[w > 0]) < 1e-7),
        # clipped weights gamma_i / L (<= 1/L each), at least one client accepted
        (
            "deepsight",
            (("n_samples", "32"),),
            lambda w: (w > 0).sum() >= 1 and w.max() <= 1.0 / (w > 0).sum() + 1e-6,
        ),
        # floor(0.5 * 4) = 2 clients kept, uniformly
        ("multi_metrics", (("p", "0.5"),), lambda w: np.allclose(np.sort(w), [0, 0, 0.5, 0.5])),
    ],
)
def test_two_round_simulation(blobs, name, opts, check):
    cfg = Config(defense=name, attack="base", defense_opts=opts, **TINY)
    res = run(cfg, blobs)
    assert len(res.history) == 2
    for row in res.history:
        w = np.asarray(row["client_weights"])
        assert w.shape == (4,) and np.all(np.isfinite(w)) and np.all(w >= 0)
        assert check(w), w
    last = res.history[-1]
    for key in ("A", "R", "V"):
        assert last[key] is not None and 0.0 <= last[key] <= 100.0
    assert bool(jnp.all(jnp.isfinite(res.state.global_flat)))
