"""Oracle: DnC (Shejwalkar & Houmansadr, NDSS 2021, Algorithm 2) in float64 NumPy.

Uses an explicit SVD of the centred sub-matrix (not the Gram eigendecomposition of the
implementation) and Python sets for the kept clients. The coordinate subsets are inputs,
so the caller can use the implementation's random draw.
"""

from __future__ import annotations

import numpy as np


def dnc(W, g, valid, coords, m, filter_frac=0.5, normalize=True):
    """Return (new_global (d,), weights (n,)).

    Args:
      W: (n, d) client models; g: (d,) global model; valid: (n,) bool.
      coords: sequence of index arrays, one per iteration.
      m: assumed attacker count; ⌊filter_frac·m⌋ clients are removed per iteration.
    """
    W = np.asarray(W, np.float64)
    g = np.asarray(g, np.float64)
    n = W.shape[0]
    delta = W - g
    x = delta.copy()
    if normalize:
        for i in range(n):
            x[i] = delta[i] / (np.linalg.norm(delta[i]) + 1e-5)
    ids = [i for i in range(n) if valid[i]]
    good = set(ids)
    n_keep = max(len(ids) - int(filter_frac * m), 1)
    for r in coords:
        sub = x[ids][:, np.asarray(r)]
        centred = sub - sub.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        scores = (centred @ vt[0]) ** 2
        keep = np.argsort(scores, kind="stable")[:n_keep]
        good &= {ids[k] for k in keep}
    w = np.zeros(n)
    for i in good:
        w[i] = 1.0 / len(good)
    return g + w @ delta, w
