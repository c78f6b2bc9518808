"""CRFL, Certifiably Robust Federated Learning (Xie, Chen, Chen & Li, ICML 2021, Algorithm 1).

Training-time part of CRFL (the certification at test time is not a server rule):

    ĝ   = Σ_i α_i w_i,  α_i = n_i / Σ_j n_j           (data-weighted mean of the models)
    ĝ_P ← ĝ_P / max(1, ‖ĝ_P‖ / ρ_t),  ρ_t = min(a·t + b, ρ_max)   (parameter-norm clip)
    g'_P = ĝ_P + ε,  ε ~ N(0, σ² I)                     (except in the last round)

where P are the trainable-parameter coordinates (env.param_mask; the norm is over
parameters only and only parameters are clipped and perturbed; BatchNorm statistics keep
the weighted mean), t = ctx.round (0-based) and the last round is t = env.rounds − 1.
Defaults are the reference's retuned values (`RF/utils/cfg.py:116-120`):
a = `epoch_index_weight` = 5, b = `epoch_index_bias` = 30, ρ_max = `param_clip_thres` = 100,
σ = `sigma` = 1e-4 (a standard deviation). The reference's per-client scaling by
`scale_factor` 1.0 is a no-op and omitted; it clips with ρ_t/(‖ĝ‖ + 1e-6) instead of the
paper's exact ρ_t/‖ĝ‖ (a 1e-8 relative difference).

Noise comes from ctx.key. Invalid rows (ctx.valid False) get α_i = 0.
client_weights = α.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from spmc_jax.aggregators import register
from spmc_jax.aggregators.base import (
    AggInfo,
    Aggregator,
    AggregatorEnv,
    AggregatorSpec,
    normalized,
    weighted_mean,
)


def crfl_clip_threshold(
    t: jax.Array, epoch_index_weight: float, epoch_index_bias: float, param_clip_thres: float
) -> jax.Array:
    """ρ_t = min(a·t + b, ρ_max)."""
    return jnp.minimum(epoch_index_weight * t + epoch_index_bias, param_clip_thres)


def crfl(
    env: AggregatorEnv,
    *,
    epoch_index_weight: float = 5.0,
    epoch_index_bias: float = 30.0,
    param_clip_thres: float = 100.0,
    sigma: float = 1e-4,
    data_weighted: bool = True,
) -> Aggregator:
    """Build CRFL (see the module docstring for the formula and the options' meaning)."""
    if sigma < 0:
        raise ValueError(f"crfl sigma={sigma} must be >= 0")
    param_mask = np.asarray(env.param_mask, bool)
    last_round = env.rounds - 1

    def init(global_flat):
        return ()

    def aggregate(client_flat, state, ctx):
        pm = jnp.asarray(param_mask)
        sizes = ctx.n_samples if data_weighted else jnp.ones_like(ctx.n_samples)
        alphas = normalized(jnp.where(ctx.valid, sizes, 0.0).astype(jnp.float32))
        avg = ctx.global_flat + weighted_mean(client_flat - ctx.global_flat[None, :], alphas)
        t = jnp.asarray(ctx.round, jnp.float32)
        rho = crfl_clip_threshold(t, epoch_index_weight, epoch_index_bias, param_clip_thres)
        norm = jnp.sqrt(jnp.sum(jnp.where(pm, avg, 0.0) ** 2))
        scale = 1.0 / jnp.maximum(1.0, norm / rho)
        noise = sigma * jax.random.normal(ctx.key, avg.shape, avg.dtype)
        noise = jnp.where(ctx.round < last_round, noise, 0.0)
        new_global = jnp.where(pm, avg * scale + noise, avg)
        return new_global, state, AggInfo(client_weights=alphas)

    return Aggregator(init, aggregate)


register(
    AggregatorSpec(
        "crfl",
        crfl,
        "CRFL (ICML'21): data-weighted mean, clip the global parameter norm to "
        "min(5t+30, 100), add N(0, 1e-4^2) to parameters except in the last round",
    )
)
