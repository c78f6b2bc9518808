"""Multi-Metrics (Huang et al., "Multi-Metrics Adaptively Identifies Backdoors in Federated
Learning", ICCV 2023).

With updates Δ_i = w_i − g (trainable parameters, `env.param_mask`), each client gets a
three-metric feature vector summing its distances to the other clients,

    x_i = ( Σ_{j≠i} (1 − cos(Δ_i, Δ_j)),  Σ_{j≠i} ‖Δ_i − Δ_j‖₁,  Σ_{j≠i} ‖Δ_i − Δ_j‖₂ ),

the features are whitened by the covariance Σ of the score matrix X = [x_1 … x_n]ᵀ
(dynamic weighting), s_i = x_iᵀ Σ⁺ x_i (Σ⁺ the pseudo-inverse: Σ is singular for n ≤ 3),
and the ⌊p·n⌋ clients (at least 1) with the lowest s_i are averaged uniformly:
g' = g + mean_{kept} Δ_i (BatchNorm statistics included). p = 0.3 as in the authors' code.

`reference_metrics=True` uses the authors' code's metrics instead of the paper's:
(1 − cos)² for the cosine term and |‖Δ_i‖ − ‖Δ_j‖| (a length difference, labelled
"Euclidean" there) for the third.

Numerics: s_i is invariant to rescaling each feature, so the features are divided by
their standard deviation before Σ is formed; otherwise Manhattan sums (∝ d) and cosine
sums (≤ 2n) would make Σ too ill-conditioned for float32.

Invalid (non-finite) rows are left out of every sum, of Σ and of the selection
(n above counts valid clients). client_weights = 1/k on the k kept clients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spmc_jax.aggregators import register
from spmc_jax.aggregators._cluster import cosine_distances, mean_of_kept_rule
from spmc_jax.aggregators.base import Aggregator, AggregatorEnv, AggregatorSpec, RoundContext


def multi_metrics_features(
    deltas: jax.Array, valid: jax.Array, reference_metrics: bool = False
) -> jax.Array:
    """The (n, 3) feature matrix x_i (cosine, Manhattan, Euclidean sums over valid j ≠ i)."""
    hi = jax.lax.Precision.HIGHEST
    cos_d = cosine_distances(deltas)
    if reference_metrics:
        cos_d = cos_d**2

    def manhattan_row(x):  # (n,) L1 distances from one row; (n, d) memory, not (n, n, d)
        return jnp.sum(jnp.abs(deltas - x[None, :]), axis=1)

    man = jax.lax.map(manhattan_row, deltas)
    norms = jnp.linalg.norm(deltas, axis=1)
    if reference_metrics:
        third = jnp.abs(norms[:, None] - norms[None, :])
    else:
        gram = jnp.matmul(deltas, deltas.T, precision=hi)
        sq = jnp.maximum(norms[:, None] ** 2 + norms[None, :] ** 2 - 2.0 * gram, 0.0)
        third = jnp.sqrt(jnp.where(jnp.eye(deltas.shape[0], dtype=bool), 0.0, sq))
    pair = valid[:, None] & valid[None, :] & ~jnp.eye(deltas.shape[0], dtype=bool)
    feats = jnp.stack([cos_d, man, third], axis=-1)
    return jnp.sum(jnp.where(pair[:, :, None], feats, 0.0), axis=1)


def multi_metrics_scores(feats: jax.Array, valid: jax.Array) -> jax.Array:
    """s_i = x_iᵀ Σ⁺ x_i with Σ the covariance (ddof 1) of the valid rows; invalid: +inf."""
    m = jnp.maximum(jnp.sum(valid), 1)
    mean = jnp.sum(jnp.where(valid[:, None], feats, 0.0), 0) / m
    cen = jnp.where(valid[:, None], feats - mean, 0.0)
    std = jnp.sqrt(jnp.sum(cen**2, 0) / jnp.maximum(m - 1, 1))
    scale = jnp.where(std > 0, std, 1.0)
    z, cz = feats / scale, cen / scale
    cov = cz.T @ cz / jnp.maximum(m - 1, 1)
    inv = jnp.linalg.pinv(cov)
    scores = jnp.einsum("ni,ij,nj->n", z, inv, z)
    return jnp.where(valid, scores, jnp.inf)


def multi_metrics(
    env: AggregatorEnv, *, p: float = 0.3, reference_metrics: bool = False
) -> Aggregator:
    """Build Multi-Metrics (see the module docstring for the formula and options).

    Args:
      env: run facts; uses param_mask.
      p: fraction of the valid clients kept (⌊p·n⌋, at least 1).
      reference_metrics: the authors' code's squared cosine and length-difference metrics.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"multi_metrics: p={p}; accepted: 0 < p <= 1")

    def kept_of(deltas: jax.Array, ctx: RoundContext) -> jax.Array:
        valid = ctx.valid
        n = deltas.shape[0]
        scores = multi_metrics_scores(
            multi_metrics_features(deltas, valid, reference_metrics), valid
        )
        n_valid = jnp.sum(valid)
        k = jnp.maximum(jnp.floor(p * n_valid + 1e-9).astype(jnp.int32), 1)
        # Rank by score, ties by row index (stable); keep the k best valid rows.
        rank = (
            jnp.zeros((n,), jnp.int32)
            .at[jnp.argsort(scores, stable=True)]
            .set(jnp.arange(n, dtype=jnp.int32))
        )
        return (rank < k) & valid

    return mean_of_kept_rule(env.param_mask, kept_of)


register(
    AggregatorSpec(
        "multi_metrics",
        multi_metrics,
        "Multi-Metrics (ICCV'23): summed cosine/Manhattan/Euclidean distances per client, "
        "whitened by their covariance; mean of the floor(p*n) lowest-score updates",
    )
)
