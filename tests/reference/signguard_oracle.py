"""Oracle: SignGuard (Xu et al., ICDCS 2022, Algorithm 1) in float64 NumPy, with
scikit-learn's MeanShift as the clustering step (the paper's choice).

The sampled coordinate subset is an input (the rule draws it from its PRNG key).
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import MeanShift, estimate_bandwidth


def signguard(global_flat, client_flat, coords, mask, valid=None, lower=0.1, upper=3.0, q=0.5):
    """Returns (new global, selected index list)."""
    g = np.asarray(global_flat, np.float64)
    w = np.asarray(client_flat, np.float64)
    n = w.shape[0]
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    mask = np.asarray(mask, bool)
    ids = [i for i in range(n) if valid[i]]
    delta = w - g
    norms = np.array([np.linalg.norm(delta[i][mask]) for i in range(n)])
    med = float(np.median(norms[ids]))
    s1 = {i for i in ids if lower * med < norms[i] < upper * med}
    sub = delta[ids][:, np.asarray(coords)]
    feats = np.stack([(sub > 0).mean(1), (sub == 0).mean(1), (sub < 0).mean(1)], axis=1)
    feats = feats / (feats.max(axis=0) + 1e-8)
    bw = estimate_bandwidth(feats, quantile=q)
    labels = MeanShift(bandwidth=bw, cluster_all=False).fit(feats).labels_
    sizes = [np.sum(labels == c) for c in range(labels.max() + 1)]
    best = int(np.argmax(sizes))
    s2 = {ids[a] for a in range(len(ids)) if labels[a] == best}
    sel = sorted(s1 & s2) or sorted(s1) or ids
    out = g.copy()
    for i in sel:
        scale = min(1.0, med / norms[i]) if norms[i] > 0 else 1.0
        out += np.where(mask, delta[i] * scale, delta[i]) / len(sel)
    return out, sel
