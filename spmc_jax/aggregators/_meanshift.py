"""Mean-shift clustering with a flat kernel, in JAX (jittable, fixed shapes).

Follows scikit-learn's `MeanShift` (Comaniciu & Meer, TPAMI 2002, flat kernel) with every
point as a seed (`bin_seeding=False`):

1. bandwidth h (if not given) = `estimate_bandwidth(X, quantile)`: the mean over the points
   of the distance to their k-th nearest point, the point itself included as the first,
   k = max(⌊n·quantile⌋, 1);
2. from each seed c: repeat c ← mean{x : ‖x − c‖ ≤ h} until the shift is ≤ 1e-3·h or after
   `max_iter` shifts; its intensity = the number of points within h before the last shift;
3. sort the converged centres by (intensity, centre coordinates), descending; walk that
   order and drop every later centre within h of a kept one;
4. label each point with its nearest kept centre; with `cluster_all=False`, points farther
   than h from every kept centre are orphans (label −1).

Invalid points (`valid` False) are neither seeds nor neighbours and get label −1. Labels
are positions in the sorted centre order (not compacted to 0..K−1): comparing sizes,
the first largest cluster is the one with the highest-intensity centre, as with sklearn's
compact labels.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class MeanShiftResult(NamedTuple):
    """labels (n,) int32 (−1: orphan or invalid); centers (n, f) in sorted order; kept (n,)
    bool: which sorted centres survived deduplication; bandwidth: scalar."""

    labels: jax.Array
    centers: jax.Array
    kept: jax.Array
    bandwidth: jax.Array


def _dists(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum((a[:, None, :] - b[None, :, :]) ** 2, axis=-1))


def estimate_bandwidth(x: jax.Array, valid: jax.Array, quantile: float = 0.3) -> jax.Array:
    """Mean distance of each valid point to its k-th nearest valid point (itself first)."""
    n = x.shape[0]
    m = jnp.sum(valid)
    k = jnp.maximum(jnp.floor(m * quantile).astype(jnp.int32), 1)
    d = jnp.where(valid[None, :], _dists(x, x), jnp.inf)
    kth = jnp.sort(d, axis=1)[jnp.arange(n), jnp.minimum(k - 1, n - 1)]
    total = jnp.sum(jnp.where(valid, kth, 0.0))
    return total / jnp.maximum(m, 1)


def mean_shift(
    x: jax.Array,
    valid: jax.Array | None = None,
    *,
    bandwidth: float | None = None,
    quantile: float = 0.3,
    cluster_all: bool = True,
    max_iter: int = 300,
) -> MeanShiftResult:
    """Flat-kernel mean shift of the rows of `x` (n, f) (see the module docstring)."""
    n = x.shape[0]
    valid = jnp.ones(n, bool) if valid is None else valid
    h = (
        estimate_bandwidth(x, valid, quantile)
        if bandwidth is None
        else jnp.asarray(bandwidth, x.dtype)
    )
    stop = 1e-3 * h

    def within(c):
        return valid & (jnp.sqrt(jnp.sum((x - c[None, :]) ** 2, axis=1)) <= h)

    def seed_run(c0):
        def cond(s):
            _, _, it, done = s
            return ~done & (it <= max_iter)

        def body(s):
            c, _, it, _ = s
            inside = within(c)
            cnt = jnp.sum(inside, dtype=jnp.int32)  # int32 carry under x64 too
            new = jnp.sum(jnp.where(inside[:, None], x, 0.0), axis=0) / jnp.maximum(cnt, 1)
            new = jnp.where(cnt > 0, new, c)
            done = (cnt == 0) | (jnp.linalg.norm(new - c) <= stop) | (it == max_iter)
            return new, cnt, it + 1, done

        c, cnt, _, _ = jax.lax.while_loop(cond, body, (c0, jnp.int32(0), jnp.int32(0), False))
        return c, cnt

    centers, counts = jax.vmap(seed_run)(x)
    has = valid & (counts > 0)
    # Descending by (intensity, coordinates): lexsort's last key is the primary one.
    keys = tuple(centers[:, j] for j in reversed(range(x.shape[1])))
    inten = jnp.where(has, counts, -1)
    order = jnp.lexsort((*keys, inten))[::-1]
    centers, has = centers[order], has[order]
    close = _dists(centers, centers) <= h

    def dedup(p, kept):
        drop = close[p] & kept[p]
        return jnp.where(kept[p], (kept & ~drop).at[p].set(True), kept)

    kept = jax.lax.fori_loop(0, n, dedup, has)
    d = jnp.where(kept[None, :], _dists(x, centers), jnp.inf)
    labels = jnp.argmin(d, axis=1).astype(jnp.int32)
    ok = valid if cluster_all else valid & (jnp.min(d, axis=1) <= h)
    return MeanShiftResult(jnp.where(ok, labels, -1), centers, kept, h)


def largest_cluster(labels: jax.Array) -> jax.Array:
    """Mask (n,) of the points in the largest cluster (ties: the smallest label); −1 never."""
    n = labels.shape[0]
    sizes = jnp.sum((labels[None, :] == jnp.arange(n)[:, None]), axis=1)
    best = jnp.argmax(sizes)
    return (labels == best) & (labels >= 0)
