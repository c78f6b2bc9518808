"""Oracle: RFA's smoothed Weiszfeld geometric median (Pillutla et al., IEEE TSP 2022,
Algorithm 2) in float64 NumPy, written as the paper's plain loop.
"""

from __future__ import annotations

import numpy as np


def rfa(W, g, valid, n_samples, maxiter=3, eps=1e-5, ftol=1e-6, data_weighted=True):
    """Return (new_global, weights of the last Weiszfeld step)."""
    W = np.asarray(W, np.float64)
    g = np.asarray(g, np.float64)
    pts = W - g
    n = W.shape[0]
    a = np.array(
        [(float(n_samples[i]) if data_weighted else 1.0) if valid[i] else 0.0 for i in range(n)]
    )
    a = a / a.sum()

    def objective(z):
        return sum(a[i] * np.linalg.norm(z - pts[i]) for i in range(n))

    z = a @ pts
    w = a.copy()
    obj = objective(z)
    for _ in range(maxiter):
        prev = obj
        beta = np.array([a[i] / max(eps, np.linalg.norm(z - pts[i])) for i in range(n)])
        w = beta / beta.sum()
        z = w @ pts
        obj = objective(z)
        if abs(prev - obj) < ftol * obj:
            break
    return g + z, w
