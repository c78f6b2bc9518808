"""RSA, Byzantine-Robust Stochastic Aggregation (Li, Xu, Chen, Giannakis & Ling, AAAI 2019,
Eq. 9, ℓ1-norm penalty).

The server takes one step on its ℓ1-regularised objective, on the parameter coordinates P
(env.param_mask):

    S    = Σ_i sign(g − w_i)                            (optionally clipped to [−c, c])
    g'_P = g_P − α · (λ · S_P + ρ · g_P)               (α = `alpha` = 0.05, λ = `l1_lambda` = 0.1,
                                                         ρ = `weight_lambda` = 0.001)

i.e. sign votes plus the gradient of the server's regulariser (ρ/2)‖g‖². Hyperparameters
are the reference's retuned values (`RF/Server/RSA.py`). The paper has no clipping, so the
default is c = `clip` = inf; `clip=3` bounds each coordinate's move to α·λ·c = 0.015 per
round (plus the tiny decay), as the reference does. BatchNorm statistics (not optimised
by RSA) take the uniform mean of the valid clients' statistics.

Invalid rows (ctx.valid False) arrive equal to g and so cast no sign vote.

Reference quirks, as options (`--protocol paper` sets them with clip=3):
  reference_sequential_clip: the reference clips after each addition,
    S ← clip(S + sign(g − w_i), −c, c), over the clients in its online order, a fresh
    random permutation every round (spmc_reference.md §1.5). Reproduced with a scan over
    a permutation drawn from ctx.key (in row order 0..n−1 the attackers, the last ids,
    would always vote last, which favours them).
  reference_frozen_buffers: the reference writes only parameters, so the global
    BatchNorm statistics never change (stay at their initial values).

client_weights: the fraction of parameter coordinates where sign(w_i − g) agrees with the
direction of the sign step (−S), normalised to sum 1 (uniform over valid clients if S = 0
everywhere).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from spmc_jax.aggregators import register
from spmc_jax.aggregators._robust import sign_agreement_weights
from spmc_jax.aggregators.base import (
    AggInfo,
    Aggregator,
    AggregatorEnv,
    AggregatorSpec,
    normalized,
    weighted_mean,
)


def rsa(
    env: AggregatorEnv,
    *,
    alpha: float = 0.05,
    l1_lambda: float = 0.1,
    weight_lambda: float = 0.001,
    clip: float = math.inf,
    reference_sequential_clip: bool = False,
    reference_frozen_buffers: bool = False,
) -> Aggregator:
    """Build RSA (see the module docstring for the formula and the options' meaning)."""
    if not clip > 0:
        raise ValueError(f"rsa clip={clip} must be > 0 (inf = no clipping)")
    param_mask = np.asarray(env.param_mask, bool)

    def init(global_flat):
        return ()

    def aggregate(client_flat, state, ctx):
        pm = jnp.asarray(param_mask)
        g = ctx.global_flat
        signs = jnp.sign(g[None, :] - client_flat) * ctx.valid[:, None]
        if reference_sequential_clip:

            def add(s, sign_i):
                return jnp.clip(s + sign_i, -clip, clip), None

            order = jax.random.permutation(ctx.key, signs.shape[0])
            s, _ = jax.lax.scan(add, jnp.zeros_like(g), signs[order])
        else:
            s = jnp.sum(signs, axis=0)
            if not math.isinf(clip):
                s = jnp.clip(s, -clip, clip)
        new_params = g - alpha * (l1_lambda * s + weight_lambda * g)
        valid_f = ctx.valid.astype(jnp.float32)
        if reference_frozen_buffers:
            buffers = g
        else:
            buffers = g + weighted_mean(client_flat - g[None, :], normalized(valid_f))
        new_global = jnp.where(pm, new_params, buffers)
        w = sign_agreement_weights(-signs, -s, valid_f, pm)
        return new_global, state, AggInfo(client_weights=w)

    return Aggregator(init, aggregate)


register(
    AggregatorSpec(
        "rsa",
        rsa,
        "RSA (AAAI'19): l1-penalised sign step g -= alpha*(l1_lambda*sum sign(g-w_i) "
        "+ weight_lambda*g) on parameters (clip: bound the vote sum, the reference's 3)",
    )
)
