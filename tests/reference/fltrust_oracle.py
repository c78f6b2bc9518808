"""Oracle: FLTrust (Cao et al., NDSS 2021) aggregation in float64 NumPy, given the server
update g0 (server training is the caller's business)."""

from __future__ import annotations

import numpy as np


def fltrust(global_flat, client_flat, server_update, mask=None, valid=None):
    """Returns (new global, normalised trust scores).

    TS_i = max(0, cos(Δ_i, g0)); Δ̂_i = Δ_i ‖g0‖/‖Δ_i‖ on the masked (parameter)
    coordinates, Δ_i unscaled elsewhere; g' = g + Σ TS_i Δ̂_i / Σ TS_i (g when Σ TS = 0).
    """
    g = np.asarray(global_flat, np.float64)
    deltas = np.asarray(client_flat, np.float64) - g
    g0 = np.asarray(server_update, np.float64)
    n, d = deltas.shape
    mask = np.ones(d, bool) if mask is None else np.asarray(mask, bool)
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    g0_norm = np.sqrt(sum(g0[k] ** 2 for k in range(d) if mask[k]))
    ts = np.zeros(n)
    scaled = np.zeros((n, d))
    for i in range(n):
        norm_i = np.sqrt(sum(deltas[i, k] ** 2 for k in range(d) if mask[k]))
        if not valid[i] or norm_i == 0 or g0_norm == 0:
            continue
        dot = sum(deltas[i, k] * g0[k] for k in range(d) if mask[k])
        ts[i] = max(0.0, dot / (norm_i * g0_norm))
        for k in range(d):
            scaled[i, k] = deltas[i, k] * (g0_norm / norm_i if mask[k] else 1.0)
    if ts.sum() == 0:
        return g.copy(), ts
    return g + (ts @ scaled) / ts.sum(), ts / ts.sum()
