"""Oracle: BackdoorIndicator (Li et al., USENIX Security 2024) in float64 NumPy for the
tests' linear-softmax proxy model (logits = x W + b, W = w[:F·C], b = w[F·C : F·C + C]):
indicator accuracy per client, the mean of the unflagged clients, and planting by gradient
descent with the analytic gradient of CE + (μ/2)‖w − start‖²."""

from __future__ import annotations

import numpy as np


def _logits(w, x, f, c):
    return x @ w[: f * c].reshape(f, c) + w[f * c : f * c + c]


def indicator_accuracy(logits, labels, c):
    pred = np.argmax(logits, axis=1)
    top = int(np.argmax(np.bincount(pred, minlength=c)))
    has = labels == top
    return float(np.sum(has & (pred == top)) / max(np.sum(has), 1))


def plant(start, x, labels, f, c, steps, lr, mu):
    w = start.copy()
    y = np.eye(c)[labels]
    for _ in range(steps):
        z = _logits(w, x, f, c)
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        gz = (p - y) / len(x)
        grad = mu * (w - start)
        grad[: f * c] += (x.T @ gz).reshape(-1)
        grad[f * c : f * c + c] += gz.sum(axis=0)
        w = w - lr * grad
    return w


def indicator_round(g, client_flat, x_o, labels, f, c, planted, threshold, steps, lr, mu):
    """Returns (new global, kept indices, indicator accuracies)."""
    g = np.asarray(g, np.float64)
    w = np.asarray(client_flat, np.float64)
    x_o = np.asarray(x_o, np.float64)
    ia = [indicator_accuracy(_logits(wi, x_o, f, c), labels, c) for wi in w]
    kept = [i for i in range(len(w)) if not (planted and ia[i] >= threshold)] or list(range(len(w)))
    avg = g + np.mean(w[kept] - g, axis=0)
    return plant(avg, x_o, labels, f, c, steps, lr, mu), kept, ia
