"""Oracle: norm clipping (Sun et al., 2019) in float64 NumPy, without the noise."""

from __future__ import annotations

import numpy as np


def norm_clipping(global_flat, client_flat, max_norm=None, mask=None, valid=None):
    """Returns (new global, normalised clip factors).

    Δ̃_i = Δ_i · min(1, M/‖Δ_i‖) (norm over the masked coordinates), g' = g + mean over the
    valid rows. M = max_norm, or the median norm of the valid updates when None.
    """
    g = np.asarray(global_flat, np.float64)
    deltas = np.asarray(client_flat, np.float64) - g
    n, d = deltas.shape
    mask = np.ones(d, bool) if mask is None else np.asarray(mask, bool)
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    norms = np.array([np.sqrt(np.sum(deltas[i][mask] ** 2)) for i in range(n)])
    m = np.median(norms[valid]) if max_norm is None else max_norm
    factors = np.zeros(n)
    total = np.zeros(d)
    for i in range(n):
        if valid[i]:
            factors[i] = 1.0 if norms[i] <= m else m / norms[i]
            total += factors[i] * deltas[i]
    return g + total / valid.sum(), factors / factors.sum()
