"""Oracle: Multi-Metrics (Huang et al., ICCV 2023) in float64 NumPy with explicit loops,
written from the paper: summed cosine / Manhattan / Euclidean distances, score
x_iᵀ Σ⁻¹ x_i with Σ = np.cov of the score matrix, keep the ⌊p·n⌋ lowest.
"""

from __future__ import annotations

import numpy as np


def multi_metrics(W, g, valid, param_mask, p=0.3, reference_metrics=False):
    """Returns (new_global, weights, scores (valid rows; +inf elsewhere))."""
    W = np.asarray(W, np.float64)
    g = np.asarray(g, np.float64)
    pm = np.asarray(param_mask, bool)
    n = W.shape[0]
    deltas = W - g[None, :]
    u = deltas[:, pm]
    idx = [i for i in range(n) if valid[i]]
    feats = np.zeros((len(idx), 3))
    for a, i in enumerate(idx):
        for j in idx:
            if j == i:
                continue
            cos = u[i] @ u[j] / (np.linalg.norm(u[i]) * np.linalg.norm(u[j]))
            if reference_metrics:
                feats[a] += [
                    (1 - cos) ** 2,
                    np.sum(np.abs(u[i] - u[j])),
                    abs(np.linalg.norm(u[i]) - np.linalg.norm(u[j])),
                ]
            else:
                feats[a] += [1 - cos, np.sum(np.abs(u[i] - u[j])), np.linalg.norm(u[i] - u[j])]
    inv = np.linalg.inv(np.cov(feats.T))
    scores = np.full(n, np.inf)
    for a, i in enumerate(idx):
        scores[i] = feats[a] @ inv @ feats[a]
    k = max(1, int(np.floor(p * len(idx) + 1e-9)))
    kept = np.argsort(scores, kind="stable")[:k]
    weights = np.zeros(n)
    weights[kept] = 1.0 / k
    return g + weights @ deltas, weights, scores
