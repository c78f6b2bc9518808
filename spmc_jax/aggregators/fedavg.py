"""FedAvg (McMahan et al., AISTATS 2017): the global model is the mean of the client models.

Uniform:        g' = (1/n) Σ_i w_i            (the reference's `Equal` server, Table 2's FedAvg)
Data-weighted:  g' = Σ_i n_i w_i / Σ_i n_i    (the reference's `Weight` server)

Both average the full flat vector (parameters and BatchNorm statistics), like the
reference's state_dict averaging. Non-finite rows (ctx.valid False) get weight 0.
"""

from __future__ import annotations

import jax.numpy as jnp

from spmc_jax.aggregators import register
from spmc_jax.aggregators.base import (
    AggInfo,
    Aggregator,
    AggregatorEnv,
    AggregatorSpec,
    normalized,
    weighted_mean,
)


def _make(env: AggregatorEnv, data_weighted: bool) -> Aggregator:
    del env

    def init(global_flat):
        return ()

    def aggregate(client_flat, state, ctx):
        base = ctx.n_samples if data_weighted else jnp.ones_like(ctx.n_samples)
        w = normalized(jnp.where(ctx.valid, base, 0.0).astype(jnp.float32))
        return weighted_mean(client_flat, w), state, AggInfo(client_weights=w)

    return Aggregator(init, aggregate)


def fedavg(env: AggregatorEnv) -> Aggregator:
    """Uniform FedAvg."""
    return _make(env, data_weighted=False)


def fedavg_weighted(env: AggregatorEnv) -> Aggregator:
    """Data-size-weighted FedAvg."""
    return _make(env, data_weighted=True)


register(
    AggregatorSpec("fedavg", fedavg, "FedAvg, uniform mean of client models (reference 'Equal')")
)
register(
    AggregatorSpec(
        "fedavg_weighted",
        fedavg_weighted,
        "FedAvg weighted by client data size n_i (reference 'Weight')",
    )
)
