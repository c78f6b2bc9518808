"""Auror (Shen, Tople & Saxena, "Auror: Defending against Poisoning Attacks in
Collaborative Deep Learning Systems", ACSAC 2016, Section 5).

With updates Δ_i = w_i − g (trainable parameters, `env.param_mask`):

1. Indicative features: for every coordinate k, the n values Δ_ik are split into two
   clusters by 2-means; k is indicative when the two centres are more than `alpha`
   apart, |μ_k,upper − μ_k,lower| > α (the paper's threshold α, set per task).
2. Clustering: the clients are split into two clusters by 2-means on their indicative
   coordinates (Lloyd from deterministic farthest-point centres). When the two centres
   are more than `alpha` apart (Euclidean, on the indicative coordinates), the clients of
   the minority cluster are flagged as malicious and dropped; otherwise (or with no
   indicative feature, or two equal-sized clusters) every client is kept.
3. g' = g + mean_{kept} Δ_i (uniform; BatchNorm statistics included).

Per-coordinate 2-means is solved exactly (`_cluster.two_means_1d`: in one dimension the
optimal split is a cut of the sorted values). The paper's refinement that flags a client
only when it falls in the minority for more than τ of the indicative features, and its
reuse of the features found in the first rounds, are not implemented: features are
recomputed each round.

Invalid (non-finite) rows take no part and get weight 0. client_weights = 1/L on the L
kept clients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spmc_jax.aggregators import register
from spmc_jax.aggregators._cluster import (
    farthest_point_init,
    kmeans,
    mean_of_kept_rule,
    two_means_1d,
)
from spmc_jax.aggregators.base import Aggregator, AggregatorEnv, AggregatorSpec


def auror_kept(deltas: jax.Array, valid: jax.Array, alpha: float) -> tuple[jax.Array, jax.Array]:
    """Auror's decision on (masked) updates: (kept (n,) bool, indicative (d,) bool)."""
    indicative = two_means_1d(deltas, valid) > alpha
    x = jnp.where(indicative[None, :], deltas, 0.0)
    labels, centres = kmeans(x, farthest_point_init(x, 2, valid), valid)
    size1 = jnp.sum(labels == 1)
    size0 = jnp.sum(labels == 0)
    far = jnp.linalg.norm(centres[0] - centres[1]) > alpha
    minority = jnp.where(size1 < size0, 1, 0)
    drop = jnp.any(indicative) & far & (size0 != size1) & (labels == minority)
    return valid & ~drop, indicative


def auror(env: AggregatorEnv, *, alpha: float = 0.02) -> Aggregator:
    """Build Auror (see the module docstring).

    Args:
      env: run facts; uses param_mask.
      alpha: the distance threshold α between 2-means centres (per feature, and between
        the two client clusters).
    """
    if not alpha > 0:
        raise ValueError(f"auror: alpha={alpha}; accepted: > 0")
    return mean_of_kept_rule(
        env.param_mask, lambda deltas, ctx: auror_kept(deltas, ctx.valid, alpha)[0]
    )


register(
    AggregatorSpec(
        "auror",
        auror,
        "Auror (ACSAC'16): indicative coordinates by per-coordinate 2-means (centres > alpha "
        "apart), 2-means of clients on them, drop the minority cluster if the centres are "
        "> alpha apart",
    )
)
