"""Oracle: FLAME (Nguyen et al., USENIX Security 2022, Algorithm 1) in float64 NumPy, with
scikit-learn's HDBSCAN for the clustering step. Written from the paper; shares no code
with spmc_jax.aggregators.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.cluster import HDBSCAN


def flame(W, g, valid, param_mask, noise=None, noise_lambda=0.0):
    """Returns (new_global, weights, admitted). `noise`: the (d,) standard normal draw."""
    W = np.asarray(W, np.float64)
    g = np.asarray(g, np.float64)
    pm = np.asarray(param_mask, bool)
    n = W.shape[0]
    idx = [i for i in range(n) if valid[i]]
    deltas = W - g[None, :]
    u = deltas[:, pm]
    m = len(idx)
    dist = np.zeros((m, m))
    for a in range(m):
        for b in range(m):
            ua, ub = u[idx[a]], u[idx[b]]
            dist[a, b] = 1.0 - ua @ ub / (np.linalg.norm(ua) * np.linalg.norm(ub))
    np.fill_diagonal(dist, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        labels = (
            HDBSCAN(
                min_cluster_size=max(m // 2 + 1, 2),
                min_samples=1,
                metric="precomputed",
                allow_single_cluster=True,
            )
            .fit(np.maximum(dist, 0.0))
            .labels_
        )
    admitted = np.zeros(n, bool)
    for a, i in enumerate(idx):
        admitted[i] = labels[a] >= 0
    norms = np.linalg.norm(u, axis=1)
    s = float(np.median(norms[idx]))
    weights = np.zeros(n)
    n_adm = admitted.sum()
    for i in range(n):
        if admitted[i]:
            weights[i] = min(1.0, s / norms[i]) / n_adm
    new = g + weights @ deltas
    if noise is not None:
        new = new + np.where(pm, noise_lambda * s * np.asarray(noise, np.float64), 0.0)
    return new, weights, admitted
