"""Oracle: RSA's server step (Li et al., AAAI 2019, Eq. 9, ℓ1 penalty) in float64 NumPy,
one coordinate at a time.
"""

from __future__ import annotations

import numpy as np


def rsa(
    W,
    g,
    valid,
    param_mask,
    alpha=0.05,
    l1_lambda=0.1,
    weight_lambda=0.001,
    clip=np.inf,
    sequential=False,
    frozen_buffers=False,
    order=None,
):
    """Return (new_global, client_weights).

    The paper's sum of sign votes, optionally clipped to [−clip, clip]; `sequential` clips
    after each client's vote, the clients voting in `order` (default 0..n−1), as the
    reference does in its (random) online order.

    client_weights_i ∝ fraction of parameter coordinates where sign(w_i − g) equals
    sign(−S) (S = the clipped sign sum), uniform over valid clients if S = 0 everywhere.
    """
    W = np.asarray(W, np.float64)
    g = np.asarray(g, np.float64)
    n, d = W.shape
    rows = [i for i in range(n) if valid[i]]
    voters = [i for i in (range(n) if order is None else order) if valid[i]]
    new = g.copy()
    s_all = np.zeros(d)
    for k in range(d):
        if param_mask[k]:
            s = 0.0
            for i in voters:
                s += np.sign(g[k] - W[i, k])
                if sequential:
                    s = min(max(s, -clip), clip)
            s = min(max(s, -clip), clip)
            s_all[k] = s
            new[k] = g[k] - alpha * (l1_lambda * s + weight_lambda * g[k])
        elif not frozen_buffers:
            new[k] = np.mean([W[i, k] for i in rows])
    p = max(int(np.sum(param_mask)), 1)
    raw = np.zeros(n)
    for i in rows:
        raw[i] = (
            sum(
                1
                for k in range(d)
                if param_mask[k] and s_all[k] != 0 and np.sign(W[i, k] - g[k]) == np.sign(-s_all[k])
            )
            / p
        )
    if raw.sum() == 0:
        raw = np.asarray(valid, np.float64)
    return new, raw / raw.sum()
