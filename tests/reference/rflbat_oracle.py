"""Oracle: RFLBAT (Wang et al., arXiv:2201.03772, Algorithm 1) in float64 NumPy with
scikit-learn's PCA and KMeans (Lloyd from the farthest-point centres, re-derived in
tests/reference/auror_oracle.py). The gap statistic's uniform reference sets are inputs
(the rule draws them from its PRNG key).
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA

from tests.reference.auror_oracle import farthest_point_init


def _kmeans(x, k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns on duplicate points
        km = KMeans(k, init=farthest_point_init(x, k), n_init=1, algorithm="lloyd", tol=0.0)
        return km.fit(x)


def _outliers(x, idx, eps):
    ed = np.array([sum(np.linalg.norm(x[i] - x[j]) for j in idx) for i in idx])
    med = np.median(ed)
    return [i for i, e in zip(idx, ed, strict=True) if e <= eps * med]


def gap_k(x, refs, k_max):
    """Tibshirani's k on the min-max scaled rows of x; refs: (B, >= len(x), 2)."""
    m = len(x)
    span = np.where(np.ptp(x, 0) > 0, np.ptp(x, 0), 1.0)
    z = (x - x.min(0)) / span
    ks = range(1, min(k_max, m) + 1)  # Gap(k) for k > m is never consulted
    log_w = np.log([max(_kmeans(z, k).inertia_, 1e-300) for k in ks])
    log_wb = np.log([[max(_kmeans(r[:m], k).inertia_, 1e-300) for k in ks] for r in refs])
    gap = log_wb.mean(0) - log_w
    s = log_wb.std(0) * np.sqrt(1 + 1 / len(refs))
    for k in range(1, k_max):
        if k + 1 <= m and gap[k - 1] >= gap[k] - s[k]:
            return k
    return min(k_max, m)


def rflbat(W, g, valid, param_mask, refs, eps1=10.0, eps2=4.0, k_max=10):
    """Returns (new_global, weights, k)."""
    W = np.asarray(W, np.float64)
    g = np.asarray(g, np.float64)
    n = W.shape[0]
    deltas = W - g[None, :]
    vidx = np.flatnonzero(valid)
    x = np.zeros((n, 2))
    x[vidx] = PCA(2, svd_solver="full").fit_transform(deltas[vidx][:, np.asarray(param_mask)])
    acc = _outliers(x, list(vidx), eps1)
    k_max = min(k_max, n)
    k = gap_k(x[acc], refs, k_max)
    labels = _kmeans(x[acc], k).labels_
    best, best_score = None, np.inf
    for c in range(k):
        members = [a for a, lab in zip(acc, labels, strict=True) if lab == c]
        if not members:
            continue
        if len(members) == 1:
            score = 1.0
        else:
            pts = x[members]
            unit = pts / np.linalg.norm(pts, axis=1, keepdims=True)
            score = float(np.median((unit @ unit.T).mean(1)))
        if score < best_score:
            best, best_score = members, score
    kept = _outliers(x, best, eps2)
    weights = np.zeros(n)
    weights[kept] = 1.0 / len(kept)
    return g + weights @ deltas, weights, k
