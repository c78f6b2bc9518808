"""RLR, Robust Learning Rate (Ozdayi, Kantarcioglu & Gel, AAAI 2021, Eq. 2-3).

On the parameter coordinates k (env.param_mask), with Δ_i = w_i − g and data weights
α_i = n_i / Σ_j n_j:

    s_k = |Σ_i sign(Δ_{i,k})|                         (sign agreement, in votes)
    η_k = +η  if s_k ≥ θ,  −η otherwise                (θ = `threshold` = 4, η = `server_lr` = 1)
    g'_k = g_k + η_k · Σ_i α_i Δ_{i,k}

θ counts absolute votes among the n aggregated clients (a zero update casts no vote), so
it must be re-chosen for a different n: with n = 10, a coordinate is flipped unless at
least 7 clients agree in sign. BatchNorm statistics take the plain data-weighted average
(the reference loads the clients' own buffers and averages state_dicts). The reference
applies η to each client (w_i ← g + η⊙Δ_i) before averaging: the same result.

Invalid rows (ctx.valid False) cast no vote and get α_i = 0.

Reference bug (`reference_permutation_bug=True`): `RF/Server/RLR.py:40-44` keys the updates
by the random online order, so client j's corrected update is weighted by the data size
of another client. Reproduced by a random permutation (from ctx.key) of the n_i.

client_weights: α_i × the fraction of parameter coordinates where sign(Δ_i) agrees with
the sign of the applied step η⊙ΣαΔ (the share of the step each client pushed for),
normalised to sum 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from spmc_jax.aggregators import register
from spmc_jax.aggregators._robust import sign_agreement_weights
from spmc_jax.aggregators.base import AggInfo, Aggregator, AggregatorEnv, AggregatorSpec, normalized


def rlr(
    env: AggregatorEnv,
    *,
    threshold: float = 4.0,
    server_lr: float = 1.0,
    data_weighted: bool = True,
    reference_permutation_bug: bool = False,
) -> Aggregator:
    """Build RLR (see the module docstring for the formula and the options' meaning)."""
    if threshold < 0:
        raise ValueError(f"rlr threshold={threshold} must be >= 0 (votes out of n clients)")
    param_mask = np.asarray(env.param_mask, bool)

    def init(global_flat):
        return ()

    def aggregate(client_flat, state, ctx):
        n = client_flat.shape[0]
        pm = jnp.asarray(param_mask)
        valid = ctx.valid
        delta = (client_flat - ctx.global_flat[None, :]) * valid[:, None]
        sizes = ctx.n_samples if data_weighted else jnp.ones_like(ctx.n_samples)
        if reference_permutation_bug:
            sizes = sizes[jax.random.permutation(ctx.key, n)]
        alphas = normalized(jnp.where(valid, sizes, 0.0).astype(client_flat.dtype))
        votes = jnp.abs(jnp.sum(jnp.sign(delta), axis=0))
        eta = jnp.where(votes >= threshold, server_lr, -server_lr)
        avg = alphas @ delta
        step = jnp.where(pm, eta * avg, avg)
        w = sign_agreement_weights(delta, step, alphas, pm)
        return ctx.global_flat + step, state, AggInfo(client_weights=w)

    return Aggregator(init, aggregate)


register(
    AggregatorSpec(
        "rlr",
        rlr,
        "RLR (AAAI'21): flip the server learning rate on parameter coordinates where the net "
        "sign vote |sum sign(delta_i)| < threshold (n=10, 4: unless 7 of 10 agree); "
        "data-weighted mean",
    )
)
