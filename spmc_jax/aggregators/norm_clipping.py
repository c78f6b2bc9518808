"""Norm clipping (Sun et al., "Can You Really Backdoor Federated Learning?", 2019).

Each update Δ_i = w_i − g is scaled down to norm at most M, then the clipped updates are
averaged (optionally with the paper's "weak differential privacy" Gaussian noise):

    Δ̃_i = Δ_i · min(1, M / ‖Δ_i‖),     g' = g + (1/n) Σ_i Δ̃_i + N(0, σ² I).

M is the `max_norm` option. Sun et al. fix M by hand from the typical benign norm; with
`max_norm <= 0` (the default) M is set every round to the median norm of the valid
updates, a scale-free stand-in that stays benign as long as fewer than half the clients
are malicious.

Norms use the trainable parameters only (`env.param_mask`); the clip factor (<= 1)
scales the whole row, which keeps BatchNorm statistics a convex combination. The noise
(σ = `noise_std`, default 0) is added to parameters only, with `ctx.key`. Non-finite rows
(`ctx.valid` False) are left out of the mean and of the median norm. Needs no attacker
count.

`client_weights`: the normalised clip factors min(1, M/‖Δ_i‖) / Σ_j (…), i.e. each
client's coefficient in the mean up to a common factor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from spmc_jax.aggregators import register
from spmc_jax.aggregators._robust import coordinate_median
from spmc_jax.aggregators.base import AggInfo, Aggregator, AggregatorEnv, AggregatorSpec


def clip_factors(norms: jax.Array, max_norm: jax.Array) -> jax.Array:
    """min(1, M/‖Δ‖) with zero norms left unscaled (factor 1)."""
    return jnp.where(norms > max_norm, max_norm / jnp.where(norms > 0, norms, 1.0), 1.0)


def norm_clipping(
    env: AggregatorEnv, *, max_norm: float = 0.0, noise_std: float = 0.0
) -> Aggregator:
    """Mean of norm-clipped updates.

    Args:
      env: run facts; uses param_mask.
      max_norm: M; <= 0 means the median norm of this round's valid updates.
      noise_std: σ of the Gaussian noise added to the parameters (0 = no noise).

    Returns:
      Aggregator with state ().
    """
    if noise_std < 0:
        raise ValueError(f"norm_clipping: noise_std={noise_std}; accepted: >= 0")
    mask = jnp.asarray(np.asarray(env.param_mask, dtype=bool))

    def init(global_flat):
        return ()

    def aggregate(client_flat, state, ctx):
        deltas = client_flat - ctx.global_flat[None, :]
        norms = jnp.linalg.norm(jnp.where(mask[None, :], deltas, 0.0), axis=1)
        if max_norm > 0:
            m = jnp.asarray(max_norm, norms.dtype)
        else:
            m = coordinate_median(norms[:, None], ctx.valid)[0]
        factors = jnp.where(ctx.valid, clip_factors(norms, m), 0.0)
        n_valid = jnp.maximum(jnp.sum(ctx.valid), 1).astype(deltas.dtype)
        update = (factors @ deltas) / n_valid
        if noise_std > 0:
            noise = noise_std * jax.random.normal(ctx.key, update.shape, update.dtype)
            update = update + jnp.where(mask, noise, 0.0)
        total = jnp.sum(factors)
        weights = factors / jnp.where(total > 0, total, 1.0)
        return ctx.global_flat + update, state, AggInfo(client_weights=weights.astype(jnp.float32))

    return Aggregator(init, aggregate)


register(
    AggregatorSpec(
        "norm_clipping",
        norm_clipping,
        "Norm clipping (Sun et al. 2019): mean of updates clipped to norm max_norm (default: "
        "the median update norm), optional weak-DP noise; needs no attacker count",
    )
)
