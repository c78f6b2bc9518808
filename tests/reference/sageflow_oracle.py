"""Oracle: SageFlow's entropy filter + loss-weighted averaging (Park et al., NeurIPS 2021)
in float64 NumPy, plus a float64 linear-softmax proxy model for the tests.
"""

from __future__ import annotations

import numpy as np


def linear_softmax_loss_entropy(flat, x, y, n_classes):
    """Mean cross-entropy and mean prediction entropy of a linear softmax model.

    flat[: F*C] is the (F, C) weight matrix (row-major), flat[F*C : F*C + C] the bias.
    """
    flat = np.asarray(flat, np.float64)
    x = np.asarray(x, np.float64)
    f = x.shape[1]
    w = flat[: f * n_classes].reshape(f, n_classes)
    b = flat[f * n_classes : f * n_classes + n_classes]
    z = x @ w + b
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    p = np.exp(logp)
    loss = -np.mean(logp[np.arange(len(y)), y])
    entropy = -np.mean((p * logp).sum(axis=1))
    return loss, entropy


def sageflow(
    W, g, valid, n_samples, losses, entropies, eth=2.0, delta=1.0, eps=1e-5, data_weighted=False
):
    """Return (new_global, weights): α_i ∝ b_i·1[H_i < eth]/ℓ_i^δ + eps over valid clients."""
    W = np.asarray(W, np.float64)
    n = W.shape[0]
    a = np.zeros(n)
    for i in range(n):
        if not valid[i]:
            continue
        b = float(n_samples[i]) if data_weighted else 1.0
        q = 1.0 if entropies[i] < eth else 0.0
        a[i] = q * b / max(losses[i], 1e-12) ** delta + eps
    if a.sum() == 0:
        a = np.asarray(valid, np.float64)
    w = a / a.sum() if a.sum() > 0 else a
    return (w @ W if w.sum() > 0 else np.asarray(g, np.float64)), w
