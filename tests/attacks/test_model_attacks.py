"""Model attacks against float64 NumPy oracles, plus the contract every model attack keeps.

Setup: n = 10 clients, the last m = 3 malicious (like the reference), d = 48.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmc_jax.attacks import REGISTRY, AttackEnv, DataAttack, ModelAttack, get_attack, parse_attack
from spmc_jax.attacks.min_max_sum import agnostic_update, bisection_steps
from tests.reference import attacks_oracle as oracle

N, M, D = 10, 3, 48
ENV = AttackEnv((32, 32, 3), (0.5,) * 3, (0.25,) * 3, num_malicious=M, n_clients=N)
MAL = np.arange(N) >= N - M
BEN = ~MAL
MODEL_ATTACKS = [n for n, s in REGISTRY.items() if s.kind == "model"]
# float32 results vs float64 oracles on O(1) values: a few ulps of float32 times O(10)
# accumulated operations.
RTOL, ATOL = 1e-5, 1e-5
# objective, dev, lam_init, threshold, bound are static (Python strings/floats).
agnostic = jax.jit(
    agnostic_update, static_argnames=("objective", "dev", "lam_init", "threshold", "bound")
)


def _problem(seed=0, scale=1.0, n=N):
    """Global model g and client models W = g + U with a shared benign direction."""
    rng = np.random.default_rng(seed)
    g = rng.normal(size=D).astype(np.float32)
    common = rng.normal(size=D)
    U = scale * (common + 0.5 * rng.normal(size=(n, D)))
    W = (g + U).astype(np.float32)
    return jnp.asarray(W), jnp.asarray(g)


def _run(attack: ModelAttack, W, g, malicious=MAL, key=0):
    return jax.jit(attack.apply)(W, g, jnp.asarray(malicious), jax.random.key(key))


def _updates(W, g) -> np.ndarray:
    """Updates as the attacks see them (float32 subtraction, then float64)."""
    return np.asarray(W - g, np.float64)


# ------------------------------------------------------------------------------ contracts


@pytest.mark.parametrize("name", MODEL_ATTACKS)
def test_benign_rows_bit_identical_and_deterministic(name):
    attack = get_attack(name, ENV)
    assert isinstance(attack, ModelAttack)
    W, g = _problem()
    out = _run(attack, W, g, key=1)
    assert out.shape == W.shape and out.dtype == W.dtype
    np.testing.assert_array_equal(np.asarray(out)[BEN], np.asarray(W)[BEN])
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_array_equal(np.asarray(_run(attack, W, g, key=1)), np.asarray(out))
    # No malicious rows: the matrix passes through unchanged.
    np.testing.assert_array_equal(
        np.asarray(_run(attack, W, g, malicious=np.zeros(N, bool))), np.asarray(W)
    )


@pytest.mark.parametrize("name", ["alie", "ipm", "min_max", "min_sum", "fang_krum", "mimic"])
def test_omniscient_attacks_ignore_malicious_inputs_and_agree(name):
    attack = get_attack(name, ENV)
    W, g = _problem()
    out = np.asarray(_run(attack, W, g))
    # Replace the malicious clients' own models: statistics come from benign rows only.
    W2 = W.at[MAL].set(1e3)
    np.testing.assert_array_equal(np.asarray(_run(attack, W2, g)), out)
    # All malicious clients send the same vector.
    np.testing.assert_array_equal(out[MAL], np.broadcast_to(out[MAL][0], out[MAL].shape))


# --------------------------------------------------------------------- formula attacks


def test_scaling_default_boost_is_n_over_m():
    W, g = _problem()
    out = np.asarray(_run(get_attack("scaling", ENV), W, g))
    U = _updates(W, g)
    want = np.asarray(g, np.float64) + (N / M) * U[MAL]
    np.testing.assert_allclose(out[MAL], want, rtol=RTOL, atol=ATOL)


def test_scaling_explicit_boost_and_sign_flip():
    W, g = _problem()
    U, g64 = _updates(W, g), np.asarray(g, np.float64)
    out = np.asarray(_run(get_attack("scaling", ENV, boost=5.0), W, g))
    np.testing.assert_allclose(out[MAL], g64 + 5.0 * U[MAL], rtol=RTOL, atol=ATOL)
    out = np.asarray(_run(get_attack("sign_flip", ENV), W, g))
    np.testing.assert_allclose(out[MAL], g64 - U[MAL], rtol=RTOL, atol=ATOL)
    out = np.asarray(_run(get_attack("sign_flip", ENV, scale=3.0), W, g))
    np.testing.assert_allclose(out[MAL], g64 - 3.0 * U[MAL], rtol=RTOL, atol=ATOL)


def test_gaussian_replace_and_add():
    d = 20_000
    rng = np.random.default_rng(1)
    g = jnp.asarray(rng.normal(size=d), jnp.float32)
    W = g + jnp.asarray(rng.normal(size=(N, d)), jnp.float32)
    rep = get_attack("gaussian", ENV, sigma=2.0)
    add = get_attack("gaussian", ENV, sigma=2.0, mode="add")
    noise = np.asarray(_run(rep, W, g, key=3) - g, np.float64)[MAL]
    # 3 x 20000 draws: the sample std is within ~0.3% (1 std of its estimator) of sigma;
    # 2% is ~7 estimator stds. The mean's std is 2/sqrt(60000) ~ 0.008; 0.05 is ~6 stds.
    assert abs(noise.std() / 2.0 - 1.0) < 0.02
    assert abs(noise.mean()) < 0.05
    assert not np.allclose(noise[0], noise[1])  # independent per client
    # "replace" ignores the malicious models; "add" adds the same draw to them.
    np.testing.assert_array_equal(
        np.asarray(_run(rep, W.at[MAL].set(0.0), g, key=3)), np.asarray(_run(rep, W, g, key=3))
    )
    added = np.asarray(_run(add, W, g, key=3) - W, np.float64)[MAL]
    # Both are the same float32 noise, rounded through different O(1) offsets.
    np.testing.assert_allclose(added, noise, atol=1e-5)
    assert not np.array_equal(
        np.asarray(_run(rep, W, g, key=4)), np.asarray(_run(rep, W, g, key=3))
    )


def test_ipm_direction():
    W, g = _problem()
    for eps in (0.1, 0.5):
        out = np.asarray(_run(get_attack("ipm", ENV, epsilon=eps), W, g))
        want = np.asarray(g, np.float64) + oracle.ipm_update(_updates(W, g), BEN, eps)
        np.testing.assert_allclose(out[MAL], np.broadcast_to(want, (M, D)), rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------------------------ alie


def test_alie_z_values():
    from spmc_jax.attacks.alie import alie_z

    # Hand-checked: Phi^-1(0.7) = 0.524400512708, Phi^-1(0.6) = 0.253347103136.
    assert alie_z(10, 3) == pytest.approx(0.524400512708, abs=1e-9)
    assert alie_z(10, 2) == pytest.approx(0.253347103136, abs=1e-9)
    for n, m in [(10, 1), (10, 4), (20, 5), (7, 3), (100, 20)]:
        assert alie_z(n, m) == pytest.approx(oracle.alie_z(n, m), abs=1e-9)
        assert alie_z(n, m, reference=True) == pytest.approx(oracle.alie_z(n, m, True), rel=1e-12)
    # Reference z for n = 10, m = 3 (spec §5): (sqrt(2 pi)/2) exp(-9) ~ 1.5467e-4.
    assert alie_z(10, 3, reference=True) == pytest.approx(1.5467e-4, rel=1e-4)
    with pytest.raises(ValueError):
        alie_z(10, 6)


@pytest.mark.parametrize(
    ("opts", "z"),
    [
        ({}, oracle.alie_z(N, M)),
        ({"reference_z": True}, oracle.alie_z(N, M, True)),
        ({"z": 1.5}, 1.5),
    ],
)
def test_alie_update(opts, z):
    W, g = _problem()
    out = np.asarray(_run(get_attack("alie", ENV, **opts), W, g))
    want = np.asarray(g, np.float64) + oracle.alie_update(_updates(W, g), BEN, z)
    np.testing.assert_allclose(out[MAL], np.broadcast_to(want, (M, D)), rtol=RTOL, atol=ATOL)


def test_alie_ignores_non_finite_benign_rows():
    W, g = _problem()
    Wn = W.at[0].set(jnp.nan)
    out = np.asarray(_run(get_attack("alie", ENV), Wn, g))
    assert np.isnan(out[0]).all()  # benign row kept as is
    used = BEN.copy()
    used[0] = False
    want = np.asarray(g, np.float64) + oracle.alie_update(_updates(W, g), used, oracle.alie_z(N, M))
    np.testing.assert_allclose(out[MAL], np.broadcast_to(want, (M, D)), rtol=RTOL, atol=ATOL)


def test_alie_rejects_bad_options():
    with pytest.raises(ValueError):
        get_attack("alie", AttackEnv((32, 32, 3), (0.5,) * 3, (0.25,) * 3, num_malicious=6))
    with pytest.raises(ValueError):
        get_attack("alie", ENV, z=-1.0)
    with pytest.raises(ValueError):
        get_attack("alie", ENV, z=1.0, reference_z=True)


# ----------------------------------------------------------------------- min-max / min-sum

# Relative slack on the constraint check: float32 distances of O(1e2) values.
CONSTRAINT_RTOL = 1e-5
# lambda's float32 error from deciding feasibility on float32 distances near the boundary.
LAMBDA_FLOAT_TOL = 1e-4


@pytest.mark.parametrize(("objective", "bound"), [("max", "max"), ("sum", "max"), ("sum", "min")])
@pytest.mark.parametrize("dev", ["std", "unit_vec", "sign"])
@pytest.mark.parametrize("scale", [1.0, 0.05])
def test_agnostic_lambda_feasible_and_maximal(objective, bound, dev, scale):
    W, g = _problem(seed=2, scale=scale)
    U = _updates(W, g)
    u_mal, lam = agnostic(W - g, jnp.asarray(BEN), objective=objective, dev=dev, bound=bound)
    u_mal, lam = np.asarray(u_mal, np.float64), float(lam)
    # The returned vector is mu - lam dev.
    mu = U[BEN].mean(axis=0)
    np.testing.assert_allclose(
        u_mal, mu - lam * oracle.deviation(U, BEN, dev), rtol=RTOL, atol=ATOL
    )
    # Constraint satisfied (float64 check).
    rhs = oracle.agnostic_bound(U, BEN, objective, bound)
    assert oracle.agnostic_objective(u_mal, U, BEN, objective) <= rhs * (1 + CONSTRAINT_RTOL)
    # Maximal up to the bisection threshold, within the searched range [0, 20).
    star = oracle.agnostic_lambda_star(U, BEN, objective, dev, bound)
    ceiling = 20.0 - 10.0 / 2 ** (bisection_steps(10.0, 1e-5) - 1)  # last lambda tried
    assert lam >= min(star, ceiling) - 1e-5 - LAMBDA_FLOAT_TOL * max(star, 1.0)
    assert lam <= star + LAMBDA_FLOAT_TOL * max(star, 1.0)
    # Same lambda as the reference's loop run literally in float64.
    ref = oracle.agnostic_reference_lambda(U, BEN, objective, dev, bound=bound)
    assert abs(lam - ref) <= 1e-5 + LAMBDA_FLOAT_TOL * max(star, 1.0)


def test_agnostic_large_lambda_hits_the_search_ceiling():
    # unit_vec with large updates: the exact lambda* is far above 2 * lam_init.
    W, g = _problem(scale=100.0)
    U = _updates(W, g)
    assert oracle.agnostic_lambda_star(U, BEN, "max", "unit_vec") > 100
    _, lam = agnostic(W - g, jnp.asarray(BEN), objective="max", dev="unit_vec")
    # The last of the 20 lambdas tried, 20 - 10/2^19, exactly representable in float32.
    assert float(lam) == 20.0 - 10.0 / 2**19


def test_bisection_steps():
    assert bisection_steps(10.0, 1e-5) == 20  # 10/2^20 < 1e-5 < 10/2^19
    assert bisection_steps(1.0, 0.5) == 1
    assert bisection_steps(1.0, 2.0) == 0


@pytest.mark.parametrize("name", ["min_max", "min_sum"])
def test_agnostic_attack_writes_g_plus_update(name):
    W, g = _problem(seed=3)
    out = np.asarray(_run(get_attack(name, ENV), W, g))
    u, _ = agnostic(W - g, jnp.asarray(BEN), objective="max" if name == "min_max" else "sum")
    want = np.asarray(g + u, np.float64)
    np.testing.assert_allclose(out[MAL], np.broadcast_to(want, (M, D)), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "opts", [{"dev": "gauss"}, {"lam_init": 0.0}, {"threshold": -1.0}, {"lamda": 10.0}]
)
def test_agnostic_rejects_bad_options(opts):
    with pytest.raises(ValueError):
        get_attack("min_max", ENV, **opts)
    with pytest.raises(ValueError):
        get_attack("min_sum", ENV, **opts)


def test_min_sum_bound_option():
    W, g = _problem(seed=4)
    U = _updates(W, g)
    lo = np.asarray(_run(get_attack("min_sum", ENV, bound="min"), W, g))[MAL][0]
    hi = np.asarray(_run(get_attack("min_sum", ENV), W, g))[MAL][0]
    mu, dev = U[BEN].mean(axis=0), oracle.deviation(U, BEN, "std")
    lam = lambda u: float((mu - (u - np.asarray(g, np.float64))) @ dev / (dev @ dev))
    assert lam(lo) < lam(hi)  # the authors'-code bound is the stricter one
    with pytest.raises(ValueError):
        get_attack("min_sum", ENV, bound="median")


# -------------------------------------------------------------------------------------- pgd


def test_pgd_explicit_radius():
    W, g = _problem()
    U = _updates(W, g)
    norms = np.linalg.norm(U, axis=1)
    r = float(np.median(norms[MAL]))  # one malicious row inside, others outside
    out = np.asarray(_run(get_attack("pgd", ENV, radius=r), W, g))
    want = np.asarray(g, np.float64) + oracle.project_l2(U[MAL], r)
    np.testing.assert_allclose(out[MAL], want, rtol=RTOL, atol=ATOL)
    inside = MAL & (norms <= r)
    assert inside.any()
    np.testing.assert_array_equal(out[inside], np.asarray(W)[inside])  # untouched, exactly


@pytest.mark.parametrize("m", [3, 4])  # 7 (odd) and 6 (even) benign rows
def test_pgd_default_radius_is_median_benign_norm(m):
    mal = np.arange(N) >= N - m
    W, g = _problem()
    W = W.at[mal].set(g + 10.0 * (W[mal] - g))  # boosted, so all are projected
    U = _updates(W, g)
    r = float(np.median(np.linalg.norm(U[~mal], axis=1)))
    out = np.asarray(_run(get_attack("pgd", ENV), W, g, malicious=mal))
    want = np.asarray(g, np.float64) + oracle.project_l2(U[mal], r)
    np.testing.assert_allclose(out[mal], want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.linalg.norm(out[mal] - np.asarray(g), axis=1), r, rtol=1e-5)


# -------------------------------------------------------------------- options, composition


@pytest.mark.parametrize(
    ("name", "opts"),
    [
        ("scaling", {"boost": -1.0}),
        ("sign_flip", {"scale": 0.0}),
        ("gaussian", {"sigma": -1.0}),
        ("gaussian", {"mode": "mix"}),
        ("ipm", {"epsilon": 0.0}),
        ("pgd", {"radius": "big"}),
    ],
)
def test_model_attacks_reject_bad_options(name, opts):
    with pytest.raises(ValueError):
        get_attack(name, ENV, **opts)


def test_parse_attack_composition():
    data, models = parse_attack("base+scaling", ENV)
    assert isinstance(data, DataAttack) and len(models) == 1
    assert isinstance(models[0], ModelAttack)
    # CLI-style string options are coerced; model attacks apply in order.
    data, models = parse_attack(
        "badnets+scaling+pgd", ENV, {"scaling": {"boost": "5"}, "pgd": {"radius": "0.5"}}
    )
    assert isinstance(data, DataAttack) and len(models) == 2
    W, g = _problem()
    out = W
    for attack in models:
        out = _run(attack, out, g)
    U = _updates(W, g)
    want = np.asarray(g, np.float64) + oracle.project_l2(5.0 * U[MAL], 0.5)
    np.testing.assert_allclose(np.asarray(out)[MAL], want, rtol=RTOL, atol=ATOL)
    assert parse_attack("none", ENV) == (None, [])
    with pytest.raises(ValueError):
        parse_attack("badnets+dba", ENV)


def test_registry_listing():
    ours = {
        "badnets",
        "blended",
        "dba",
        "label_flip_pair",
        "label_flip_sym",
        "scaling",
        "sign_flip",
        "gaussian",
        "alie",
        "ipm",
        "min_max",
        "min_sum",
        "pgd",
    }
    items = dict(REGISTRY.items())
    assert ours <= set(items)
    for name, spec in items.items():
        assert spec.name == name and spec.kind in ("data", "model", "client", "client_data")
        assert spec.summary and "\n" not in spec.summary
        if name != "none":
            assert spec.paper, name
