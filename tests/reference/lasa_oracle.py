"""Oracle: LASA (Xu et al., WACV 2025, Algorithm 1) in float64 NumPy, per client and per
layer with explicit loops. `layers`: list of (start, stop, is_weight_tensor) covering the
parameter coordinates; other coordinates (statistics) take the plain mean."""

from __future__ import annotations

import numpy as np


def _mz(values):
    v = np.asarray(values, np.float64)
    std = v.std()
    return np.zeros_like(v) if std == 0 else np.abs(v - np.median(v)) / std


def lasa(global_flat, client_flat, layers, valid, sparsity=0.3, lam_n=2.0, lam_s=1.0):
    """Returns (new global, client shares)."""
    g = np.asarray(global_flat, np.float64)
    w = np.asarray(client_flat, np.float64)
    n, d = w.shape
    ids = [i for i in range(n) if valid[i]]
    param = np.zeros(d, bool)
    wt = np.zeros(d, bool)
    for a, b, is_w in layers:
        param[a:b] = True
        wt[a:b] = is_w
    delta = {i: np.where(param, w[i] - g, 0.0) for i in ids}
    med = np.median([np.linalg.norm(delta[i]) for i in ids])
    k = int((1 - sparsity) * wt.sum())
    for i in ids:
        nrm = np.linalg.norm(delta[i])
        if nrm > 0:
            delta[i] = delta[i] * min(1.0, med / nrm)
        mags = np.abs(delta[i][wt])
        thr = np.sort(mags)[::-1][k - 1]
        sub = delta[i][wt]
        sub[mags < thr] = 0.0
        delta[i][wt] = sub
    out = g + np.where(param, 0.0, np.mean([w[i] - g for i in ids], axis=0))
    share = np.zeros(n)
    for a, b, _ in layers:
        norms = [np.linalg.norm(delta[i][a:b]) for i in ids]
        purity = []
        for i in ids:
            s = np.sign(delta[i][a:b])
            nz = np.abs(s).sum()
            purity.append(0.5 * (1 + s.sum() / nz) if nz > 0 else 0.5)
        mz_n, mz_s = _mz(norms), _mz(purity)
        kept = [i for p, i in enumerate(ids) if mz_n[p] < lam_n and mz_s[p] < lam_s] or ids
        out[a:b] += np.mean([delta[i][a:b] for i in kept], axis=0)
        for i in kept:
            share[i] += (b - a) / param.sum() / len(kept)
    return out, share
