"""Oracle: centered clipping (Karimireddy, He & Jaggi, ICML 2021) in float64 NumPy."""

from __future__ import annotations

import numpy as np


def centered_clipping(global_flat, client_flat, tau, iters, v0=None, mask=None, valid=None):
    """Returns (new global g + v_L, v_L, normalised coefficients of the Δ_i in v_L).

    v_{l+1} = v_l + (1/n_valid) Σ_valid (Δ_i − v_l) min(1, τ/‖Δ_i − v_l‖), the norm over the
    masked coordinates, starting from v0 (zeros by default).
    """
    g = np.asarray(global_flat, np.float64)
    deltas = np.asarray(client_flat, np.float64) - g
    n, d = deltas.shape
    mask = np.ones(d, bool) if mask is None else np.asarray(mask, bool)
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    v = np.zeros(d) if v0 is None else np.asarray(v0, np.float64).copy()
    rows = [i for i in range(n) if valid[i]]
    coef = np.zeros(n)  # v = c_0 v0 + Σ coef_i Δ_i
    for _ in range(iters):
        step = np.zeros(d)
        new_coef = coef.copy()
        for i in rows:
            diff = deltas[i] - v
            norm = np.sqrt(np.sum(diff[mask] ** 2))
            s = 1.0 if norm <= tau else tau / norm
            step += diff * s
            # (Δ_i − v)·s/n adds s/n to Δ_i's coefficient and removes s/n times v's.
            new_coef -= coef * s / len(rows)
            new_coef[i] += s / len(rows)
        coef = new_coef
        v = v + step / len(rows)
    return g + v, v, coef / coef.sum()
