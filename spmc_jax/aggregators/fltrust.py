"""FLTrust (Cao et al., "FLTrust: Byzantine-robust Federated Learning via Trust
Bootstrapping", NDSS 2021).

The server trains its own copy of the global model on its clean root data (here the
proxy set) and uses that update g0 as the direction of trust:

    g0    = train(g, public_epochs) − g
    TS_i  = ReLU(cos(Δ_i, g0))                        (trust score)
    Δ̂_i   = Δ_i · ‖g0‖ / ‖Δ_i‖                        (magnitude normalised to the server's)
    g'    = g + Σ_i TS_i Δ̂_i / Σ_i TS_i                (zero update when Σ TS_i = 0)

Cosines and norms use the trainable parameters only (`env.param_mask`). BatchNorm
statistics (mask False) are not rescaled: rescaling could push a running variance
negative; they take the trust-weighted mean Σ TS_i Δ_i / Σ TS_i, a convex combination.
Non-finite rows (`ctx.valid` False) and zero updates get TS_i = 0.

Cost: every round runs `public_epochs` epochs of server training on the proxy set (the
reference's `public_epoch` 10, SGD 0.01/0.9/1e-5, i.e. the clients' optimiser, which
`ProxyOps.train` uses). With a proxy set of 10 % of the training data this is about as
much compute as one client's 10 local epochs; lower it for quick runs.

Reference differences (spmc_reference.md §4): the reference adds 1e-5 to ‖Δ_i‖ and to
Σ TS_i and includes BatchNorm counters in its vectors; neither is reproduced.

`client_weights`: the normalised trust scores TS_i / Σ TS_j (the effective coefficient of
Δ_i also carries the rescaling ‖g0‖/‖Δ_i‖).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from spmc_jax.aggregators import register
from spmc_jax.aggregators.base import (
    AggInfo,
    Aggregator,
    AggregatorEnv,
    AggregatorSpec,
    normalized,
)


def fltrust(env: AggregatorEnv, *, public_epochs: int = 10) -> Aggregator:
    """FLTrust with the server update from `env.proxy.train`.

    Args:
      env: run facts; uses proxy (required) and param_mask.
      public_epochs: epochs of server training on the proxy set per round (reference 10).

    Returns:
      Aggregator with state ().

    Raises:
      ValueError: when `env.proxy` is None or public_epochs < 1.
    """
    if env.proxy is None:
        raise ValueError(
            "fltrust needs server proxy data (env.proxy is None); run with a proxy split or "
            "choose a defense that does not need one"
        )
    if public_epochs < 1:
        raise ValueError(f"fltrust: public_epochs={public_epochs}; accepted: integer >= 1")
    proxy = env.proxy
    mask = jnp.asarray(np.asarray(env.param_mask, dtype=bool))
    epochs = int(public_epochs)

    def init(global_flat):
        return ()

    def aggregate(client_flat, state, ctx):
        g = ctx.global_flat
        g0 = proxy.train(g, ctx.key, epochs) - g
        deltas = client_flat - g[None, :]
        dp = jnp.where(mask[None, :], deltas, 0.0)
        g0p = jnp.where(mask, g0, 0.0)
        norms = jnp.linalg.norm(dp, axis=1)
        g0_norm = jnp.linalg.norm(g0p)
        ok = ctx.valid & (norms > 0) & (g0_norm > 0)
        safe_norms = jnp.where(ok, norms, 1.0)
        cos = (dp @ g0p) / (safe_norms * jnp.where(g0_norm > 0, g0_norm, 1.0))
        ts = jnp.where(ok, jnp.maximum(cos, 0.0), 0.0)
        weights = normalized(ts)
        # Parameters: trust-weighted mean of the rescaled updates; statistics: of the raw ones.
        scaled = weights * g0_norm / safe_norms
        update = jnp.where(mask, scaled @ deltas, weights @ deltas)
        return g + update, state, AggInfo(client_weights=weights.astype(jnp.float32))

    return Aggregator(init, aggregate)


register(
    AggregatorSpec(
        "fltrust",
        fltrust,
        "FLTrust (Cao et al. 2021): ReLU-cosine trust in the server's proxy-trained update, "
        "updates rescaled to its norm; needs proxy data (public_epochs=10 epochs per round)",
        needs_proxy=True,
    )
)
