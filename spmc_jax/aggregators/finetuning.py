"""Finetuning: uniform FedAvg followed by server-side fine-tuning on the clean proxy set.

    ḡ  = (1/|V|) Σ_{i ∈ V} w_i          (V = valid clients)
    g' = proxy.train(ḡ, key, epochs)   (`epochs` = 1 pass of the clients' optimiser:
                                         SGD lr 0.01, momentum 0.9, wd 1e-5, batch 64)

A common post-hoc backdoor-removal baseline (fine-tuning on clean data, e.g. Liu et al.,
RAID 2018, "Fine-Pruning", without the pruning step), as `RF/Server/Finetuning.py`.

Difference from the reference: there the fine-tuned model is only *evaluated*; the
clients continue from the un-fine-tuned average ḡ, so fine-tuning never affects
training. This rule returns a single new global model, which the engine both evaluates
and sends to clients (fine-tuning propagates). Reproducing the reference would need the
engine to accept a separate evaluation model from the aggregator; not offered here.

Needs `env.proxy` (`ProxyOps.train`). client_weights: 1/|V| on valid clients (the weights
of the average before fine-tuning).
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


def finetuning(env: AggregatorEnv, *, epochs: int = 1) -> Aggregator:
    """Build Finetuning (see the module docstring for the formula and the options' meaning)."""
    if env.proxy is None:
        raise ValueError(
            "defense 'finetuning' needs server proxy data (env.proxy is None); "
            "run with a proxy split or pick a rule without needs_proxy"
        )
    if epochs < 0:
        raise ValueError(f"finetuning epochs={epochs} must be >= 0")
    proxy = env.proxy

    def init(global_flat):
        return ()

    def aggregate(client_flat, state, ctx):
        w = normalized(ctx.valid.astype(jnp.float32))
        avg = ctx.global_flat + weighted_mean(client_flat - ctx.global_flat[None, :], w)
        new_global = proxy.train(avg, ctx.key, epochs) if epochs > 0 else avg
        return new_global, state, AggInfo(client_weights=w)

    return Aggregator(init, aggregate)


register(
    AggregatorSpec(
        "finetuning",
        finetuning,
        "Uniform FedAvg, then `epochs` of SGD on the server's clean proxy set (propagated to "
        "clients, unlike the reference where only the evaluated model is fine-tuned)",
        needs_proxy=True,
    )
)
