"""Float64 oracle for FedAvg (McMahan et al. 2017): g' = Σ_i p_i w_i over valid clients.

Uniform: p_i = 1/|V|; data-weighted: p_i = n_i / Σ_{j∈V} n_j; invalid clients get p_i = 0.
"""

from __future__ import annotations

import numpy as np


def fedavg(w: np.ndarray, n_samples: np.ndarray, valid: np.ndarray, data_weighted: bool):
    """Returns (new global (d,), weights (n,)) in float64."""
    w = np.asarray(w, np.float64)
    base = np.asarray(n_samples, np.float64) if data_weighted else np.ones(len(w))
    p = np.where(valid, base, 0.0)
    p = p / p.sum()
    new = np.zeros(w.shape[1])
    for i in range(len(w)):
        new += p[i] * w[i]
    return new, p
