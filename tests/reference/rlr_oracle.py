"""Oracle: RLR, robust learning rate (Ozdayi et al., AAAI 2021, Eq. 2-3) in float64 NumPy."""

from __future__ import annotations

import numpy as np


def rlr(W, g, valid, n_samples, param_mask, threshold=4.0, server_lr=1.0):
    """Return (new_global, client_weights).

    client_weights_i ∝ α_i · (fraction of parameter coordinates where sign(Δ_i) equals the
    sign of the applied step), falling back to α when nobody agrees anywhere.
    """
    W = np.asarray(W, np.float64)
    g = np.asarray(g, np.float64)
    n, d = W.shape
    alpha = np.array([float(n_samples[i]) if valid[i] else 0.0 for i in range(n)])
    alpha /= alpha.sum()
    delta = np.array([W[i] - g if valid[i] else np.zeros(d) for i in range(n)])
    new = g.copy()
    step = np.zeros(d)
    for k in range(d):
        avg = sum(alpha[i] * delta[i, k] for i in range(n))
        if param_mask[k]:
            votes = abs(sum(np.sign(delta[i, k]) for i in range(n)))
            avg = avg * (server_lr if votes >= threshold else -server_lr)
        step[k] = avg
        new[k] = g[k] + avg
    return new, _agreement(delta, step, alpha, param_mask)


def _agreement(delta, step, base, mask):
    n, d = delta.shape
    p = max(int(np.sum(mask)), 1)
    raw = np.array(
        [
            base[i]
            * sum(
                1
                for k in range(d)
                if mask[k] and step[k] != 0 and np.sign(delta[i, k]) == np.sign(step[k])
            )
            / p
            for i in range(n)
        ]
    )
    if raw.sum() <= 0:
        raw = np.asarray(base, np.float64)
    return raw / raw.sum()
