"""Oracle: Bulyan (El Mhamdi et al., ICML 2018, Algorithm 2) with the reference's server
momentum, in float64 NumPy: Python lists for the iterated Krum selection, an explicit
per-coordinate sort for the β values closest to the median, direct distances.
"""

from __future__ import annotations

import numpy as np


def counts(n, f, reference_fixed_f=False):
    """(θ, β) as documented in spmc_jax.aggregators.bulyan."""
    if reference_fixed_f:
        theta = max(n - 2, 1)
        return theta, max(theta - 3, 1)
    theta = max(n - 2 * f, 1)
    return theta, max(theta - 2 * f, 1 if theta % 2 else 2)


def bulyan(
    W,
    g,
    valid,
    f,
    velocity,
    param_mask,
    momentum=0.9,
    momentum_buffers=False,
    reference_fixed_f=False,
    base=None,
):
    """One Bulyan round. Returns (new_global, new_velocity, client_weights, selected ids)."""
    W = np.asarray(W, np.float64)
    g = np.asarray(g, np.float64)
    n, d = W.shape
    delta = W - g
    theta, beta = counts(n, f, reference_fixed_f)

    def dist(i, j):
        sq = float(np.sum((delta[i] - delta[j]) ** 2))
        return np.sqrt(sq) if reference_fixed_f else sq

    remaining = [i for i in range(n) if valid[i]]
    selected = []
    while len(selected) < theta and remaining:
        r = len(remaining)
        k = r - 1 if reference_fixed_f else min(max(r - f - 2, min(1, r - 1)), r - 1)
        scores = {}
        for i in remaining:
            ds = sorted(dist(i, j) for j in remaining if j != i)
            scores[i] = sum(ds[:k])
        best = min(remaining, key=lambda i: (scores[i], i))
        selected.append(best)
        remaining.remove(best)

    agg = np.zeros(d)
    kept = np.zeros(n)
    b = min(beta, len(selected))
    for c in range(d):
        vals = sorted(delta[i, c] for i in selected)
        med = np.median(vals)
        closest = sorted(selected, key=lambda i: (abs(delta[i, c] - med), i))[:b]
        agg[c] = np.mean([delta[i, c] for i in closest])
        for i in closest:
            kept[i] += 1
    mom = np.asarray(param_mask, bool) | momentum_buffers
    v = np.where(mom, momentum * np.asarray(velocity, np.float64) + agg, agg)
    start = g if base is None else np.asarray(base, np.float64)
    return start + v, v, kept / kept.sum(), sorted(selected)
