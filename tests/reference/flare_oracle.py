"""Oracle: FLARE (Wang et al., AsiaCCS 2022, Algorithm 1) in float64 NumPy, explicit loops.

Input: each client's penultimate-layer representations (computed by the test from its own
NumPy model), the updates, and the rule's hyperparameters.
"""

from __future__ import annotations

import numpy as np


def mmd2_unbiased(p, q, gamma):
    """Unbiased MMD² between sample sets p (m, h) and q (m', h), Gaussian kernel."""

    def k(u, v):
        return np.exp(-gamma * np.sum((u - v) ** 2))

    m, mq = len(p), len(q)
    xx = sum(k(p[a], p[b]) for a in range(m) for b in range(m) if a != b) / (m * (m - 1))
    yy = sum(k(q[a], q[b]) for a in range(mq) for b in range(mq) if a != b) / (mq * (mq - 1))
    xy = sum(k(p[a], q[b]) for a in range(m) for b in range(mq)) / (m * mq)
    return xx + yy - 2 * xy  # unclamped: the rule ranks by the signed estimate


def flare(global_flat, client_flat, plrs, valid, k, tau, gamma, client_ids=None):
    """Returns (new global, trust scores). Equal MMDs are ranked by client id."""
    g = np.asarray(global_flat, np.float64)
    w = np.asarray(client_flat, np.float64)
    n = w.shape[0]
    cid = list(range(n)) if client_ids is None else list(client_ids)
    ids = [i for i in range(n) if valid[i]]
    mmd = {(i, j): mmd2_unbiased(plrs[i], plrs[j], gamma) for i in ids for j in ids if i != j}
    counts = dict.fromkeys(ids, 0)
    kk = min(k, len(ids) - 1)
    for j in ids:
        others = sorted((i for i in ids if i != j), key=lambda i: (mmd[(i, j)], cid[i]))
        for i in others[:kk]:
            counts[i] += 1
    mean = np.mean([counts[i] for i in ids])
    z = {i: counts[i] / (tau * (mean if mean > 0 else 1.0)) for i in ids}
    total = sum(np.exp(z[i]) for i in ids)
    ts = np.zeros(n)
    for i in ids:
        ts[i] = np.exp(z[i]) / total
    return g + sum(ts[i] * (w[i] - g) for i in ids), ts
