"""FedAvg (uniform and data-size weighted) against its float64 NumPy oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmc_jax.aggregators import AggregatorEnv, RoundContext, get_aggregator
from tests.reference.fedavg_oracle import fedavg as oracle


@pytest.mark.parametrize("name,weighted", [("fedavg", False), ("fedavg_weighted", True)])
@pytest.mark.parametrize("n", [2, 3, 10])
def test_fedavg_matches_oracle(name, weighted, n):
    rng = np.random.default_rng(n)
    d = 37
    w = rng.normal(size=(n, d)).astype(np.float32)
    g = rng.normal(size=d).astype(np.float32)
    sizes = rng.integers(10, 500, size=n).astype(np.float32)
    valid = np.ones(n, bool)
    valid[0] = n == 2  # one client flagged invalid by the engine (keep both when n = 2)
    env = AggregatorEnv(
        n_clients=n, num_malicious=0, lr=0.01, rounds=1, param_mask=np.ones(d, bool)
    )
    agg = get_aggregator(name, env)
    ctx = RoundContext(
        global_flat=jnp.asarray(g),
        round=jnp.asarray(0),
        key=jax.random.key(0),
        n_samples=jnp.asarray(sizes),
        valid=jnp.asarray(valid),
        client_ids=jnp.arange(n, dtype=jnp.int32),
    )
    new, _, info = jax.jit(agg.aggregate)(jnp.asarray(w), agg.init(jnp.asarray(g)), ctx)
    want, p = oracle(w, sizes, valid, weighted)
    # float32 weighted sum of O(1) values over n ≤ 10 rows: a few ulps.
    np.testing.assert_allclose(np.asarray(new), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(info.client_weights), p, rtol=1e-6, atol=1e-7)
