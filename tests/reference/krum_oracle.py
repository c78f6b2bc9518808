"""Oracle: Krum (Blanchard et al., NeurIPS 2017) in float64 NumPy, with explicit loops.

Written from the paper's definition; shares no code with spmc_jax.aggregators.
"""

from __future__ import annotations

import numpy as np


def krum_scores(deltas, f, valid=None, num_neighbors=None, squared=True, mask=None) -> np.ndarray:
    """Scores s_i = sum of the k smallest (squared) distances to the other valid rows.

    k = num_neighbors if given, else n_valid - f - 2; at most the n_valid - 1 available
    neighbours are summed. Invalid rows score +inf. `mask` selects the coordinates used.
    """
    x = np.asarray(deltas, np.float64)
    n = x.shape[0]
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    if mask is not None:
        x = x[:, np.asarray(mask, bool)]
    idx = [i for i in range(n) if valid[i]]
    k = num_neighbors if num_neighbors is not None else len(idx) - f - 2
    k = max(0, min(k, len(idx) - 1))
    scores = np.full(n, np.inf)
    for i in idx:
        dists = []
        for j in idx:
            if j != i:
                dist = float(np.sum((x[i] - x[j]) ** 2))
                dists.append(dist if squared else np.sqrt(dist))
        scores[i] = sum(sorted(dists)[:k])
    return scores


def krum_order(deltas, f, valid=None, num_neighbors=None, squared=True, mask=None) -> list[int]:
    """Row indices from best to worst: by score, then by the sum of (squared) distances to
    all valid rows (tie-break), then by index; invalid rows last."""
    x = np.asarray(deltas, np.float64)
    n = x.shape[0]
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    scores = krum_scores(deltas, f, valid, num_neighbors, squared, mask)
    if mask is not None:
        x = x[:, np.asarray(mask, bool)]
    total = np.full(n, np.inf)
    for i in range(n):
        if valid[i]:
            sq = [float(np.sum((x[i] - x[j]) ** 2)) for j in range(n) if valid[j]]
            total[i] = sum(sq) if squared else sum(np.sqrt(v) for v in sq)
    return sorted(range(n), key=lambda i: (scores[i], total[i], i))


def krum(global_flat, client_flat, f, valid=None, num_neighbors=None, squared=True, mask=None):
    """Returns (new global g + Δ_best, index of the selected client)."""
    g = np.asarray(global_flat, np.float64)
    deltas = np.asarray(client_flat, np.float64) - g
    best = krum_order(deltas, f, valid, num_neighbors, squared, mask)[0]
    return g + deltas[best], best
