"""FLARE (Wang, Yang, Zhang, Kong & Sun, "FLARE: Defending Federated Learning against Model
Poisoning Attacks via Latent Space Representations", AsiaCCS 2022, Algorithm 1).

The server runs every client model w_i on its auxiliary samples X = {x_1 … x_m} (here the
first `aux_samples` images of the proxy set) and keeps the penultimate-layer
representations (PLRs) P_i = {h_i(x) : x ∈ X} (`ProxyOps.features`). Then

    MMD²(P_i, P_j) = 1/(m(m−1)) Σ_{a≠b} [k(p_ia, p_ib) + k(p_ja, p_jb)] − 2/m² Σ_{a,b} k(p_ia, p_jb)
                     (unbiased estimator, Gaussian kernel k(u, v) = exp(−γ‖u − v‖²),
                      γ = 1/h for h-dimensional PLRs, scikit-learn's default, as the authors)
    N_j   = the K = max(1, ⌊neighbor_fraction · n⌋) clients i ≠ j with the smallest MMD²(P_i, P_j)
    c_i   = #{j : i ∈ N_j}                           (how often i is a nearest neighbour)
    TS_i  = exp(c_i / (τ c̄)) / Σ_j exp(c_j / (τ c̄)),   c̄ = mean_j c_j   (trust scores)
    g'    = g + Σ_i TS_i Δ_i

Dividing the counts by their mean (as in the authors' code) makes τ independent of n.
Neighbours are ranked by the unclamped unbiased estimate (it can dip below 0 for close
distributions; clamping at 0 would create ties), equal values by client id. The authors'
code uses K − 1 neighbours (`ind[:, 1:k]`); the paper's K is used here.

Details: non-finite rows (`ctx.valid` False) are never neighbours, count nothing and get
TS = 0; the softmax is over the valid clients. BatchNorm models are evaluated on their
running statistics (eval mode). Needs `env.proxy` (`inputs`, `features`).

Cost: n forward passes on m proxy images and an (n·m)² kernel matrix (m = 64, n = 64:
4096², fine on any device).

client_weights: TS.
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
    weighted_mean,
)


def pairwise_mmd2(plr: jax.Array, gamma: float | jax.Array) -> jax.Array:
    """Unbiased MMD² (n, n) between the n sets of m representations in `plr` (n, m, h).

    Not clamped: the unbiased estimate can be slightly negative for close distributions,
    and keeping its sign avoids ties at 0 when ranking neighbours."""
    n, m, h = plr.shape
    flat = plr.reshape(n * m, h)
    sq = jnp.sum(flat * flat, axis=1)
    gram = jnp.matmul(flat, flat.T, precision=jax.lax.Precision.HIGHEST)
    kern = jnp.exp(-gamma * jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0))
    blocks = kern.reshape(n, m, n, m).sum(axis=(1, 3))  # S_ij = Σ_ab k(p_ia, p_jb)
    traces = jnp.sum(jnp.diagonal(kern).reshape(n, m), axis=1)  # Σ_a k(p_ia, p_ia)
    within = (jnp.diagonal(blocks) - traces) / (m * (m - 1))
    mmd = within[:, None] + within[None, :] - 2.0 * blocks / (m * m)
    return jnp.where(jnp.eye(n, dtype=bool), 0.0, mmd)


def flare_trust(
    mmd: jax.Array, valid: jax.Array, client_ids: jax.Array, k: int, tau: float
) -> jax.Array:
    """Trust scores TS (n,) from the MMD matrix: nearest-neighbour counts, then softmax.

    Equal MMDs are ranked by client id, so the counts do not depend on the row order."""
    n = mmd.shape[0]
    excluded = jnp.eye(n, dtype=bool) | ~valid[None, :]
    d = jnp.where(excluded, jnp.inf, mmd)
    ids = jnp.broadcast_to(client_ids[None, :], d.shape)
    order = jnp.lexsort((ids, d), axis=1)
    ranks = jnp.argsort(order, axis=1)
    n_valid = jnp.sum(valid)
    kk = jnp.minimum(k, jnp.maximum(n_valid - 1, 0))
    is_nb = (ranks < kk) & ~excluded & valid[:, None]  # row j: is i among j's neighbours
    counts = jnp.sum(is_nb, axis=0).astype(jnp.float32)
    mean = jnp.sum(jnp.where(valid, counts, 0.0)) / jnp.maximum(n_valid, 1)
    z = counts / (tau * jnp.where(mean > 0, mean, 1.0))
    z = jnp.where(valid, z, -jnp.inf)
    return jnp.where(valid, jax.nn.softmax(z), 0.0)


def flare(
    env: AggregatorEnv,
    *,
    aux_samples: int = 64,
    neighbor_fraction: float = 0.5,
    tau: float = 1.0,
    gamma: float = 0.0,
) -> Aggregator:
    """Build FLARE (see the module docstring).

    Args:
      env: run facts; uses proxy (required).
      aux_samples: m, proxy images used (the first m; all if fewer), >= 2.
      neighbor_fraction: K = max(1, ⌊fraction · n⌋) nearest neighbours per client.
      tau: softmax temperature τ > 0.
      gamma: RBF kernel γ; 0 means 1/h (scikit-learn's default).
    """
    if env.proxy is None:
        raise ValueError(
            "flare needs server proxy data (env.proxy is None) for the penultimate-layer "
            "representations; run with a proxy split or choose a defense that does not need one"
        )
    if aux_samples < 2:
        raise ValueError(f"flare: aux_samples={aux_samples}; accepted: integer >= 2")
    if not 0.0 < neighbor_fraction <= 1.0:
        raise ValueError(f"flare: neighbor_fraction={neighbor_fraction}; accepted: 0 < value <= 1")
    if tau <= 0:
        raise ValueError(f"flare: tau={tau}; accepted: > 0")
    if gamma < 0:
        raise ValueError(f"flare: gamma={gamma}; accepted: >= 0 (0: 1/h)")
    proxy = env.proxy
    k = max(1, int(neighbor_fraction * env.n_clients))

    def init(global_flat):
        return ()

    def aggregate(client_flat, state, ctx):
        x, _ = proxy.inputs()
        x = x[:aux_samples]
        plr = jax.lax.map(lambda w: proxy.features(w, x), client_flat).astype(jnp.float32)
        plr = plr.reshape(plr.shape[0], plr.shape[1], -1)
        gam = gamma if gamma > 0 else 1.0 / plr.shape[2]
        mmd = pairwise_mmd2(plr, gam)
        ts = flare_trust(mmd, ctx.valid, ctx.client_ids, k, tau).astype(jnp.float32)
        update = weighted_mean(client_flat - ctx.global_flat[None, :], ts)
        return ctx.global_flat + update, state, AggInfo(client_weights=ts)

    return Aggregator(init, aggregate)


register(
    AggregatorSpec(
        "flare",
        flare,
        "FLARE (Wang et al., AsiaCCS'22): MMD between clients' penultimate-layer features on "
        "proxy images, nearest-neighbour counts, softmax trust weights; needs proxy data",
        needs_proxy=True,
    )
)
