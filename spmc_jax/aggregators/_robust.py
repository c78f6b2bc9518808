"""Shared building blocks of the robust rules (Krum family, Bulyan, trimmed means, DnC).

All functions are jittable over (n, d): the client count n and the coordinate count d only
set array shapes; counts such as `n_neighbors`, `trim` and `k` are static Python ints.

Rows are client vectors (usually updates Δ_i = w_i − g: distances are translation
invariant, and updates have small norms, which keeps the Gram form accurate, see
`pairwise_sq_dists`). Where a `valid` mask is accepted, rows with `valid == False` are
excluded: they never count as neighbours, are never kept and never enter a mean.

This module's signatures are shared with other rules; keep them stable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pairwise_sq_dists(x: jax.Array, center: jax.Array | None = None) -> jax.Array:
    """Squared Euclidean distances ‖x_i − x_j‖² between all rows, via the Gram matrix.

    D_ij = ‖x_i‖² + ‖x_j‖² − 2⟨x_i, x_j⟩, clamped at 0, with exact zeros on the diagonal.
    One (n, d) @ (d, n) product instead of an (n, n, d) difference tensor.

    Accuracy: the subtraction cancels, so the absolute error of D_ij is about
    eps · (‖x_i‖² + ‖x_j‖²) · O(1) (eps = 1.2e-7 in float32), i.e. relative to D_ij it is
    eps · (‖x_i‖² + ‖x_j‖²) / D_ij. Pass updates (not whole models), or a `center` close to
    the rows, so that the norms are of the order of the distances.

    Args:
      x: (n, d) rows.
      center: optional (d,) vector subtracted from every row first (distances are
        unchanged in exact arithmetic; a nearby center reduces cancellation).

    Returns:
      (n, n) symmetric, non-negative, zero diagonal, dtype of `x`.
    """
    if center is not None:
        x = x - center[None, :]
    gram = x @ x.T
    sq = jnp.diagonal(gram)
    d = sq[:, None] + sq[None, :] - 2.0 * gram
    d = jnp.maximum(d, 0.0)
    d = 0.5 * (d + d.T)  # exact symmetry despite rounding in the product
    return jnp.where(jnp.eye(x.shape[0], dtype=bool), jnp.zeros((), d.dtype), d)


def krum_scores(
    sq_dists: jax.Array, n_neighbors: int | jax.Array, valid: jax.Array | None = None
) -> jax.Array:
    """Krum scores (Blanchard et al., NeurIPS 2017): s_i = Σ_{j ∈ N_i} D_ij.

    N_i = the `n_neighbors` rows j ≠ i (valid ones only) with the smallest D_ij. Krum uses
    D = squared distances and n_neighbors = n − f − 2. Any (n, n) dissimilarity works (the
    reference's Krum/Bulyan sum non-squared distances: pass `jnp.sqrt(sq_dists)`).

    Args:
      sq_dists: (n, n) dissimilarities, e.g. from `pairwise_sq_dists`.
      n_neighbors: number of nearest neighbours summed, a Python int or a traced int32
        scalar (clamped to [0, n − 1]).
      valid: optional (n,) bool; invalid rows are never neighbours and score +inf.

    Returns:
      (n,) scores, lower = more central. If a row has fewer than `n_neighbors` valid
      neighbours, only the available ones are summed.
    """
    n = sq_dists.shape[0]
    k = jnp.clip(jnp.asarray(n_neighbors, jnp.int32), 0, max(n - 1, 0))
    inf = jnp.asarray(jnp.inf, sq_dists.dtype)
    excluded = jnp.eye(n, dtype=bool)
    if valid is not None:
        excluded = excluded | ~valid[None, :]
    nearest = jnp.sort(jnp.where(excluded, inf, sq_dists), axis=1)
    take = (jnp.arange(n)[None, :] < k) & jnp.isfinite(nearest)
    scores = jnp.sum(jnp.where(take, nearest, 0.0), axis=1)
    if valid is not None:
        scores = jnp.where(valid, scores, inf)
    return scores


def resolve_num_malicious(env_value: int, override: int, n_clients: int) -> int:
    """The attacker count a rule assumes: `override` if >= 0, else the env's value.

    Raises:
      ValueError: if the result is outside [0, n_clients].
    """
    m = env_value if override < 0 else override
    if not 0 <= m <= n_clients:
        raise ValueError(
            f"num_malicious={m} is not valid for n_clients={n_clients}; accepted: 0..{n_clients} "
            f"(or -1 to use the environment's value {env_value})"
        )
    return int(m)


def _ranks(x: jax.Array) -> jax.Array:
    """Per-column rank (0-based, ties broken by row order) of each entry of (n, d) `x`."""
    order = jnp.argsort(x, axis=0, stable=True)
    n = x.shape[0]
    ranks = jnp.zeros_like(order)
    cols = jnp.arange(x.shape[1])[None, :]
    return ranks.at[order, cols].set(jnp.broadcast_to(jnp.arange(n)[:, None], order.shape))


def _n_valid(x: jax.Array, valid: jax.Array | None) -> jax.Array:
    n = x.shape[0]
    return jnp.asarray(n, jnp.int32) if valid is None else jnp.sum(valid).astype(jnp.int32)


def _masked_mean(x: jax.Array, kept: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Column means of `x` over `kept` entries, and each row's kept fraction (sums to 1)."""
    kept_f = kept.astype(x.dtype)
    count = jnp.sum(kept_f, axis=0)
    mean = jnp.sum(kept_f * x, axis=0) / jnp.maximum(count, 1.0)
    per_row = jnp.sum(kept_f, axis=1)
    share = per_row / jnp.maximum(jnp.sum(per_row), 1.0)
    return mean, share


def coordinate_trimmed_mean_kept(
    x: jax.Array, trim: int, valid: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Coordinate-wise trimmed mean and each row's share of the kept entries.

    Per coordinate, sort the m valid values, drop the `trim` smallest and the `trim`
    largest, and average the remaining m − 2·trim (Yin et al., ICML 2018). When
    m ≤ 2·trim the trim is reduced to ⌊(m − 1)/2⌋ so at least one (the median) value stays.

    Returns:
      (mean (d,), share (n,)): share_i = (#coordinates where row i was kept) / (total kept
      entries), i.e. row i's average contribution to the result; sums to 1.
    """
    m = _n_valid(x, valid)
    t = jnp.minimum(jnp.asarray(int(trim), jnp.int32), jnp.maximum(m - 1, 0) // 2)
    # Invalid rows sort last (+inf) so the valid values occupy ranks 0..m-1.
    xs = x if valid is None else jnp.where(valid[:, None], x, jnp.inf)
    r = _ranks(xs)
    kept = (r >= t) & (r < m - t)
    return _masked_mean(x, kept)


def coordinate_trimmed_mean(x: jax.Array, trim: int, valid: jax.Array | None = None) -> jax.Array:
    """Coordinate-wise trimmed mean (drop `trim` smallest and largest per coordinate), (d,).

    See `coordinate_trimmed_mean_kept` for the handling of `valid` and small m.
    """
    return coordinate_trimmed_mean_kept(x, trim, valid)[0]


def coordinate_median(x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Coordinate-wise median over the valid rows (mean of the two middle values if even), (d,).

    All rows invalid gives zeros.
    """
    m = _n_valid(x, valid)
    xs = x if valid is None else jnp.where(valid[:, None], x, jnp.inf)
    s = jnp.sort(xs, axis=0)
    lo = jnp.maximum(m - 1, 0) // 2
    hi = jnp.maximum(m, 1) // 2
    hi = jnp.where(m > 0, hi, 0)
    med = 0.5 * (s[lo] + s[hi])
    return jnp.where(m > 0, med, jnp.zeros_like(med))


def closest_to_median_mean_kept(
    x: jax.Array, k: int, valid: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Per coordinate, the mean of the `k` valid values closest to the coordinate median.

    This is Bulyan's aggregation step (El Mhamdi et al., ICML 2018, β = θ − 2f) and the
    reference's TrimmedMean. Ties in |x − median| are broken by row order. With fewer
    than `k` valid rows, all valid rows are averaged.

    Returns:
      (mean (d,), share (n,)) as in `coordinate_trimmed_mean_kept`.
    """
    med = coordinate_median(x, valid)
    dev = jnp.abs(x - med[None, :])
    if valid is not None:
        dev = jnp.where(valid[:, None], dev, jnp.inf)
    r = _ranks(dev)
    kept = r < int(k)
    if valid is not None:
        kept = kept & valid[:, None]
    return _masked_mean(x, kept)


def closest_to_median_mean(x: jax.Array, k: int, valid: jax.Array | None = None) -> jax.Array:
    """Mean of the `k` values closest to the coordinate-wise median, per coordinate, (d,)."""
    return closest_to_median_mean_kept(x, k, valid)[0]


def sign_agreement_weights(
    delta: jax.Array, step: jax.Array, base: jax.Array, mask: jax.Array
) -> jax.Array:
    """Each row's share of a sign-based step (RLR, RSA client_weights), (n,) float32.

    normalise(base_i · mean_{k ∈ mask} 1[sign(delta_ik) = sign(step_k) ≠ 0]): the fraction of
    the masked coordinates where row i pushed in the direction the server moved. Falls back
    to normalise(base) when no row agrees anywhere (e.g. a zero step).
    """
    agree = (jnp.sign(delta) == jnp.sign(step)[None, :]) & (step != 0)[None, :] & mask[None, :]
    frac = jnp.sum(agree, axis=1).astype(jnp.float32) / jnp.maximum(jnp.sum(mask), 1)
    raw = base.astype(jnp.float32) * frac
    total = jnp.sum(raw)
    out = jnp.where(total > 0, raw, base.astype(jnp.float32))
    return out / jnp.maximum(jnp.sum(out), 1e-30)


__all__ = [
    "closest_to_median_mean",
    "closest_to_median_mean_kept",
    "coordinate_median",
    "coordinate_trimmed_mean",
    "coordinate_trimmed_mean_kept",
    "krum_scores",
    "pairwise_sq_dists",
    "resolve_num_malicious",
    "sign_agreement_weights",
]
