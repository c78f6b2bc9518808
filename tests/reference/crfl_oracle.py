"""Oracle: CRFL's server step (Xie et al., ICML 2021, Algorithm 1) in float64 NumPy."""

from __future__ import annotations

import numpy as np


def crfl(W, g, valid, n_samples, param_mask, t, rounds, noise, a=5.0, b=30.0, rho_max=100.0):
    """Return (new_global, weights).

    `noise` (d,) is the Gaussian draw the caller wants added to the parameters (it is
    skipped in the last round t = rounds − 1).
    """
    W = np.asarray(W, np.float64)
    n = W.shape[0]
    alpha = np.array([float(n_samples[i]) if valid[i] else 0.0 for i in range(n)])
    alpha /= alpha.sum()
    avg = alpha @ W
    pm = np.asarray(param_mask, bool)
    rho = min(a * t + b, rho_max)
    norm = np.sqrt(np.sum(avg[pm] ** 2))
    out = avg.copy()
    if norm > rho:
        out[pm] = avg[pm] * rho / norm
    if t < rounds - 1:
        out[pm] = out[pm] + np.asarray(noise, np.float64)[pm]
    return out, alpha
