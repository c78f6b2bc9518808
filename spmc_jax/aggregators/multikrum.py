"""Multi-Krum (Blanchard et al., NeurIPS 2017, Section 4 "Multi-Krum").

Krum scores as in `krum.py` (sum of squared distances of Δ_i = w_i − g to the n − f − 2
nearest other updates), computed once; the server averages the m updates with the
smallest scores (ties broken as in Krum, by the total distance to all valid rows):

    g' = g + (1/m) Σ_{i ∈ S_m} Δ_i,     S_m = the m lowest scores,   m = n − f by default.

(This is the paper's one-shot Multi-Krum, not the iterated Krum selection of Bulyan.)

Non-finite rows (`ctx.valid` False) are dropped as in Krum: scores come from Krum on the
valid rows, and the default m becomes n_valid − f (at least 1); an explicit m is capped at
n_valid. Distances use the trainable parameters only (`env.param_mask`).

Reference behaviour (spmc_reference.md §4, `RF/Server/MultiKrum.py`): `m=5`,
`squared=False`, `num_neighbors=n-1`, `server_momentum=0.9`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from spmc_jax.aggregators import register
from spmc_jax.aggregators._robust import resolve_num_malicious
from spmc_jax.aggregators.base import (
    AggInfo,
    Aggregator,
    AggregatorEnv,
    AggregatorSpec,
    normalized,
    weighted_mean,
)
from spmc_jax.aggregators.krum import (
    krum_neighbors,
    krum_order,
    server_momentum_step,
)


def multikrum(
    env: AggregatorEnv,
    *,
    m: int = -1,
    num_malicious: int = -1,
    num_neighbors: int = -1,
    squared: bool = True,
    server_momentum: float = 0.0,
) -> Aggregator:
    """Multi-Krum: the mean of the m updates with the lowest Krum scores.

    Args:
      env: run facts; uses n_clients, num_malicious, param_mask.
      m: clients averaged; <= 0 means n − f (n_valid − f when rows are dropped).
      num_malicious: f; -1 takes `env.num_malicious`.
      num_neighbors: neighbours in the score; <= 0 means n − f − 2.
      squared: squared distances (paper) or plain distances (reference).
      server_momentum: μ of `krum.server_momentum_step` (0 = paper, 0.9 = reference).

    Returns:
      Aggregator; `client_weights` is 1/m' on the m' selected clients, 0 elsewhere.
    """
    n = env.n_clients
    f = resolve_num_malicious(env.num_malicious, num_malicious, n)
    krum_neighbors(n, f, num_neighbors, "multikrum")
    if m > n or (m <= 0 and n - f < 1):
        raise ValueError(
            f"multikrum: m={m} (n={n}, f={f}) is out of range; accepted: 1 <= m <= n, "
            f"or m <= 0 with n - f >= 1"
        )
    if not 0.0 <= server_momentum < 1.0:
        raise ValueError(f"multikrum: server_momentum={server_momentum}; accepted: 0 <= value < 1")
    mask = jnp.asarray(np.asarray(env.param_mask, dtype=bool))

    def init(global_flat):
        return jnp.zeros_like(global_flat) if server_momentum > 0 else ()

    def aggregate(client_flat, state, ctx):
        deltas = client_flat - ctx.global_flat[None, :]
        _, order = krum_order(deltas, ctx.valid, f, num_neighbors, squared, mask)
        n_valid = jnp.sum(ctx.valid).astype(jnp.int32)
        m_eff = jnp.maximum(n_valid - f, 1) if m <= 0 else jnp.asarray(m, jnp.int32)
        m_eff = jnp.minimum(m_eff, n_valid)
        # Rank of each row (invalid rows score +inf and rank last); ties as in Krum.
        rank = jnp.argsort(order)
        selected = (rank < m_eff) & ctx.valid
        weights = normalized(selected.astype(jnp.float32))
        update = weighted_mean(deltas, weights)
        if server_momentum > 0:
            state, update = server_momentum_step(state, update, server_momentum, mask)
        return ctx.global_flat + update, state, AggInfo(client_weights=weights)

    return Aggregator(init, aggregate)


register(
    AggregatorSpec(
        "multikrum",
        multikrum,
        "Multi-Krum (Blanchard et al. 2017): mean of the m (default n-f) updates with the "
        "lowest Krum scores; f = env.num_malicious unless num_malicious >= 0",
        needs_num_malicious=True,
    )
)
