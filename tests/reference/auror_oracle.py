"""Oracle: Auror (Shen et al., ACSAC 2016) in float64 NumPy: the per-feature 2-means by
exhaustive search, the client 2-means by scikit-learn's KMeans from the same
farthest-point initial centres as the rule (re-derived here).
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans


def feature_gaps(u):
    """|μ_1 − μ_0| of the globally optimal 2-means of each column of u (rows: clients).

    Exhaustive search over every split of the rows into two non-empty groups (2^(m−1) − 1
    of them; m ≤ 12 here). scikit-learn's Lloyd iterations can stop in a local optimum in
    one dimension, so they are no oracle for the optimum.
    """
    m = u.shape[0]
    codes = np.arange(1, 2 ** (m - 1))
    groups = ((codes[:, None] >> np.arange(m)[None, :]) & 1).astype(bool)  # (P, m)
    gaps = np.zeros(u.shape[1])
    for k in range(u.shape[1]):
        col = u[:, k]
        best = (np.inf, 0.0)
        for grp in groups:
            a, b = col[grp], col[~grp]
            sse = np.sum((a - a.mean()) ** 2) + np.sum((b - b.mean()) ** 2)
            if sse < best[0]:
                best = (sse, abs(a.mean() - b.mean()))
        gaps[k] = best[1]
    return gaps


def farthest_point_init(x, k):
    first = int(np.argmin(((x - x.mean(0)) ** 2).sum(1)))
    chosen = [first]
    mind = ((x - x[first]) ** 2).sum(1)
    while len(chosen) < k:
        nxt = int(np.argmax(mind))
        chosen.append(nxt)
        mind = np.minimum(mind, ((x - x[nxt]) ** 2).sum(1))
    return x[chosen]


def auror(W, g, valid, param_mask, alpha):
    """Returns (new_global, weights, gaps (of the parameter coordinates))."""
    W = np.asarray(W, np.float64)
    g = np.asarray(g, np.float64)
    n = W.shape[0]
    deltas = W - g[None, :]
    idx = np.flatnonzero(valid)
    u = deltas[idx][:, np.asarray(param_mask, bool)]
    gaps = feature_gaps(u)
    indicative = gaps > alpha
    keep = np.ones(len(idx), bool)
    if indicative.any():
        x = u[:, indicative]
        km = KMeans(2, init=farthest_point_init(x, 2), n_init=1, algorithm="lloyd", tol=0.0)
        labels = km.fit(x).labels_
        sizes = np.bincount(labels, minlength=2)
        far = np.linalg.norm(km.cluster_centers_[0] - km.cluster_centers_[1]) > alpha
        if far and sizes[0] != sizes[1]:
            keep = labels != int(np.argmin(sizes))
    weights = np.zeros(n)
    weights[idx[keep]] = 1.0 / keep.sum()
    return g + weights @ deltas, weights, gaps
