"""BackdoorIndicator against its float64 oracle (tests/reference/indicator_oracle.py) on the
FakeProxy's linear-softmax model (first 15 coordinates), all of whose coordinates are
parameters here. Tolerance: 30 float32 gradient steps of size 0.05 on O(1) logits; errors
grow at most linearly: ATOL 1e-4. Flags must match exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmc_jax.aggregators import get_aggregator
from spmc_jax.aggregators.indicator import IndicatorState, indicator_set
from tests.reference import indicator_oracle

from .conftest import FakeProxy, make_ctx, make_env

D = 24
F, C = FakeProxy.N_FEATURES, FakeProxy.N_CLASSES
OPTS = dict(n_samples=24, threshold=0.9, plant_steps=30, plant_lr=0.05, mu=0.1)


def test_indicator_set_scrambles_pixels_and_balances_labels():
    x = jnp.arange(2 * 3 * 4 * 2, dtype=jnp.float32).reshape(2 * 3, 4, 2)  # 6 "images"
    x_o, lab = indicator_set(x, 5, 3, seed=0)
    assert x_o.shape == (5, 4, 2)
    for j in range(5):  # every sample keeps its own pixel values, in another order
        assert sorted(np.asarray(x_o[j]).ravel()) == sorted(np.asarray(x[j]).ravel())
        assert not np.array_equal(np.asarray(x_o[j]), np.asarray(x[j]))
    assert sorted(np.bincount(np.asarray(lab), minlength=3)) == [1, 2, 2]


@pytest.mark.parametrize("planted", [True, False])
def test_indicator_matches_oracle(planted):
    n = 6
    rng = np.random.default_rng(1)
    g = rng.normal(size=D).astype(np.float32) * 0.3
    w = (g + 0.1 * rng.normal(size=(n, D))).astype(np.float32)
    w[4, F * C + 2] += 50.0  # predicts class 2 everywhere: indicator accuracy 1 on class 2
    valid = np.ones(n, bool)
    env = make_env(n, D, param_mask=np.ones(D, bool))
    agg = get_aggregator("indicator", env, **OPTS)
    ctx = make_ctx(g, n, valid=valid)
    out, state, info = jax.jit(agg.aggregate)(
        jnp.asarray(w), IndicatorState(planted=jnp.asarray(planted)), ctx
    )
    x_o, lab = indicator_set(env.proxy.x, OPTS["n_samples"], C, seed=0)
    exp, kept, ia = indicator_oracle.indicator_round(
        g, w, np.asarray(x_o), np.asarray(lab), F, C, planted, OPTS["threshold"],
        OPTS["plant_steps"], OPTS["plant_lr"], OPTS["mu"],
    )  # fmt: skip
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(info.client_weights)), kept)
    np.testing.assert_allclose(np.asarray(out), exp, atol=1e-4)
    assert bool(state.planted)
    assert ia[4] == 1.0 and (4 not in kept) == planted
    # Planting fitted the indicator task: its cross-entropy fell from the plain average's.
    avg = g + np.mean(w[kept].astype(np.float64) - g, axis=0)

    def ce(v):
        z = np.asarray(x_o) @ v[: F * C].reshape(F, C) + v[F * C : F * C + C]
        z = z - z.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        return -np.mean(logp[np.arange(len(z)), np.asarray(lab)])

    assert ce(np.asarray(out, np.float64)) < ce(avg) - 0.05


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({"n_samples": 1}, "n_samples=1"),
        ({"threshold": 0.0}, "threshold=0.0"),
        ({"plant_steps": 0}, "plant_steps=0"),
    ],
)
def test_indicator_rejects_bad_options(opts, match):
    with pytest.raises(ValueError, match=match):
        get_aggregator("indicator", make_env(10, D), **opts)
