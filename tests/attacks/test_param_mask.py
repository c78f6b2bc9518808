"""Model attacks act on trainable parameters only (`AttackEnv.param_mask`).

Contract, for every registered model attack and a mask with False entries (posing as
BatchNorm statistics):

* entries outside the mask come out bit-identical to the trained W, malicious rows too;
* benign rows come out bit-identical;
* the masked entries equal the attack run with no mask on the parameter sub-matrix
  W[:, mask], g[mask] (the oracle relation: every statistic is over parameters only);
* param_mask=None and an all-True mask give exactly the unmasked behaviour.

Plus float64 oracle checks of the norm/distance-based attacks on the parameter columns, the
real `Flattener` layout (params first) and option/shape validation.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmc_jax.attacks import REGISTRY, AttackEnv, ModelAttack, get_attack, parse_attack
from spmc_jax.flat import Flattener
from tests.reference import attacks_oracle as oracle

N, M, D = 10, 3, 48
BASE = AttackEnv((32, 32, 3), (0.5,) * 3, (0.25,) * 3, num_malicious=M, n_clients=N)
MAL = np.arange(N) >= N - M
BEN = ~MAL
MODEL_ATTACKS = [n for n, s in REGISTRY.items() if s.kind == "model"]
# Options beyond the defaults that change what an attack reads: the model it starts from
# (gaussian "add"), a whole-vector norm (unit_vec) or a fixed instead of a median radius.
VARIANTS: dict[str, list[dict]] = {
    "gaussian": [{}, {"mode": "add"}],
    "min_max": [{}, {"dev": "unit_vec"}],
    "pgd": [{}, {"radius": 0.5}],
}
CASES = [
    pytest.param(name, opts, id=f"{name}-{i}")
    for name in MODEL_ATTACKS
    for i, opts in enumerate(VARIANTS.get(name, [{}]))
]


def _prefix_mask(d: int = D, n_stats: int = 12) -> np.ndarray:
    """The flat layout's mask: parameters first, then `n_stats` statistics."""
    mask = np.ones(d, bool)
    mask[d - n_stats :] = False
    return mask


def _scattered_mask(d: int = D) -> np.ndarray:
    """A non-contiguous mask (exercises the index gather/scatter path)."""
    mask = np.ones(d, bool)
    mask[[0, 5, 6, 17, 30, 31, 32, d - 1]] = False
    return mask


MASKS = {"prefix": _prefix_mask(), "scattered": _scattered_mask()}


def _env(mask: np.ndarray | None) -> AttackEnv:
    return dataclasses.replace(BASE, param_mask=mask)


def _problem(mask: np.ndarray, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    """Client models W = g + U; the non-parameter columns look like BatchNorm running
    variances: positive, O(100), and far from g, so any statistic that mixed them in (a
    norm, a distance, a unit vector) would change the parameter columns' result."""
    rng = np.random.default_rng(seed)
    g = rng.normal(size=D)
    U = rng.normal(size=D) + 0.5 * rng.normal(size=(N, D))
    U[MAL] *= 3.0  # boosted, so pgd's default ball (median benign norm) projects them all
    W = g + U
    stats = ~mask
    g[stats] = rng.uniform(50.0, 150.0, size=stats.sum())
    W[:, stats] = g[stats] + rng.uniform(20.0, 40.0, size=(N, stats.sum()))
    return jnp.asarray(W, jnp.float32), jnp.asarray(g, jnp.float32)


# Compilation dominates this file's run time; XLA's backend optimisations change no result
# compared here (each comparison is between programs compiled with the same options).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _run(attack: ModelAttack, W, g, malicious=MAL, key=0):
    fn = jax.jit(attack.apply, compiler_options=FAST_COMPILE)
    return np.asarray(fn(W, g, jnp.asarray(malicious), jax.random.key(key)))


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize(("name", "opts"), CASES)
def test_attack_touches_parameters_only(name, opts, mask_name):
    mask = MASKS[mask_name]
    W, g = _problem(mask)
    out = _run(get_attack(name, _env(mask), **opts), W, g, key=7)
    Wn = np.asarray(W)
    assert out.shape == Wn.shape and out.dtype == Wn.dtype
    # Statistics columns: every row keeps what the client trained, bit for bit.
    np.testing.assert_array_equal(out[:, ~mask], Wn[:, ~mask])
    np.testing.assert_array_equal(out[BEN], Wn[BEN])
    # Oracle relation: the same attack, unmasked, on the parameter sub-matrix (same key).
    sub = _run(get_attack(name, _env(None), **opts), W[:, mask], g[mask], key=7)
    np.testing.assert_array_equal(out[:, mask], sub)
    if name != "none":  # the attack did change the malicious parameters
        assert not np.array_equal(out[MAL][:, mask], Wn[MAL][:, mask])


@pytest.mark.parametrize("name", MODEL_ATTACKS)
def test_no_mask_and_all_true_mask_are_the_unmasked_attack(name):
    W, g = _problem(np.ones(D, bool), seed=1)
    plain = _run(get_attack(name, BASE), W, g, key=3)
    full = _run(get_attack(name, _env(np.ones(D, bool))), W, g, key=3)
    np.testing.assert_array_equal(full, plain)
    # With no mask the whole vector is attacked (the pre-mask behaviour).
    if name != "none":
        assert not np.array_equal(plain[MAL], np.asarray(W)[MAL])


# float32 results vs float64 oracles on O(1) parameter values (the O(100) statistics never
# enter the computation): a few ulps times O(10) operations.
RTOL, ATOL = 1e-5, 1e-5


def _full(W: jax.Array, mask: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Malicious rows as the oracle expects: `params` on the mask, W elsewhere."""
    return oracle.with_params(np.asarray(W, np.float64)[MAL], mask, params)


@pytest.mark.parametrize("mask_name", list(MASKS))
def test_norm_based_attacks_against_float64_oracle(mask_name):
    mask = MASKS[mask_name]
    W, g = _problem(mask, seed=2)
    env = _env(mask)
    U = np.asarray(W - g, np.float64)[:, mask]
    g64 = np.asarray(g, np.float64)[mask]
    # pgd, default radius: median l2 norm of the benign *parameter* updates.
    r = float(np.median(np.linalg.norm(U[BEN], axis=1)))
    boosted = W.at[MAL].set(g + 10.0 * (W[MAL] - g))  # scaled everywhere, so all projected
    Ub = np.asarray(boosted - g, np.float64)[:, mask]
    out = _run(get_attack("pgd", env), boosted, g)
    want = _full(boosted, mask, g64 + oracle.project_l2(Ub[MAL], r))
    np.testing.assert_allclose(out[MAL], want, rtol=RTOL, atol=ATOL)
    # min-max with unit_vec: the direction is normalised over the parameters.
    out = _run(get_attack("min_max", env, dev="unit_vec"), W, g)
    lam = oracle.agnostic_reference_lambda(U, BEN, "max", "unit_vec")
    mal = U[BEN].mean(axis=0) - lam * oracle.deviation(U, BEN, "unit_vec")
    # lambda is a bisection output: float32 feasibility decisions near the boundary can
    # move it by ~1e-4 relative, times O(1) entries of dev.
    np.testing.assert_allclose(
        out[MAL], _full(W, mask, np.broadcast_to(g64 + mal, (M, mask.sum()))), atol=1e-4
    )
    # scaling: the boost multiplies parameter updates only.
    out = _run(get_attack("scaling", env), W, g)
    want = _full(W, mask, g64 + (N / M) * U[MAL])
    np.testing.assert_allclose(out[MAL], want, rtol=RTOL, atol=ATOL)


def test_real_flat_layout_keeps_running_variances():
    """A Flattener over {'params', 'batch_stats'}: params come first, so the mask is a
    prefix, and the attacks leave the running variances as the client trained them."""
    variables = {
        "params": {
            "conv": {"kernel": np.zeros((3, 3, 2, 4), np.float32)},
            "bn": {"scale": np.ones(4, np.float32), "bias": np.zeros(4, np.float32)},
        },
        "batch_stats": {"bn": {"mean": np.zeros(4, np.float32), "var": np.ones(4, np.float32)}},
    }
    flat = Flattener.build(variables)
    mask = flat.param_mask
    n_params = 3 * 3 * 2 * 4 + 8
    assert mask.sum() == n_params and mask[:n_params].all()  # a prefix
    rng = np.random.default_rng(5)
    g = jnp.asarray(rng.normal(size=flat.dim), jnp.float32).at[-4:].set(1.0)  # global vars
    W = g + 0.1 * jnp.asarray(rng.normal(size=(N, flat.dim)), jnp.float32)
    W = W.at[:, -4:].set(jnp.asarray(rng.uniform(0.1, 0.2, (N, 4)), jnp.float32))  # shrank
    for expr in ("sign_flip", "gaussian", "scaling", "alie+pgd"):
        opts = {"gaussian": {"sigma": 5.0}} if expr == "gaussian" else {}
        _, attacks = parse_attack(expr, _env(mask), opts)
        out = W
        for attack in attacks:
            out = _run(attack, out, g)
        var = np.asarray(flat.unravel(jnp.asarray(out[-1]))["batch_stats"]["bn"]["var"])
        np.testing.assert_array_equal(var, np.asarray(W[-1, -4:]))
    # Without the mask the default boost n/m = 10/3 drives them negative:
    # 1 + (10/3)(w - 1) < 0 for w < 0.7.
    out = _run(get_attack("scaling", BASE), W, g)
    assert (out[-1, -4:] < 0).all()


def test_mask_validation():
    with pytest.raises(ValueError, match="param_mask"):
        _env(np.ones(D, np.int32))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="param_mask"):
        _env(np.ones((2, D), bool))
    W, g = _problem(_prefix_mask())
    attack = get_attack("sign_flip", _env(_prefix_mask(D + 1)))
    with pytest.raises(ValueError, match="param_mask"):
        attack.apply(W, g, jnp.asarray(MAL), jax.random.key(0))
    # No parameter at all: nothing to attack.
    out = _run(get_attack("sign_flip", _env(np.zeros(D, bool))), W, g)
    np.testing.assert_array_equal(out, np.asarray(W))
