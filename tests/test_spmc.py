"""SPMC math (spmc_jax.spmc) and its registered server rule, against float64 oracles."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmc_jax import spmc
from spmc_jax.aggregators import AggregatorEnv, RoundContext, get_aggregator
from tests.reference import spmc_oracle as oracle

# ----------------------------------------------------------------------------- tolerances
# Projection: one float32 multiply-add per coordinate on O(1) values plus a float32 inner
# product of <= 60 terms for the coefficient -> relative error a few 1e-7.
PROJ_RTOL, PROJ_ATOL = 2e-6, 2e-6
# Orthogonality after λ = 1, relative to ‖G_d‖·‖G_g‖: float32 rounding of the result and
# of the check's own dot product (<= 60 terms).
ORTHO_REL = 1e-5
# Cosines are returned in float32 near 1, where one ulp is 6e-8; the centred formula is
# measured at <= 2 ulps on these inputs (the textbook closed form in float32 is ~20-200x
# worse, see loo_cosines' docstring). 4e-7 leaves margin for other CPUs/BLAS.
COS_ATOL = 4e-7
# α = softmax(φ): an absolute error δ in φ is a relative error <= 2δ in α.
ALPHA_RTOL = 1e-6
# Aggregates and teachers: float32 sums of O(10) rows; errors are relative to the largest
# weight magnitude (a few ulps of max |w|).
MODEL_ATOL_REL = 1e-6


def _close_model(actual, expected, scale):
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), expected, rtol=0, atol=MODEL_ATOL_REL * scale
    )


# Everything is called through jit: eager JAX compiles every primitive separately, which
# makes op-by-op calls slower than one compile per function and shape.
_project = jax.jit(spmc.project)
_project_stats = jax.jit(spmc.project_stats)
_teachers = jax.jit(spmc.teachers)
_weights = jax.jit(spmc.margin_weights, static_argnames="temperature")


@functools.cache
def _server(mask_name, d, space="weights", temperature=1.0, with_valid=False):
    """One jitted function (one compile per shape) -> (φ, new_global, α)."""
    mask = _masks(d)[mask_name]

    def run(w, g, valid=None):
        ref = g if space == "updates" else None
        cos = spmc.loo_cosines(w, mask, ref, valid)
        new_global, alpha = spmc.margin_contribution(w, mask, temperature, space, g, valid)
        return cos, new_global, alpha

    if with_valid:
        return jax.jit(run)
    return jax.jit(lambda w, g: run(w, g))


# ----------------------------------------------------------------------------- projection

SHAPES = [(), (3,), (4, 5), (2, 3, 3, 2), (7, 1)]


def _grad_pair(seed, mode):
    """(g_data, g_guide) dicts; mode per leaf: 'conflict', 'agree', 'zero_guide', 'zero_data'."""
    rng = np.random.default_rng(seed)
    gd, gg = {}, {}
    for i, (shape, m) in enumerate(zip(SHAPES, mode, strict=True)):
        a = rng.normal(size=shape).astype(np.float32)
        noise = rng.normal(size=shape).astype(np.float32)
        if m == "conflict":
            b = -a + 0.3 * noise
        elif m == "agree":
            b = a + 0.3 * noise
        elif m == "zero_guide":
            b = np.zeros(shape, np.float32)
        else:  # zero_data
            b, a = noise, np.zeros(shape, np.float32)
        gd[f"l{i}"], gg[f"l{i}"] = np.asarray(a), np.asarray(b, np.float32)
    return gd, gg


MODES = [
    ("conflict", "conflict", "conflict", "conflict", "conflict"),
    ("agree", "conflict", "agree", "zero_guide", "zero_data"),
    ("zero_data", "zero_guide", "conflict", "agree", "conflict"),
]


def _expected(gd, gg, lam):
    keys = sorted(gd)
    leaves, count = oracle.project([gd[k] for k in keys], [gg[k] for k in keys], lam)
    return dict(zip(keys, leaves, strict=True)), count


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("mode", MODES)
def test_project_matches_oracle(lam, mode):
    gd, gg = _grad_pair(1, mode)
    out = _project(gd, gg, lam)
    want, count = _expected(gd, gg, lam)
    for k in gd:
        assert out[k].shape == gd[k].shape and out[k].dtype == jnp.float32
        np.testing.assert_allclose(out[k], want[k], rtol=PROJ_RTOL, atol=PROJ_ATOL)
        _, hit = oracle.project_leaf(gd[k], gg[k], lam)
        if not hit or lam == 0.0:
            # Untouched leaves come back bit-identical (no rounding through the projection).
            np.testing.assert_array_equal(np.asarray(out[k]), gd[k])
        elif lam == 1.0:
            g, guide = np.asarray(out[k], np.float64), gg[k].astype(np.float64)
            scale = np.linalg.norm(gd[k]) * np.linalg.norm(guide)
            assert abs(np.sum(g * guide)) <= ORTHO_REL * scale
    assert int(_project_stats(gd, gg)) == count


def test_project_counts_conflicts_by_hand():
    gd = {"a": jnp.array([1.0, 0.0]), "b": jnp.array([1.0, 1.0]), "c": jnp.zeros(2)}
    gg = {"a": jnp.array([-1.0, 1.0]), "b": jnp.array([1.0, 0.0]), "c": jnp.array([-1.0, 0.0])}
    out = _project(gd, gg, 1.0)
    # a: ⟨G_d,G_g⟩ = -1 < 0 -> G_d − (−1/2)·G_g = [0.5, 0.5]; b agrees; c has G_d = 0.
    np.testing.assert_allclose(out["a"], [0.5, 0.5], rtol=0, atol=1e-7)
    np.testing.assert_array_equal(out["b"], gd["b"])
    np.testing.assert_array_equal(out["c"], gd["c"])
    assert int(_project_stats(gd, gg)) == 1


def test_project_extreme_scales_still_project():
    # ‖G_g‖² of 1e-30-sized entries underflows in float32; the max-abs scaling keeps the
    # direction, as the reference's unit-vector form does (in float64 here via the oracle).
    rng = np.random.default_rng(3)
    a = rng.normal(size=(6, 4)).astype(np.float32)
    b = (-a + 0.5 * rng.normal(size=(6, 4))).astype(np.float32)
    for sd, sg in [(1.0, 1e-30), (1e30, 1.0), (1e-30, 1e30)]:
        gd, gg = a * np.float32(sd), b * np.float32(sg)
        out = _project({"w": gd}, {"w": gg}, 1.0)["w"]
        want, hit = oracle.project_leaf(gd, gg, 1.0)
        assert hit
        np.testing.assert_allclose(out, want, rtol=PROJ_RTOL, atol=PROJ_ATOL * sd)


def test_project_vmap_and_traced_lambda():
    batch = [_grad_pair(s, MODES[s % 3]) for s in range(4)]
    gd = jax.tree.map(lambda *x: jnp.stack(x), *[b[0] for b in batch])
    gg = jax.tree.map(lambda *x: jnp.stack(x), *[b[1] for b in batch])
    lams = jnp.array([0.0, 0.5, 1.0, 0.25])
    out = jax.jit(jax.vmap(spmc.project))(gd, gg, lams)
    counts = jax.jit(jax.vmap(spmc.project_stats))(gd, gg)
    for i, (bd, bg) in enumerate(batch):
        want, count = _expected(bd, bg, float(lams[i]))
        assert int(counts[i]) == count
        for k in bd:
            np.testing.assert_allclose(out[k][i], want[k], rtol=PROJ_RTOL, atol=PROJ_ATOL)


def test_project_preserves_dtype_and_nan_passes_through():
    gd = {"h": jnp.array([1.0, -2.0], jnp.bfloat16), "n": jnp.array([jnp.nan, 1.0])}
    gg = {"h": jnp.array([-1.0, 1.0], jnp.bfloat16), "n": jnp.array([-1.0, -1.0])}
    out = _project(gd, gg)
    assert out["h"].dtype == jnp.bfloat16
    # ⟨G_d,G_g⟩ = −3 < 0: [1,−2] − (−3/2)·[−1,1] = [−0.5, −0.5] (exact in bfloat16).
    np.testing.assert_array_equal(np.asarray(out["h"], np.float32), [-0.5, -0.5])
    # A NaN cosine compares False in the reference: the tensor is left as it is.
    np.testing.assert_array_equal(np.isnan(np.asarray(out["n"])), [True, False])


@pytest.mark.parametrize("lam", [-0.5, float("nan"), float("inf")])
def test_project_rejects_bad_lambda(lam):
    with pytest.raises(ValueError, match="lam"):
        spmc.project({"a": jnp.ones(2)}, {"a": jnp.ones(2)}, lam)


# ------------------------------------------------------------------ server-side fixtures


def _realistic(rng, n, d, pert=1e-2):
    """Shared base of norm ~14 plus per-client perturbations ~pert: cosines ~1, spread ~1e-3."""
    base = rng.normal(size=d)
    base *= 14.0 / np.linalg.norm(base)
    w = (base + pert * rng.normal(size=(n, d))).astype(np.float32)
    glob = (base + pert * rng.normal(size=d)).astype(np.float32)
    return w, glob


def _generic(rng, n, d):
    w = rng.normal(size=(n, d)).astype(np.float32)
    return w, rng.normal(size=d).astype(np.float32)


def _masks(d):
    prefix = np.zeros(d, bool)
    prefix[: d - d // 7] = True  # Flattener layout: parameters first, then BN statistics
    scattered = np.random.default_rng(9).random(d) < 0.8
    return {"none": None, "prefix": prefix, "scattered": scattered}


D = 384


# (n, space, mask): every n in both spaces with both mask layouts, plus no mask at n = 10.
CASES = [
    (n, space, mask)
    for n in (2, 3, 10, 257)
    for space in ("weights", "updates")
    for mask in ("prefix", "scattered")
] + [(10, "weights", "none"), (10, "updates", "none")]


@pytest.mark.parametrize(("n", "space", "mask_name"), CASES)
def test_loo_and_margin_contribution_match_naive(n, space, mask_name):
    fn = _server(mask_name, D, space)
    mask = _masks(D)[mask_name]
    for kind in ("realistic", "generic"):
        rng = np.random.default_rng(n * 7 + len(kind) + len(space))
        w, glob = (_realistic if kind == "realistic" else _generic)(rng, n, D)
        ref = glob if space == "updates" else None
        cos, new_global, alpha = fn(w, glob)
        want_cos = oracle.loo_cosines(w, mask, ref)
        np.testing.assert_allclose(cos, want_cos, rtol=0, atol=COS_ATOL)
        want_alpha = oracle.margin_weights(want_cos)
        want_g = sum(a * row for a, row in zip(want_alpha, w.astype(np.float64), strict=True))
        np.testing.assert_allclose(alpha, want_alpha, rtol=ALPHA_RTOL, atol=0)
        _close_model(new_global, want_g, np.abs(w).max())


def test_realistic_scores_are_resolved():
    # The test above is only meaningful if the signal (spread of φ) dwarfs the tolerance.
    w, _ = _realistic(np.random.default_rng(0), 10, D)
    want = oracle.loo_cosines(w)
    assert np.ptp(want) > 50 * COS_ATOL
    assert np.all(want > 0.99)


def test_loo_large_d_hard_case():
    # d = 2e5 with the 1e-3-spread case: the length-d float32 reductions are where the
    # textbook closed form loses the signal; the oracle is the float64 closed form here
    # (the naive loop is too slow at this size and agrees with it to ~1e-15).
    rng = np.random.default_rng(5)
    n, d = 6, 200_000
    w, _ = _realistic(rng, n, d, pert=3e-3)
    w64 = w.astype(np.float64)
    gam = (w64.sum(0) - w64) / (n - 1)
    want = np.einsum("ij,ij->i", w64, gam) / (
        np.linalg.norm(w64, axis=1) * np.linalg.norm(gam, axis=1) + oracle.COS_EPS
    )
    cos = jax.jit(spmc.loo_cosines)(w)
    assert np.ptp(want) > 50 * COS_ATOL
    np.testing.assert_allclose(cos, want, rtol=0, atol=COS_ATOL)


# The remaining server tests share n = 6 clients and the `valid` variant: one compile each
# for the two spaces.
N6 = 6
ALL6 = np.ones(N6, bool)


def test_zero_update_row_scores_zero_and_valid_mask():
    rng = np.random.default_rng(2)
    w, glob = _realistic(rng, N6, D)
    w[1] = glob  # a client that did not move: x_1 = 0 in the updates space
    cos, _, _ = _server("none", D, "updates", with_valid=True)(w, glob, ALL6)
    assert float(cos[1]) == 0.0
    np.testing.assert_allclose(cos, oracle.loo_cosines(w, reference=glob), rtol=0, atol=COS_ATOL)

    # Invalid rows (finite garbage here) leave every Γ_i and get α = 0.
    w[3] = 1e3
    valid = np.array([True, True, True, False, True, True])
    for space in ("weights", "updates"):
        ref = glob if space == "updates" else None
        _, g, alpha = _server("none", D, space, with_valid=True)(w, glob, valid)
        want_g, want_alpha = oracle.margin_contribution(w, None, 1.0, ref, valid)
        assert float(alpha[3]) == 0.0
        np.testing.assert_allclose(alpha, want_alpha, rtol=ALPHA_RTOL, atol=0)
        _close_model(g, want_g, 14.0)
        # ... which is the same as dropping the row.
        _, sub_alpha = oracle.margin_contribution(w[valid], None, 1.0, ref)
        np.testing.assert_allclose(want_alpha[valid], sub_alpha, rtol=1e-12)


def test_fewer_than_two_valid_clients():
    w, glob = _generic(np.random.default_rng(4), N6, D)
    fn = _server("none", D, "weights", with_valid=True)
    one = np.zeros(N6, bool)
    one[2] = True
    cos, g, alpha = fn(w, glob, one)
    np.testing.assert_array_equal(cos, np.zeros(N6))
    np.testing.assert_array_equal(alpha, one.astype(np.float32))
    np.testing.assert_allclose(g, w[2], rtol=0, atol=1e-7)
    cos, g, alpha = fn(w, glob, np.zeros(N6, bool))
    np.testing.assert_array_equal(alpha, np.zeros(N6))
    np.testing.assert_array_equal(g, glob)


def test_permutation_equivariance():
    rng = np.random.default_rng(6)
    w, glob = _realistic(rng, N6, D)
    perm = rng.permutation(N6)
    for space in ("weights", "updates"):
        fn = _server("none", D, space, with_valid=True)
        _, g, alpha = fn(w, glob, ALL6)
        _, gp, alpha_p = fn(w[perm], glob, ALL6)
        np.testing.assert_allclose(alpha_p, alpha[perm], rtol=ALPHA_RTOL, atol=0)
        _close_model(gp, np.asarray(g, np.float64), 14.0)


def test_identical_clients_give_uniform_weights():
    row = np.random.default_rng(7).normal(size=D).astype(np.float32)
    w = np.tile(row, (N6, 1))
    _, g, alpha = _server("none", D, "weights", with_valid=True)(w, row, ALL6)
    np.testing.assert_array_equal(alpha, np.full(N6, alpha[0]))
    np.testing.assert_allclose(alpha, 1 / N6, rtol=ALPHA_RTOL)
    _close_model(g, row.astype(np.float64), np.abs(row).max())


def test_temperature_flattens_weights():
    w, glob = _generic(np.random.default_rng(8), N6, D)
    cos, _, _ = _server("none", D, "weights", with_valid=True)(w, glob, ALL6)
    spreads = []
    for t in [0.01, 0.1, 1.0, 10.0, 1000.0]:
        alpha = np.asarray(_weights(cos, temperature=t))
        # float32 exp of z = φ/T is off by ~|z|·eps32 relatively (the rounding of z).
        rtol = 2 * np.finfo(np.float32).eps * (1 + np.abs(np.asarray(cos)).max() / t)
        np.testing.assert_allclose(alpha, oracle.margin_weights(cos, t), rtol=rtol)
        spreads.append(np.ptp(alpha))
    assert all(a > b for a, b in itertools.pairwise(spreads))
    assert spreads[-1] < 1e-3 * spreads[0]


def test_margin_weights_valid_mask_by_hand():
    cos = jnp.array([0.0, np.log(2.0), 5.0])
    alpha = jax.jit(spmc.margin_weights)(cos, 1.0, jnp.array([True, True, False]))
    np.testing.assert_allclose(alpha, [1 / 3, 2 / 3, 0.0], rtol=1e-6)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda w: spmc.loo_cosines(w[:1]), "n >= 2"),
        (lambda w: spmc.margin_weights(jnp.zeros(3), 0.0), "temperature"),
        (lambda w: spmc.margin_weights(jnp.zeros(3), -1.0), "temperature"),
        (lambda w: spmc.margin_contribution(w, space="deltas"), "weights, updates"),
        (lambda w: spmc.margin_contribution(w, space="updates"), "global_flat"),
        (lambda w: spmc.loo_cosines(w, np.ones(5, bool)), "compare_mask"),
        (lambda w: spmc.loo_cosines(w, np.ones(8, np.float32)), "compare_mask"),
        (lambda w: spmc.loo_cosines(w, np.zeros(8, bool)), "no coordinate"),
        (lambda w: spmc.teachers(w[0], w, jnp.ones(2)), "shapes"),
    ],
)
def test_bad_inputs_raise(call, match):
    w = jnp.ones((3, 8))
    with pytest.raises(ValueError, match=match):
        call(w)


# ------------------------------------------------------------------------------ teachers


def _alphas(n, rng):
    yield "dirichlet", rng.dirichlet(np.ones(n)).astype(np.float32)
    yield "uniform", np.full(n, 1.0 / n, np.float32)
    big = np.full(n, 0.03 / (n - 1), np.float32)
    big[n // 2] = 0.97
    yield "one_large", big / big.sum()
    tiny = np.full(n, 1e-6 / (n - 1), np.float32)
    tiny[0] = 1.0 - 1e-6
    yield "nearly_one_hot", tiny


@pytest.mark.parametrize("n", [2, 3, 10])
def test_teachers_match_oracle(n):
    rng = np.random.default_rng(n)
    w, _ = _realistic(rng, n, D)
    for name, alpha in _alphas(n, rng):
        g = jnp.matmul(alpha, w, precision=jax.lax.Precision.HIGHEST)
        out = _teachers(g, w, alpha)
        want = oracle.teachers(w, alpha)
        assert out.shape == (n, D), name
        _close_model(out, want, 14.0)
        if name != "nearly_one_hot":
            # The reference's marginal form equals the Σ-form (away from α_i → 1).
            # (float64 α renormalised: the identity needs Σα = 1 exactly.)
            a64 = alpha.astype(np.float64) / alpha.astype(np.float64).sum()
            form = oracle.teachers_marginal_form(a64 @ w, w, a64)
            np.testing.assert_allclose(form, oracle.teachers(w, a64), rtol=0, atol=1e-12)


def test_teachers_uniform_is_leave_one_out_mean_and_degenerate_cases():
    rng = np.random.default_rng(11)
    w, _ = _generic(rng, 5, D)
    alpha = np.full(5, 0.2, np.float32)
    g = w.mean(0)
    loo = (w.astype(np.float64).sum(0) - w) / 4
    _close_model(_teachers(g, w, alpha), loo, np.abs(w).max())
    # One-hot α (a single valid client): every teacher is g.
    onehot = np.array([0, 0, 1, 0, 0], np.float32)
    out = _teachers(w[2], w, onehot)
    np.testing.assert_array_equal(out, np.tile(w[2], (5, 1)))
    # α_i = 0 (invalid client): T_i = g exactly.
    alpha = np.array([0.5, 0.0, 0.25, 0.25, 0.0], np.float32)
    g = alpha @ w
    out = _teachers(g, w, alpha)
    np.testing.assert_array_equal(out[1], g)
    np.testing.assert_array_equal(out[4], g)


def test_teachers_from_margin_contribution():
    w, glob = _realistic(np.random.default_rng(12), N6, D)
    _, g, alpha = _server("none", D, "weights", with_valid=True)(w, glob, ALL6)
    out = _teachers(g, w, alpha)
    _close_model(out, oracle.teachers(w, np.asarray(alpha, np.float64)), 14.0)


# ------------------------------------------------------------------------------ registry


def _env(d, n):
    mask = np.zeros(d, bool)
    mask[: d - 24] = True
    return AggregatorEnv(n_clients=n, num_malicious=2, lr=0.01, rounds=50, param_mask=mask)


def _ctx(glob, n, valid=None):
    return RoundContext(
        global_flat=jnp.asarray(glob),
        round=jnp.int32(3),
        key=jax.random.key(0),
        n_samples=jnp.arange(1, n + 1, dtype=jnp.float32),
        valid=jnp.ones(n, bool) if valid is None else jnp.asarray(valid),
        client_ids=jnp.arange(n, dtype=jnp.int32),
    )


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"temperature": "0.5", "space": "updates"},
        {"compare_bn": True},
        {"server_weighting": "false"},
    ],
)
def test_registered_rule_under_jit(options):
    n = 10
    env = _env(D, n)
    w, glob = _realistic(np.random.default_rng(13), n, D)
    w[4, 7] = np.nan  # sanitised by get_aggregator: zero update, α = 0
    agg = get_aggregator("spmc", env, **options)
    state = agg.init(jnp.asarray(glob))
    new_global, state, info = jax.jit(agg.aggregate)(jnp.asarray(w), state, _ctx(glob, n))
    assert state == () and new_global.shape == (D,) and info.client_weights.shape == (n,)

    valid = np.ones(n, bool)
    valid[4] = False
    clean = w.copy()
    clean[4] = glob
    if options.get("server_weighting") == "false":
        want_alpha = np.where(valid, 1 / 9, 0.0)
        want_g = want_alpha @ clean.astype(np.float64)
    else:
        mask = None if options.get("compare_bn") else env.param_mask
        ref = glob if options.get("space") == "updates" else None
        t = float(options.get("temperature", 1.0))
        want_g, want_alpha = oracle.margin_contribution(clean, mask, t, ref, valid)
    np.testing.assert_allclose(info.client_weights, want_alpha, rtol=ALPHA_RTOL, atol=0)
    _close_model(new_global, want_g, 14.0)


@pytest.mark.parametrize(
    "options",
    [
        {"temperature": 0.0},
        {"temperature": -1.0},
        {"temperature": "abc"},
        {"temperature": float("inf")},
        {"space": "deltas"},
        {"server_weighting": "maybe"},
        {"compare_bn": 3},
        {"lam": 1.0},
    ],
)
def test_registered_rule_rejects_bad_options(options):
    with pytest.raises(ValueError):
        get_aggregator("spmc", _env(D, 4), **options)
