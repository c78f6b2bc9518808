"""Contract tests over every registered aggregator (`--defense` value).

Parametrised over `REGISTRY.names()` at collection time, so a newly registered rule is
tested without touching this file. Every rule is built through `get_aggregator` (which
sanitises non-finite rows) with its default options, for n in {3, 10, 64} clients and a
small d, and must:

* return (new_global (d,) float32, state with the init state's structure/shapes/dtypes,
  AggInfo.client_weights (n,) float32);
* jit, and not retrace on a second call with new values of the same shapes;
* be invariant to a permutation of the clients (rows, n_samples, valid, client_ids
  permuted together) unless listed in `NOT_SYMMETRIC`;
* map n identical clients to that client's model unless listed in `NOT_FIXED_POINT`;
* keep the global model, the state and the weights finite when rows are NaN/Inf, and
  give those rows zero weight unless listed in `NONZERO_WEIGHT_FOR_INVALID`;
* refuse to build without proxy data when the spec says `needs_proxy`.

Attacker count: every rule gets `env.num_malicious = contract_f(n)`, the largest f that
the most demanding registered rule accepts (Bulyan needs n >= 4f + 3) capped at the
reference's ⌊0.3 n⌋: f = 0 at n = 3 (Krum's n − f − 2 neighbours and Bulyan's selection
exist only for f = 0 there), 1 at n = 10, 15 at n = 64. `OPTIONS` holds per-rule option
overrides for the contract (RLR's vote threshold at n = 3).

All calls for one (rule, n) share one jitted function (`_compiled`), so each pair compiles
once; the retrace test counts traces over the whole module run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmc_jax.aggregators import REGISTRY, get_aggregator
from spmc_jax.aggregators.base import AggInfo, RoundContext

from .conftest import make_ctx, make_env

NAMES = REGISTRY.names()
N_VALUES = (3, 10, 64)
D = 96  # small, >= FakeProxy.N_COORDS; 12 trailing coordinates pose as BatchNorm statistics

# Random client models are g + SPREAD·N(0, 1): update norms ≈ SPREAD·√D ≈ 0.5, well inside
# the default radii of the clipping rules.
SPREAD = 0.05

# Float32 sums in a different order (permutation) or of n identical values differ from the
# exact result by a few ulps times n; 1e-5 on O(1) values leaves room for n = 64 and for
# iterative rules (RFA's Weiszfeld) without hiding an O(1/n) error.
ATOL = 1e-5
RTOL = 1e-5

# Rules whose output legitimately depends on client order (name -> reason). Randomised rules
# count as symmetric when the randomness (drawn from ctx.key) does not depend on the order.
NOT_SYMMETRIC: dict[str, str] = {
    "deepsight": "the final HDBSCAN runs on ensemble distances that are multiples of 1/5; "
    "tied merges are ordered by client index (as in the hdbscan library)",
}

# Rules for which n identical clients are NOT a fixed point (name -> reason).
NOT_FIXED_POINT: dict[str, str] = {
    "fltrust": "server trains on proxy data; updates are rescaled to the server update's norm",
    "finetuning": "the aggregate is fine-tuned on proxy data by the server",
    "crfl": "Gaussian noise is added to the parameters and the global norm is clipped",
    "rsa": "a fixed-size sign step per coordinate, not an average of the client models",
    "lasa": "top-k sparsification zeroes 30% of every update's weight coordinates",
    "indicator": "the server plants its indicator task in the average (gradient steps)",
    "flame": "Gaussian noise (sigma = noise_lambda * median update norm) is added",
}

# Rules that may give non-finite (sanitised) rows a non-zero weight (name -> reason).
NONZERO_WEIGHT_FOR_INVALID: dict[str, str] = {}

# Per-rule option overrides for the contract run: name -> (n -> options).
OPTIONS: dict[str, Callable[[int], dict[str, Any]]] = {
    # RLR's threshold counts sign votes out of n (reference 4 for n = 10); with n = 3 < 4
    # every coordinate would be flipped, so use min(4, n): unanimous agreement is kept.
    "rlr": lambda n: {"threshold": float(min(4, n))},
}


def _options(name: str, n: int) -> dict[str, Any]:
    return OPTIONS[name](n) if name in OPTIONS else {}


def contract_f(n: int) -> int:
    """Attacker count used for the contract: min(⌊0.3 n⌋, ⌊(n − 3)/4⌋) (see module doc)."""
    return min(int(0.3 * n), (n - 3) // 4)


# ~60 (rule, n) compilations dominate this file's run time; XLA's backend optimisations do
# not change what is computed (only fusion/rounding at the ulp level, inside ATOL), and
# skipping them cuts compile time by about a third.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


class _Compiled:
    """One rule built for n clients, its init and a jitted aggregate that counts its traces."""

    def __init__(self, name: str, n: int) -> None:
        self.env = make_env(n, D, num_malicious=contract_f(n))
        self.agg = get_aggregator(name, self.env, **_options(name, n))
        self.traces = 0

        def counted(client_flat, state, ctx):
            self.traces += 1  # runs only while tracing
            return self.agg.aggregate(client_flat, state, ctx)

        self.aggregate = jax.jit(counted, compiler_options=FAST_COMPILE)


@functools.cache
def _compiled(name: str, n: int) -> _Compiled:
    return _Compiled(name, n)


def _data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    g = rng.normal(size=D).astype(np.float32)
    w = (g + SPREAD * rng.normal(size=(n, D))).astype(np.float32)
    return g, w


def _ctx(g: np.ndarray, n: int, seed: int, **kw) -> RoundContext:
    rng = np.random.default_rng(1000 + seed)
    n_samples = kw.pop("n_samples", rng.integers(50, 500, size=n).astype(np.float32))
    return make_ctx(g, n, seed=seed, round_index=seed % 7, n_samples=n_samples, **kw)


def _call(c: _Compiled, w: np.ndarray, ctx: RoundContext):
    state = c.agg.init(ctx.global_flat)
    new_global, new_state, info = c.aggregate(jnp.asarray(w), state, ctx)
    return state, new_global, new_state, info


CASES = [pytest.param(name, n, id=f"{name}-n{n}") for name in NAMES for n in N_VALUES]


@pytest.mark.parametrize(("name", "n"), CASES)
def test_shapes_dtypes_and_no_retrace(name: str, n: int) -> None:
    c = _compiled(name, n)
    outs = []
    for seed in (1, 2):  # new values, same shapes/dtypes: must reuse the first trace
        g, w = _data(n, seed)
        state, new_global, new_state, info = _call(c, w, _ctx(g, n, seed))
        assert isinstance(info, AggInfo)
        assert new_global.shape == (D,) and new_global.dtype == jnp.float32
        assert info.client_weights.shape == (n,) and info.client_weights.dtype == jnp.float32
        assert jax.tree.structure(new_state) == jax.tree.structure(state)
        for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state), strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype
        outs.append(np.asarray(new_global))
    assert c.traces == 1, f"{name} traced {c.traces} times for one shape signature"
    # Different inputs must give a different model (guards against a constant output).
    assert not np.allclose(outs[0], outs[1])


@pytest.mark.parametrize(("name", "n"), CASES)
def test_permutation_invariance(name: str, n: int) -> None:
    if name in NOT_SYMMETRIC:
        pytest.skip(NOT_SYMMETRIC[name])
    c = _compiled(name, n)
    g, w = _data(n, 3)
    ctx = _ctx(g, n, 3)
    # A single n-cycle through a random order: every client changes row.
    order = np.random.default_rng(4).permutation(n)
    perm = np.empty(n, int)
    perm[order] = np.roll(order, 1)
    ctx_p = ctx._replace(
        n_samples=ctx.n_samples[perm], valid=ctx.valid[perm], client_ids=ctx.client_ids[perm]
    )
    _, out, _, info = _call(c, w, ctx)
    _, out_p, _, info_p = _call(c, w[perm], ctx_p)
    np.testing.assert_allclose(np.asarray(out_p), np.asarray(out), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(
        np.asarray(info_p.client_weights), np.asarray(info.client_weights)[perm], atol=ATOL
    )


@pytest.mark.parametrize(("name", "n"), CASES)
def test_identical_clients_fixed_point(name: str, n: int) -> None:
    if name in NOT_FIXED_POINT:
        pytest.skip(NOT_FIXED_POINT[name])
    c = _compiled(name, n)
    g, w = _data(n, 5)
    same = np.broadcast_to(w[0], (n, D)).copy()
    _, out, _, _ = _call(c, same, _ctx(g, n, 5))
    np.testing.assert_allclose(np.asarray(out), w[0], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(("name", "n"), CASES)
def test_non_finite_rows(name: str, n: int) -> None:
    c = _compiled(name, n)
    g, w = _data(n, 6)
    w[0] = np.nan  # a whole NaN row
    w[1, :] = np.inf  # an Inf row ...
    w[1, ::2] = 1e3  # ... mixed with finite values
    if n > 3:
        w[2, 7] = -np.inf  # a single bad coordinate
    _, out, new_state, info = _call(c, w, _ctx(g, n, 6))
    assert np.all(np.isfinite(np.asarray(out)))
    for leaf in jax.tree.leaves(new_state):
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            assert np.all(np.isfinite(np.asarray(leaf))), "state became non-finite"
    weights = np.asarray(info.client_weights)
    assert np.all(np.isfinite(weights))
    if name not in NONZERO_WEIGHT_FOR_INVALID:
        bad = [0, 1] + ([2] if n > 3 else [])
        np.testing.assert_array_equal(weights[bad], 0.0)
    # The finite rows still count: the model moves away from g (all finite rows differ from g).
    if name not in NOT_FIXED_POINT:
        assert not np.allclose(np.asarray(out), g)


@pytest.mark.parametrize("name", NAMES)
def test_needs_proxy_is_enforced(name: str) -> None:
    spec = REGISTRY.get(name)
    env = make_env(10, D, num_malicious=contract_f(10), proxy=None)
    if spec.needs_proxy:
        with pytest.raises(ValueError, match="proxy"):
            get_aggregator(name, env, **_options(name, 10))
    else:
        get_aggregator(name, env, **_options(name, 10))  # builds without proxy data
