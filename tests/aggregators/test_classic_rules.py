"""Krum, Multi-Krum, median, trimmed mean, FLTrust, norm clipping, centered clipping:
float64 NumPy oracles (tests/reference/<rule>_oracle.py), hand-checked cases, option
validation and a robustness property.

Tolerances (float32 rule vs float64 oracle, values of order 1):
* SELECT_ATOL = 1e-6: selection rules return g + (w_i − g), two float32 roundings of
  values below ~4 (ulp 4.8e-7); the selected indices themselves must match exactly.
* COORD_ATOL = 2e-6: medians/trimmed means add a few float32 terms (|Δ| ≲ 0.5) to g.
* MEAN_RTOL/ATOL = 1e-5: weighted sums over n <= 17 rows with rescalings (FLTrust,
  clipping), a few ulps each; 1e-5 is ~100 ulps, far below any formula error.
* WEIGHT_ATOL = 1e-6: client weights are ratios of float32 counts/sums.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmc_jax.aggregators import get_aggregator
from tests.reference import (
    centered_clipping_oracle,
    fltrust_oracle,
    krum_oracle,
    median_oracle,
    multikrum_oracle,
    norm_clipping_oracle,
    trimmed_mean_oracle,
)

from .conftest import FakeProxy, make_ctx, make_env, make_param_mask

SELECT_ATOL = 1e-6
COORD_ATOL = 2e-6
MEAN_RTOL = 1e-5
MEAN_ATOL = 1e-5
WEIGHT_ATOL = 1e-6
D = 48
RULES = ("krum", "multikrum", "median", "trimmed_mean", "norm_clipping", "centered_clipping")


def _data(n: int, d: int = D, seed: int = 0, spread: float = 0.1):
    rng = np.random.default_rng(seed)
    g = rng.normal(size=d).astype(np.float32)
    w = (g + spread * rng.normal(size=(n, d))).astype(np.float32)
    return g, w


# Compilation dominates this file's run time: builds are cached per (rule, env, options) so
# tests reusing a configuration share one compiled function, and XLA's backend optimisations
# (which change nothing but fusion and ulp-level rounding) are skipped.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_BUILDS: dict = {}


def _build(name, env, opts):
    key = (
        name,
        env.n_clients,
        env.num_malicious,
        env.param_mask.tobytes(),
        env.proxy is None,
        tuple(sorted(opts.items())),
    )
    if key not in _BUILDS:
        agg = get_aggregator(name, env, **opts)
        _BUILDS[key] = (agg, jax.jit(agg.aggregate, compiler_options=FAST_COMPILE))
    return _BUILDS[key]


def _run(name, env, w, ctx, state=None, **opts):
    agg, aggregate = _build(name, env, opts)
    if state is None:
        state = agg.init(ctx.global_flat)
    out, new_state, info = aggregate(jnp.asarray(w), state, ctx)
    return np.asarray(out, np.float64), new_state, np.asarray(info.client_weights, np.float64)


def _with_bad_rows(w: np.ndarray, bad: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Rows in `bad` made non-finite (sanitised to invalid by get_aggregator)."""
    w = w.copy()
    for j, i in enumerate(bad):
        w[i] = np.nan if j % 2 == 0 else np.inf
    valid = np.ones(w.shape[0], bool)
    valid[bad] = False
    return w, valid


# ----------------------------------------------------------------------------- Krum


@pytest.mark.parametrize(("n", "f"), [(5, 1), (10, 3), (17, 4)])
def test_krum_matches_oracle(n, f):
    g, w = _data(n, seed=n)
    env = make_env(n, D, num_malicious=f)
    out, _, weights = _run("krum", env, w, make_ctx(g, n))
    exp, best = krum_oracle.krum(g, w, f, mask=env.param_mask)
    np.testing.assert_allclose(out, exp, atol=SELECT_ATOL)
    np.testing.assert_array_equal(weights, np.eye(n)[best])


def test_krum_reference_score_options():
    n, f = 10, 3
    g, w = _data(n, seed=11)
    env = make_env(n, D, num_malicious=f)
    out, _, weights = _run("krum", env, w, make_ctx(g, n), squared=False, num_neighbors=n - 1)
    exp, best = krum_oracle.krum(g, w, f, num_neighbors=n - 1, squared=False, mask=env.param_mask)
    np.testing.assert_allclose(out, exp, atol=SELECT_ATOL)
    assert weights[best] == 1.0


def test_krum_drops_invalid_rows():
    n, f = 10, 2
    g, w = _data(n, seed=12)
    w_bad, valid = _with_bad_rows(w, [0, 4, 7])
    env = make_env(n, D, num_malicious=f)
    out, _, weights = _run("krum", env, w_bad, make_ctx(g, n))
    # Krum on the 7 valid rows with the same f (n_valid − f − 2 = 3 neighbours).
    exp, best = krum_oracle.krum(g, w_bad, f, valid=valid, mask=env.param_mask)
    np.testing.assert_allclose(out, exp, atol=SELECT_ATOL)
    np.testing.assert_array_equal(weights, np.eye(n)[best])
    assert valid[best]


def test_krum_hand_case():
    # Updates (0,0), (1,0), (0,1), (10,10); n = 4, f = 0 → 2 neighbours. Scores:
    # 1+1 = 2, 1+2 = 3, 1+2 = 3, 181+181 = 362 → client 0.
    g = np.array([0.5, -0.5], np.float32)
    deltas = np.array([[0, 0], [1, 0], [0, 1], [10, 10]], np.float32)
    env = make_env(4, 2, num_malicious=0, param_mask=np.ones(2, bool))
    out, _, weights = _run("krum", env, g + deltas, make_ctx(g, 4))
    np.testing.assert_allclose(out, g, atol=SELECT_ATOL)
    np.testing.assert_array_equal(weights, [1, 0, 0, 0])


def test_krum_tie_break_is_order_free():
    # n = 3, f = 0 → one neighbour. Updates 0, 3, 4 on a line: d01 = 9, d02 = 16, d12 = 1,
    # so clients 1 and 2 tie at score 1; the total distance (10 vs 17) picks client 1, in
    # any row order.
    g = np.zeros(2, np.float32)
    deltas = np.array([[0, 0], [3, 0], [4, 0]], np.float32)
    env = make_env(3, 2, num_malicious=0, param_mask=np.ones(2, bool))
    for perm in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):
        out, _, weights = _run("krum", env, deltas[perm], make_ctx(g, 3))
        np.testing.assert_allclose(out, deltas[1])
        assert weights[perm.index(1)] == 1.0


def test_krum_distances_ignore_statistics():
    # On the parameters client 0 is the centre (score 3 vs 5 for the others), but its
    # BatchNorm-statistic coordinates are far off: with the mask it is still selected,
    # and its whole vector (statistics included) becomes the update.
    d = 4
    mask = np.array([True, True, False, False])
    g = np.zeros(d, np.float32)
    deltas = np.array(
        [[0, 0, 100, 100], [1, 0, 0, 0], [-1, 0, 0, 0], [0, 1, 0, 0], [0, -1, 0, 0]], np.float32
    )
    env = make_env(5, d, num_malicious=0, param_mask=mask)
    out, _, _ = _run("krum", env, g + deltas, make_ctx(g, 5))
    np.testing.assert_allclose(out, deltas[0], atol=SELECT_ATOL)
    assert krum_oracle.krum(g, deltas, 0, mask=None)[1] != 0  # unmasked Krum would differ


def test_krum_server_momentum():
    # Two rounds with μ = 0.9: v1 = Δ̄1, v2 = 0.9·v1 + Δ̄2 on parameters, v2 = Δ̄2 on statistics.
    n, f, mu = 8, 1, 0.9
    env = make_env(n, D, num_malicious=f)
    g, w1 = _data(n, seed=21)
    out1, state, _ = _run("krum", env, w1, make_ctx(g, n), server_momentum=mu)
    sel1 = krum_oracle.krum(g, w1, f, mask=env.param_mask)[0] - g
    g1 = out1.astype(np.float32)
    g_b, w_b = _data(n, seed=22)
    w2 = (g1 + (w_b - g_b)).astype(np.float32)
    out2, _, _ = _run("krum", env, w2, make_ctx(g1, n, seed=1), state=state, server_momentum=mu)
    sel2 = krum_oracle.krum(g1, w2, f, mask=env.param_mask)[0] - g1
    exp = trimmed_mean_oracle.momentum_rounds(g, [sel1, sel2], mu, env.param_mask)
    np.testing.assert_allclose(out1, exp[0], atol=SELECT_ATOL)
    np.testing.assert_allclose(out2, exp[1], atol=1e-5)  # adds one more float32 step


# ----------------------------------------------------------------------------- Multi-Krum


@pytest.mark.parametrize(("n", "f", "m"), [(10, 2, None), (10, 3, 5), (17, 4, None)])
def test_multikrum_matches_oracle(n, f, m):
    g, w = _data(n, seed=30 + n)
    env = make_env(n, D, num_malicious=f)
    opts = {} if m is None else {"m": m}
    out, _, weights = _run("multikrum", env, w, make_ctx(g, n), **opts)
    exp, chosen = multikrum_oracle.multikrum(g, w, f, m=m, mask=env.param_mask)
    np.testing.assert_allclose(out, exp, rtol=MEAN_RTOL, atol=MEAN_ATOL)
    expected_w = np.zeros(n)
    expected_w[chosen] = 1.0 / len(chosen)
    np.testing.assert_allclose(weights, expected_w, atol=WEIGHT_ATOL)


def test_multikrum_reference_options_and_invalid_rows():
    n, f = 10, 3
    g, w = _data(n, seed=33)
    w_bad, valid = _with_bad_rows(w, [2, 5])
    env = make_env(n, D, num_malicious=f)
    opts = {"m": 5, "squared": False, "num_neighbors": n - 1}
    out, _, weights = _run("multikrum", env, w_bad, make_ctx(g, n), **opts)
    exp, chosen = multikrum_oracle.multikrum(
        g, w_bad, f, m=5, valid=valid, num_neighbors=n - 1, squared=False, mask=env.param_mask
    )
    np.testing.assert_allclose(out, exp, rtol=MEAN_RTOL, atol=MEAN_ATOL)
    assert set(np.flatnonzero(weights)) == set(chosen)
    # Default m with dropped rows: n_valid − f = 5.
    _, _, weights = _run("multikrum", env, w_bad, make_ctx(g, n))
    assert np.count_nonzero(weights) == 5 and np.all(weights[~valid] == 0)


# ----------------------------------------------------------------------------- median


@pytest.mark.parametrize("n", [9, 10])
def test_median_matches_oracle(n):
    g, w = _data(n, seed=40 + n)
    env = make_env(n, D)
    out, _, weights = _run("median", env, w, make_ctx(g, n))
    np.testing.assert_allclose(out, median_oracle.median(g, w), atol=COORD_ATOL)
    np.testing.assert_allclose(weights, median_oracle.median_shares(w), atol=WEIGHT_ATOL)


def test_median_invalid_rows_and_hand_case():
    n = 7
    g, w = _data(n, seed=47)
    w_bad, valid = _with_bad_rows(w, [1, 3])  # 5 valid rows: odd count
    out, _, weights = _run("median", make_env(n, D), w_bad, make_ctx(g, n))
    np.testing.assert_allclose(out, median_oracle.median(g, w_bad, valid), atol=COORD_ATOL)
    np.testing.assert_allclose(weights, median_oracle.median_shares(w_bad, valid), atol=WEIGHT_ATOL)
    # Hand case, one coordinate: updates 1, 2, 100 → median 2; client 1 supplied it.
    g1 = np.zeros(1, np.float32)
    env1 = make_env(3, 1, param_mask=np.ones(1, bool))
    w1 = np.array([[1.0], [2.0], [100.0]], np.float32)
    out, _, weights = _run("median", env1, w1, make_ctx(g1, 3))
    np.testing.assert_allclose(out, [2.0])
    np.testing.assert_array_equal(weights, [0, 1, 0])


# ----------------------------------------------------------------------------- trimmed mean


@pytest.mark.parametrize(("n", "f"), [(10, 3), (11, 2), (10, 0)])
def test_trimmed_mean_matches_oracle(n, f):
    g, w = _data(n, seed=50 + n + f)
    env = make_env(n, D, num_malicious=f)
    out, _, weights = _run("trimmed_mean", env, w, make_ctx(g, n))
    exp, shares = trimmed_mean_oracle.trimmed_mean(g, w, f)
    np.testing.assert_allclose(out, exp, atol=COORD_ATOL)
    np.testing.assert_allclose(weights, shares, atol=WEIGHT_ATOL)


def test_trimmed_mean_overrides_and_invalid_rows():
    n = 10
    g, w = _data(n, seed=55)
    env = make_env(n, D, num_malicious=1)
    out_env, _, _ = _run("trimmed_mean", env, w, make_ctx(g, n))
    out_opt, _, _ = _run("trimmed_mean", env, w, make_ctx(g, n), num_malicious=3)
    out_beta, _, _ = _run("trimmed_mean", env, w, make_ctx(g, n), beta=3)
    exp1 = trimmed_mean_oracle.trimmed_mean(g, w, 1)[0]
    exp3 = trimmed_mean_oracle.trimmed_mean(g, w, 3)[0]
    np.testing.assert_allclose(out_env, exp1, atol=COORD_ATOL)
    np.testing.assert_allclose(out_opt, exp3, atol=COORD_ATOL)
    np.testing.assert_allclose(out_beta, exp3, atol=COORD_ATOL)
    assert not np.allclose(exp1, exp3, atol=1e-3)
    # 4 invalid rows leave 6 valid: trim 3 > (6 − 1)//2 = 2 is lowered to 2 (the median).
    w_bad, valid = _with_bad_rows(w, [0, 3, 6, 9])
    out, _, weights = _run("trimmed_mean", env, w_bad, make_ctx(g, n), beta=3)
    exp, shares = trimmed_mean_oracle.trimmed_mean(g, w_bad, 3, valid)
    np.testing.assert_allclose(out, exp, atol=COORD_ATOL)
    np.testing.assert_allclose(out, median_oracle.median(g, w_bad, valid), atol=COORD_ATOL)
    np.testing.assert_allclose(weights, shares, atol=WEIGHT_ATOL)


def test_trimmed_mean_reference_variant_with_momentum():
    # The reference's TrimmedMean: mean of the 5 values closest to the median, momentum 0.9.
    n, mu = 10, 0.9
    env = make_env(n, D, num_malicious=3)
    opts = {"closest_k": 5, "server_momentum": mu}
    g, w1 = _data(n, seed=60)
    out1, state, _ = _run("trimmed_mean", env, w1, make_ctx(g, n), **opts)
    g1 = out1.astype(np.float32)
    g_b, w_b = _data(n, seed=61)
    w2 = (g1 + (w_b - g_b)).astype(np.float32)
    out2, _, _ = _run("trimmed_mean", env, w2, make_ctx(g1, n, seed=1), state=state, **opts)
    u1 = trimmed_mean_oracle.closest_to_median_mean(g, w1, 5) - g
    u2 = trimmed_mean_oracle.closest_to_median_mean(g1, w2, 5) - g1
    exp = trimmed_mean_oracle.momentum_rounds(g, [u1, u2], mu, env.param_mask)
    np.testing.assert_allclose(out1, exp[0], atol=COORD_ATOL)
    np.testing.assert_allclose(out2, exp[1], atol=1e-5)  # one more float32 step


# ----------------------------------------------------------------------------- FLTrust


def _fltrust_data(n: int, seed: int):
    """Client updates aligned, anti-aligned or orthogonal-ish to the server update g0."""
    rng = np.random.default_rng(seed)
    g = (0.3 * rng.normal(size=D)).astype(np.float32)
    proxy = FakeProxy()
    g0 = np.asarray(proxy.train(jnp.asarray(g), jax.random.key(seed), 10)) - g
    a = rng.uniform(-1.0, 2.0, size=n)  # some negative → TS 0
    deltas = a[:, None] * g0[None, :] + 0.05 * rng.normal(size=(n, D))
    return g, (g + deltas).astype(np.float32), g0


@pytest.mark.parametrize("with_invalid", [False, True])
def test_fltrust_matches_oracle(with_invalid):
    n, seed = 10, 70
    g, w, g0 = _fltrust_data(n, seed)
    valid = np.ones(n, bool)
    if with_invalid:
        w, valid = _with_bad_rows(w, [1, 8])
    env = make_env(n, D)
    out, _, weights = _run("fltrust", env, w, make_ctx(g, n, seed=seed))
    exp, ts = fltrust_oracle.fltrust(g, w, g0, mask=env.param_mask, valid=valid)
    assert 0 < np.count_nonzero(ts) < n  # the ReLU is exercised
    np.testing.assert_allclose(out, exp, rtol=MEAN_RTOL, atol=MEAN_ATOL)
    np.testing.assert_allclose(weights, ts, atol=1e-5)  # cosines of float32 vectors


def test_fltrust_all_distrusted_keeps_global():
    # Every update points against the server's: all TS = 0 → no update.
    n = 6
    g, w, g0 = _fltrust_data(n, 71)
    w = (g - (0.5 + np.arange(n))[:, None] * g0[None, :]).astype(np.float32)
    out, _, weights = _run("fltrust", make_env(n, D), w, make_ctx(g, n, seed=71))
    np.testing.assert_allclose(out, g, atol=0)
    np.testing.assert_array_equal(weights, 0.0)


def test_fltrust_requires_proxy():
    with pytest.raises(ValueError, match="proxy"):
        get_aggregator("fltrust", make_env(5, D, proxy=None))


# ----------------------------------------------------------------------------- norm clipping


@pytest.mark.parametrize("max_norm", [0.0, 0.6])
def test_norm_clipping_matches_oracle(max_norm):
    n = 10
    g, w = _data(n, seed=80)
    w[::3] = g + 4.0 * (w[::3] - g)  # a few large updates so clipping is active
    env = make_env(n, D)
    out, _, weights = _run("norm_clipping", env, w, make_ctx(g, n), max_norm=max_norm)
    exp, factors = norm_clipping_oracle.norm_clipping(
        g, w, max_norm if max_norm > 0 else None, mask=env.param_mask
    )
    assert np.any(factors < factors.max())  # some clipped
    np.testing.assert_allclose(out, exp, rtol=MEAN_RTOL, atol=MEAN_ATOL)
    np.testing.assert_allclose(weights, factors, atol=WEIGHT_ATOL)


def test_norm_clipping_invalid_rows():
    n = 9
    g, w = _data(n, seed=81)
    w_bad, valid = _with_bad_rows(w, [0, 5])
    env = make_env(n, D)
    out, _, weights = _run("norm_clipping", env, w_bad, make_ctx(g, n))
    exp, factors = norm_clipping_oracle.norm_clipping(g, w_bad, mask=env.param_mask, valid=valid)
    np.testing.assert_allclose(out, exp, rtol=MEAN_RTOL, atol=MEAN_ATOL)
    np.testing.assert_allclose(weights, factors, atol=WEIGHT_ATOL)


def test_norm_clipping_noise_on_parameters_only():
    # Zero updates: the new model is g + noise; noise ~ N(0, σ²) on parameters, none on
    # statistics. With 3500 parameter coordinates the sample std is within ±1.2 % (1 s.d.)
    # of σ, so a 6 % band is a > 4 s.d. check; the mean is within 5 s.d. (σ/√3500).
    n, d, sigma = 4, 4000, 0.01
    mask = make_param_mask(d, n_stats=500)
    g = np.zeros(d, np.float32)
    w = np.zeros((n, d), np.float32)
    env = make_env(n, d, param_mask=mask)
    out, _, _ = _run("norm_clipping", env, w, make_ctx(g, n, seed=3), noise_std=sigma)
    noise = out[mask]
    assert abs(noise.std() / sigma - 1) < 0.06
    assert abs(noise.mean()) < 5 * sigma / np.sqrt(mask.sum())
    np.testing.assert_array_equal(out[~mask], 0.0)


# ----------------------------------------------------------------------------- centered clipping


@pytest.mark.parametrize(("tau", "iters", "use_history"), [(0.5, 3, True), (0.3, 1, False)])
def test_centered_clipping_matches_oracle(tau, iters, use_history):
    n = 10
    env = make_env(n, D)
    opts = {"tau": tau, "iters": iters, "use_history": use_history}
    g, w1 = _data(n, seed=90)
    w1[:3] = g + 5.0 * (w1[:3] - g)  # large updates → active clipping
    out1, state, weights1 = _run("centered_clipping", env, w1, make_ctx(g, n), **opts)
    exp1, v1, coef1 = centered_clipping_oracle.centered_clipping(
        g, w1, tau, iters, mask=env.param_mask
    )
    np.testing.assert_allclose(out1, exp1, rtol=MEAN_RTOL, atol=MEAN_ATOL)
    np.testing.assert_allclose(weights1, coef1, atol=1e-5)  # products of clip factors
    # Round 2 starts from round 1's aggregate when use_history (the state), else from 0.
    g1 = out1.astype(np.float32)
    g_b, w_b = _data(n, seed=91)
    w2 = (g1 + (w_b - g_b)).astype(np.float32)
    w2, valid = _with_bad_rows(w2, [4])
    out2, _, _ = _run("centered_clipping", env, w2, make_ctx(g1, n), state=state, **opts)
    exp2, _, _ = centered_clipping_oracle.centered_clipping(
        g1, w2, tau, iters, v0=v1 if use_history else None, mask=env.param_mask, valid=valid
    )
    np.testing.assert_allclose(out2, exp2, rtol=MEAN_RTOL, atol=MEAN_ATOL)


# ----------------------------------------------------------------------------- all invalid


@pytest.mark.parametrize("name", [*RULES, "fltrust"])
def test_all_rows_invalid_keeps_global(name):
    n = 6
    g, w = _data(n, seed=95)
    w[:] = np.nan
    out, _, weights = _run(name, make_env(n, D, num_malicious=1), w, make_ctx(g, n))
    np.testing.assert_array_equal(out, g)
    np.testing.assert_array_equal(weights, 0.0)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("name", "n", "f", "opts", "match"),
    [
        ("krum", 4, 2, {}, "neighbour count"),  # n − f − 2 = 0
        ("krum", 10, 1, {"num_neighbors": 10}, "neighbour count"),
        ("krum", 10, 1, {"server_momentum": 1.0}, "server_momentum"),
        ("krum", 10, 1, {"num_malicious": 11}, "num_malicious"),
        ("multikrum", 10, 1, {"m": 11}, "m=11"),
        ("trimmed_mean", 10, 5, {}, "beta"),  # 2β = n
        ("trimmed_mean", 10, 1, {"beta": 5}, "beta"),
        ("trimmed_mean", 10, 1, {"closest_k": 11}, "closest_k"),
        ("median", 10, 1, {"server_momentum": -0.1}, "server_momentum"),
        ("fltrust", 10, 1, {"public_epochs": 0}, "public_epochs"),
        ("norm_clipping", 10, 1, {"noise_std": -1.0}, "noise_std"),
        ("centered_clipping", 10, 1, {"tau": 0.0}, "tau"),
        ("centered_clipping", 10, 1, {"iters": 0}, "iters"),
    ],
)
def test_bad_options_raise(name, n, f, opts, match):
    with pytest.raises(ValueError, match=match):
        get_aggregator(name, make_env(n, D, num_malicious=f), **opts)


# ----------------------------------------------------------------------------- robustness

ROBUST = {
    "krum": {},
    "multikrum": {},
    "median": {},
    "trimmed_mean": {},
    "norm_clipping": {},
    # τ at the scale of the honest updates (‖Δ_i − mean‖ ≈ 0.35), as the paper prescribes;
    # each outlier then moves the centre by at most τ/n per iteration.
    "centered_clipping": {"tau": 1.0},
}
# Benign updates: μ + 0.05·ε with ‖μ‖ ≈ 0.5 and ‖0.05 ε‖ ≈ 0.5. Any rule that keeps the
# outliers' influence at the benign scale lands within ~1 of the benign mean; BOUND = 2
# leaves margin, and the outliers (norm 1e3 / 1e6) move plain FedAvg by > 100.
BOUND = 2.0


@pytest.mark.parametrize("scale", [1e3, 1e6])
@pytest.mark.parametrize("name", [*ROBUST, "fedavg"])
def test_robust_to_huge_outliers(name, scale):
    n, f, d = 11, 4, 100  # f < n/2
    rng = np.random.default_rng(7)
    g = rng.normal(size=d).astype(np.float32)
    mu = 0.05 * rng.normal(size=d)
    deltas = mu + 0.05 * rng.normal(size=(n, d))
    benign_mean = deltas[f:].mean(axis=0)
    directions = rng.normal(size=(f, d))
    deltas[:f] = scale * directions / np.linalg.norm(directions, axis=1, keepdims=True)
    w = (g + deltas).astype(np.float32)
    env = make_env(n, d, num_malicious=f)
    out, _, weights = _run(name, env, w, make_ctx(g, n), **ROBUST.get(name, {}))
    dist = np.linalg.norm((out - g) - benign_mean)
    if name == "fedavg":
        assert dist > 100.0
    else:
        assert dist < BOUND, f"{name}: {dist}"
        if name in ("krum", "multikrum"):
            np.testing.assert_array_equal(weights[:f], 0.0)
