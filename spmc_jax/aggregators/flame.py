"""FLAME (Nguyen et al., "FLAME: Taming Backdoors in Federated Learning", USENIX Security
2022, Algorithm 1).

With updates Δ_i = w_i − g (trainable-parameter coordinates, `env.param_mask`, for the
distances and norms):

1. Model filtering: c_ij = 1 − cos(Δ_i, Δ_j); HDBSCAN on c with
   min_cluster_size = ⌊n/2⌋ + 1 and min_samples = 1, allowing a single cluster, so at
   most one cluster (the majority) is found; its members are admitted, the rest are
   dropped as outliers.
2. Adaptive clipping: e_i = ‖Δ_i‖, S = median_i e_i (over all valid clients), and each
   admitted update is scaled by γ_i = min(1, S / e_i).
3. Aggregation: g' = g + (1/L) Σ_{admitted} γ_i Δ_i (L admitted clients).
4. Adaptive noise: g' ← g' + N(0, σ² I) on the parameters, σ = λ·S (`noise_lambda`,
   the paper's λ = 0.001 for image classification).

HDBSCAN runs in JAX on the (n, n) distance matrix (`_cluster.hdbscan_precomputed`,
tested against scikit-learn). Invalid (non-finite) rows take no part: n above is the
number of valid clients. If no client is admitted (impossible with ≥ 2 valid clients,
kept as a guard) the valid clients are all admitted. BatchNorm statistics (if any) are
averaged with the same weights γ_i / L and get no noise.

client_weights = γ_i / L for admitted clients, 0 otherwise (they sum to ≤ 1: the rest of
the mass stays on the global model).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from spmc_jax.aggregators import register
from spmc_jax.aggregators._cluster import cosine_distances, hdbscan_precomputed
from spmc_jax.aggregators.base import AggInfo, Aggregator, AggregatorEnv, AggregatorSpec


def flame_admitted(deltas: jax.Array, valid: jax.Array, min_samples: int = 1) -> jax.Array:
    """FLAME's model filtering: the (n,) bool mask of the HDBSCAN majority cluster.

    `deltas` are the (masked) updates; HDBSCAN on cosine distances with
    min_cluster_size = ⌊n_valid/2⌋ + 1 (at least 2), allow_single_cluster.
    """
    n_valid = jnp.sum(valid)
    mcs = jnp.maximum(n_valid // 2 + 1, 2)
    labels = hdbscan_precomputed(
        cosine_distances(deltas), mcs, min_samples, valid, allow_single_cluster=True
    )
    admitted = labels >= 0
    return jnp.where(jnp.any(admitted), admitted, valid)


def flame(env: AggregatorEnv, *, noise_lambda: float = 0.001, min_samples: int = 1) -> Aggregator:
    """Build FLAME (see the module docstring for the formula and the options' meaning).

    Args:
      env: run facts; uses n_clients and param_mask.
      noise_lambda: λ of the noise level σ = λ·S (0 disables the noise).
      min_samples: HDBSCAN's min_samples (the paper: 1).
    """
    if noise_lambda < 0:
        raise ValueError(f"flame: noise_lambda={noise_lambda}; accepted: >= 0")
    if not 1 <= min_samples <= max(env.n_clients, 1):
        raise ValueError(f"flame: min_samples={min_samples}; accepted: 1..n_clients")
    if env.n_clients < 2:
        raise ValueError(f"flame needs n_clients >= 2, got {env.n_clients}")
    mask = jnp.asarray(np.asarray(env.param_mask, bool))

    def init(global_flat):
        return ()

    def aggregate(client_flat, state, ctx):
        valid = ctx.valid
        deltas = client_flat - ctx.global_flat[None, :]
        pdeltas = jnp.where(mask[None, :], deltas, 0.0)
        admitted = flame_admitted(pdeltas, valid, min_samples) & valid
        norms = jnp.linalg.norm(pdeltas, axis=1)
        s = jnp.nanmedian(jnp.where(valid, norms, jnp.nan))
        s = jnp.where(jnp.any(valid), s, 0.0)
        gamma = jnp.minimum(1.0, s / jnp.maximum(norms, 1e-12))
        n_adm = jnp.sum(admitted)
        w = jnp.where(admitted, gamma, 0.0) / jnp.maximum(n_adm, 1)
        new_global = ctx.global_flat + jnp.matmul(w, deltas, precision=jax.lax.Precision.HIGHEST)
        sigma = noise_lambda * s
        noise = sigma * jax.random.normal(ctx.key, new_global.shape, new_global.dtype)
        new_global = new_global + jnp.where(mask, noise, 0.0)
        return new_global, state, AggInfo(client_weights=w.astype(jnp.float32))

    return Aggregator(init, aggregate)


register(
    AggregatorSpec(
        "flame",
        flame,
        "FLAME (USENIX Sec'22): HDBSCAN majority cluster on cosine distances of updates, clip "
        "to the median norm, add Gaussian noise sigma = noise_lambda * median norm",
    )
)
