"""SageFlow's adversary defence (Park et al., NeurIPS 2021, "Sageflow: Robust Federated
Learning against Both Stragglers and Adversaries", Sec. 3.2): entropy-based filtering plus
loss-weighted averaging on the server's clean public (proxy) data.

For each client model w_i, on the proxy set: ℓ_i = mean cross-entropy loss and
H_i = mean prediction entropy. Then

    q_i = 1[H_i < E_th]                      (entropy filter, E_th = `eth` = 2.0)
    α_i ∝ b_i · q_i / ℓ_i^δ + ε               (loss weighting, δ = `delta` = 1.0)
    g'  = Σ_i α_i w_i                          (models, parameters and BN statistics)

with b_i = 1 (the reference; `data_weighted=False`) or b_i = n_i (`data_weighted=True`,
the paper's β_i ∝ m_i / ℓ_i^δ). ε = `eps` = 1e-5 is the reference's additive term; it
gives every valid client a negligible weight and makes the rule fall back to the uniform
mean of the valid clients when the filter removes everybody (with eps=0 that fallback is
applied explicitly). Losses are floored at 1e-12 so a zero loss cannot divide by zero;
a client whose loss or entropy is non-finite is filtered out (q_i = 0). Staleness
weighting (the paper's straggler part) does not apply: all clients are fresh.

Reference bug (`reference_bug=True`): `RF/Server/SageFlow.py:44` evaluates the *old
global model* instead of each client, so every client gets the same ℓ, H and weight:
SageFlow reduces to the uniform mean of the valid clients. Reproduced by evaluating
ctx.global_flat once.

Needs `env.proxy` (`ProxyOps.loss_entropy`). Client models are evaluated with `vmap`, or
with `lax.map` in chunks of `client_chunk` models when > 0 (bounds memory).
"""

from __future__ import annotations

import jax
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


def sageflow(
    env: AggregatorEnv,
    *,
    eth: float = 2.0,
    delta: float = 1.0,
    eps: float = 1e-5,
    data_weighted: bool = False,
    client_chunk: int = 0,
    reference_bug: bool = False,
) -> Aggregator:
    """Build SageFlow (see the module docstring for the formula and the options' meaning)."""
    if env.proxy is None:
        raise ValueError(
            "defense 'sageflow' needs server proxy data (env.proxy is None); "
            "run with a proxy split or pick a rule without needs_proxy"
        )
    if eps < 0:
        raise ValueError(f"sageflow eps={eps} must be >= 0")
    if client_chunk < 0:
        raise ValueError(f"sageflow client_chunk={client_chunk} must be >= 0 (0 = vmap all)")
    proxy = env.proxy

    def init(global_flat):
        return ()

    def aggregate(client_flat, state, ctx):
        n = client_flat.shape[0]
        if reference_bug:
            loss, ent = proxy.loss_entropy(ctx.global_flat)
            loss = jnp.broadcast_to(loss, (n,))
            ent = jnp.broadcast_to(ent, (n,))
        elif client_chunk > 0:
            loss, ent = jax.lax.map(proxy.loss_entropy, client_flat, batch_size=client_chunk)
        else:
            loss, ent = jax.vmap(proxy.loss_entropy)(client_flat)
        dt = client_flat.dtype
        loss = loss.astype(dt)
        ent = ent.astype(dt)
        q = (ent < eth) & jnp.isfinite(ent) & jnp.isfinite(loss)
        base = ctx.n_samples.astype(dt) if data_weighted else jnp.ones((n,), dt)
        score = jnp.where(q, base / jnp.maximum(loss, 1e-12) ** delta, 0.0) + eps
        score = jnp.where(ctx.valid, score, 0.0)
        # All filtered out with eps = 0: fall back to the uniform mean of the valid clients.
        score = jnp.where(jnp.sum(score) > 0, score, ctx.valid.astype(dt))
        w = normalized(score)
        new_global = ctx.global_flat + weighted_mean(client_flat - ctx.global_flat[None, :], w)
        return new_global, state, AggInfo(client_weights=w.astype(jnp.float32))

    return Aggregator(init, aggregate)


register(
    AggregatorSpec(
        "sageflow",
        sageflow,
        "SageFlow (NeurIPS'21): drop models with proxy entropy >= eth, weight the rest by "
        "1/loss^delta (reference_bug=True: uniform, as the reference evaluates the old global)",
        needs_proxy=True,
    )
)
