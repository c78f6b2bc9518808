"""Exact 1-D two-means and the gap statistic (Tibshirani, Walther & Hastie, JRSS-B 2001), in
JAX for fixed shapes with a validity mask.

In one dimension an optimal k-means partition consists of contiguous runs of the sorted
values, so the optimal 2-means split is found exactly by trying every split point of the
sorted values (prefix sums). This replaces Lloyd's iterations (scikit-learn's KMeans,
used as the oracle in the tests) for FLDetector's 1-D suspicion scores.

Gap statistic for k ∈ {1, 2}: W_k = within-cluster sum of squares of the optimal k-means of
the data, W*_kb the same for B reference sets drawn uniformly on the data's range,
Gap(k) = mean_b log W*_kb − log W_k, s_k = std_b(log W*_kb)·√(1 + 1/B). The estimated
cluster count is 1 iff Gap(1) ≥ Gap(2) − s_2 (the smallest k with Gap(k) ≥ Gap(k+1) −
s_{k+1}); only "one cluster or more" is needed here. Fewer than 3 valid values, or all
equal, count as one cluster.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def two_means(x: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Optimal 2-means of the valid entries of the 1-D `x` (n,).

    Returns:
      (W_1, W_2, upper): within-cluster sums of squares for k = 1 and k = 2, and the mask
      (n,) of the valid entries in the cluster with the larger mean (all False when fewer
      than 2 valid entries).
    """
    n = x.shape[0]
    m = jnp.sum(valid)
    xs = jnp.sort(jnp.where(valid, x, jnp.inf))
    xs0 = jnp.where(jnp.arange(n) < m, xs, 0.0)
    c1 = jnp.cumsum(xs0)
    c2 = jnp.cumsum(xs0 * xs0)
    tot1, tot2 = c1[-1], c2[-1]
    mf = jnp.maximum(m, 1).astype(x.dtype)
    w1 = jnp.maximum(tot2 - tot1 * tot1 / mf, 0.0)
    p = jnp.arange(1, n + 1, dtype=x.dtype)  # left cluster = the p smallest
    left = c2 - c1 * c1 / p
    right_n = jnp.maximum(mf - p, 1.0)
    right = (tot2 - c2) - (tot1 - c1) ** 2 / right_n
    cost = jnp.maximum(left, 0.0) + jnp.maximum(right, 0.0)
    ok = p < mf
    best = jnp.argmin(jnp.where(ok, cost, jnp.inf))
    w2 = jnp.where(m >= 2, cost[best], 0.0)
    thr = xs[best]  # largest value of the lower cluster
    # Equal values never straddle the optimal split, so `x > thr` recovers the upper run.
    upper = valid & (x > thr) & (m >= 2)
    return w1, w2, upper


def gap_says_clustered(
    x: jax.Array, valid: jax.Array, key: jax.Array, n_refs: int = 20
) -> jax.Array:
    """True when the gap statistic prefers 2 clusters over 1 for the valid entries of x."""
    m = jnp.sum(valid)
    lo = jnp.min(jnp.where(valid, x, jnp.inf))
    hi = jnp.max(jnp.where(valid, x, -jnp.inf))
    span = hi - lo
    z = jnp.where(valid, (x - lo) / jnp.where(span > 0, span, 1.0), 0.0)
    tiny = 1e-12
    w1, w2, _ = two_means(z, valid)
    # m uniform points per reference set: the first m draws, whatever rows are valid, so
    # the decision does not depend on the row order.
    refs = jax.random.uniform(key, (n_refs, x.shape[0]), x.dtype)
    first_m = jnp.arange(x.shape[0]) < m
    rw1, rw2, _ = jax.vmap(lambda r: two_means(r, first_m))(refs)
    l1, l2 = jnp.log(jnp.maximum(rw1, tiny)), jnp.log(jnp.maximum(rw2, tiny))
    gap1 = jnp.mean(l1) - jnp.log(jnp.maximum(w1, tiny))
    gap2 = jnp.mean(l2) - jnp.log(jnp.maximum(w2, tiny))
    s2 = jnp.std(l2) * jnp.sqrt(1.0 + 1.0 / n_refs)
    return (m >= 3) & (span > 0) & (gap1 < gap2 - s2)
