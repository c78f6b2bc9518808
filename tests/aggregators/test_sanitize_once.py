"""`get_aggregator(..., inputs_sanitized=True)`: the caller (the engine) has run `sanitize`.

* For every registered rule, the pre-sanitised path gives exactly the default path's
  result: on finite input, and on input with NaN/Inf rows when the caller sanitises first
  and passes the resulting `valid` in the context (what the engine does).
* The default path still sanitises (direct library use): covered for every rule by
  test_contract.py::test_non_finite_rows; here, FedAvg with a NaN row against its oracle.
* The pre-sanitised path really skips the (n, d) pass: no `is_finite` on an (n, d) array
  in its jaxpr, while the default path has one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmc_jax.aggregators import REGISTRY, get_aggregator
from spmc_jax.aggregators.base import sanitize
from tests.reference.fedavg_oracle import fedavg as fedavg_oracle

from .conftest import make_ctx, make_env

N, D = 10, 96
F = 1  # attackers assumed by rules that need a count (Bulyan: n >= 4f + 3)
NAMES = REGISTRY.names()
# Same reduced-optimisation compile as test_contract.py; both paths of a comparison are
# compiled with it, so they see the same fusion decisions.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _data(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    g = rng.normal(size=D).astype(np.float32)
    w = (g + 0.05 * rng.normal(size=(N, D))).astype(np.float32)
    return g, w


def _build(name: str, inputs_sanitized: bool):
    agg = get_aggregator(name, make_env(N, D, num_malicious=F), inputs_sanitized=inputs_sanitized)
    return agg, jax.jit(agg.aggregate, compiler_options=FAST_COMPILE)


def _assert_same(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", NAMES)
def test_presanitized_path_matches_default(name: str) -> None:
    agg, default = _build(name, False)
    _, presanitized = _build(name, True)
    g, w = _data(1)
    ctx = make_ctx(g, N, seed=3)
    state = agg.init(ctx.global_flat)
    # Finite input: sanitize is the identity, so the two paths agree bit for bit.
    _assert_same(presanitized(jnp.asarray(w), state, ctx), default(jnp.asarray(w), state, ctx))
    # Non-finite rows: the engine's order (sanitize, then valid into the context) gives what
    # the default path computes from the raw matrix.
    w[0] = np.nan
    w[4, 3] = np.inf
    want = default(jnp.asarray(w), state, ctx)
    clean, valid = sanitize(jnp.asarray(w), ctx.global_flat)
    got = presanitized(clean, state, ctx._replace(valid=valid))
    _assert_same(got, want)
    assert np.isfinite(np.asarray(got[0])).all()


def test_default_path_sanitises_direct_calls() -> None:
    g, w = _data(2)
    w[2] = np.nan
    w[7, 0] = -np.inf
    agg = get_aggregator("fedavg", make_env(N, D))
    ctx = make_ctx(g, N)
    new, _, info = jax.jit(agg.aggregate)(jnp.asarray(w), agg.init(ctx.global_flat), ctx)
    valid = np.isfinite(w).all(axis=1)
    want, p = fedavg_oracle(np.where(valid[:, None], w, g), np.full(N, 100.0), valid, False)
    # float32 mean of O(1) values over 8 rows: a few ulps.
    np.testing.assert_allclose(np.asarray(new), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(info.client_weights), p, atol=1e-7)


def _is_finite_shapes(jaxpr) -> list[tuple[int, ...]]:
    """Shapes of every `is_finite` operand in `jaxpr` and its sub-jaxprs."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "is_finite":
            shapes.append(tuple(eqn.invars[0].aval.shape))
        for value in eqn.params.values():  # pjit / cond / scan bodies
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    shapes += _is_finite_shapes(sub)
    return shapes


def test_presanitized_path_skips_the_matrix_pass() -> None:
    g, w = _data(3)
    ctx = make_ctx(g, N)
    shapes = {}
    for flag in (False, True):
        agg = get_aggregator("fedavg", make_env(N, D), inputs_sanitized=flag)
        jaxpr = jax.make_jaxpr(agg.aggregate)(jnp.asarray(w), agg.init(ctx.global_flat), ctx)
        shapes[flag] = _is_finite_shapes(jaxpr.jaxpr)
    assert (N, D) in shapes[False]
    assert (N, D) not in shapes[True]
    assert (D,) in shapes[True]  # the cheap guard on the new global model stays
