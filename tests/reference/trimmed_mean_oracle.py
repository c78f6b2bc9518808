"""Oracle: coordinate-wise trimmed mean (Yin et al., ICML 2018) and the reference's
"mean of the k values closest to the median" variant, in float64 NumPy with loops."""

from __future__ import annotations

import numpy as np


def trimmed_mean(global_flat, client_flat, beta, valid=None):
    """Returns (g + per-coordinate β-trimmed mean of the valid updates, client shares).

    With m valid rows and 2β >= m the trim is lowered to (m - 1) // 2. The share of a
    client is its count of kept entries over all coordinates, normalised to sum 1; ties
    are broken by row order (stable sort).
    """
    g = np.asarray(global_flat, np.float64)
    deltas = np.asarray(client_flat, np.float64) - g
    n, d = deltas.shape
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    rows = [i for i in range(n) if valid[i]]
    m = len(rows)
    t = min(beta, (m - 1) // 2)
    out = g.copy()
    counts = np.zeros(n)
    for k in range(d):
        order = sorted(rows, key=lambda i: (deltas[i, k], i))
        kept = order[t : m - t]
        out[k] += np.mean([deltas[i, k] for i in kept])
        for i in kept:
            counts[i] += 1
    return out, counts / counts.sum()


def closest_to_median_mean(global_flat, client_flat, k_closest):
    """g + per coordinate the mean of the k updates closest to the coordinate median."""
    g = np.asarray(global_flat, np.float64)
    deltas = np.asarray(client_flat, np.float64) - g
    n, d = deltas.shape
    out = g.copy()
    for k in range(d):
        col = deltas[:, k]
        med = np.median(col)
        order = sorted(range(n), key=lambda i: (abs(col[i] - med), i))
        out[k] += np.mean(col[order[:k_closest]])
    return out


def momentum_rounds(global_flat, rounds_updates, momentum, mask):
    """Server momentum over rounds: v ← μ v + u on parameters (mask True), v ← u elsewhere;
    g ← g + v. `rounds_updates` is a list of aggregated updates (one per round)."""
    g = np.asarray(global_flat, np.float64).copy()
    v = np.zeros_like(g)
    mask = np.asarray(mask, bool)
    out = []
    for u in rounds_updates:
        v = np.where(mask, momentum * v + u, u)
        g = g + v
        out.append(g.copy())
    return out
