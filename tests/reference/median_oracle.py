"""Oracle: coordinate-wise median (Yin et al., ICML 2018) in float64 NumPy."""

from __future__ import annotations

import numpy as np


def median(global_flat, client_flat, valid=None):
    """g + per-coordinate median of the valid updates (np.median: mean of the middle two)."""
    g = np.asarray(global_flat, np.float64)
    deltas = np.asarray(client_flat, np.float64) - g
    if valid is not None:
        deltas = deltas[np.asarray(valid, bool)]
    out = g.copy()
    for k in range(g.shape[0]):
        out[k] += np.median(deltas[:, k])
    return out


def median_shares(client_flat, valid=None):
    """Each client's share of the middle values over all coordinates (sums to 1).

    Ties (equal values) are broken by row order, like a stable sort.
    """
    x = np.asarray(client_flat, np.float64)
    n, d = x.shape
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    rows = [i for i in range(n) if valid[i]]
    m = len(rows)
    counts = np.zeros(n)
    for k in range(d):
        order = sorted(rows, key=lambda i: (x[i, k], i))
        middle = [order[(m - 1) // 2]] if m % 2 else [order[m // 2 - 1], order[m // 2]]
        for i in middle:
            counts[i] += 1
    return counts / counts.sum()
