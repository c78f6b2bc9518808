"""Oracle: FLDetector (Zhang et al., KDD 2022) in float64 NumPy.

`lbfgs_hvp` is the compact L-BFGS product (Byrd, Nocedal & Schnabel 1994, eq. 2.17) on the
filled pairs only; `gap_statistic_clusters` follows Tibshirani et al. (2001) with W_k
from an exhaustive search over 2-splits; the final 2-means uses scikit-learn's KMeans;
`FLDetector` keeps per-client histories in dicts.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans


def lbfgs_hvp(pairs_s, pairs_y, v):
    """B v with B the L-BFGS Hessian approximation from the lists of pairs (oldest first)."""
    if not pairs_s:
        return np.zeros_like(v)
    s = np.stack(pairs_s, axis=1)  # (d, m)
    y = np.stack(pairs_y, axis=1)
    sigma = pairs_y[-1] @ pairs_s[-1] / (pairs_s[-1] @ pairs_s[-1])
    a = s.T @ y
    low = np.tril(a, -1)
    mid = np.block([[sigma * s.T @ s, low], [low.T, -np.diag(np.diag(a))]])
    rhs = np.concatenate([sigma * s.T @ v, y.T @ v])
    return sigma * v - np.concatenate([sigma * s, y], axis=1) @ np.linalg.solve(mid, rhs)


def within_ss(x, k):
    """W_k, the optimal k-means within-cluster sum of squares of 1-D data x (k = 1 or 2):
    for k = 2, the minimum over every split of the points into two non-empty groups
    (exhaustive, so independent of any k-means algorithm; fine for up to ~16 points)."""
    x = np.asarray(x, np.float64)
    if k == 1:
        return float(np.sum((x - x.mean()) ** 2))
    m = len(x)
    codes = np.arange(1, 2 ** (m - 1))  # point m-1 always in group 0: each split once
    member = (codes[:, None] >> np.arange(m)[None, :]) & 1 == 1
    cnt1 = member.sum(1)
    cnt0 = m - cnt1
    s1 = member @ x
    q1 = member @ (x * x)
    s0, q0 = x.sum() - s1, (x * x).sum() - q1
    cost = (q1 - s1**2 / cnt1) + (q0 - s0**2 / cnt0)
    return float(cost.min())


def gap_statistic_clusters(x, refs):
    """True when the gap statistic prefers 2 clusters to 1; refs (B, m) uniform on [0, 1]."""
    z = (x - x.min()) / (x.max() - x.min())
    lw = {k: np.log(max(within_ss(z, k), 1e-12)) for k in (1, 2)}
    lr = {k: np.array([np.log(max(within_ss(r, k), 1e-12)) for r in refs]) for k in (1, 2)}
    gap = {k: lr[k].mean() - lw[k] for k in (1, 2)}
    s2 = lr[2].std() * np.sqrt(1 + 1 / len(refs))
    return gap[1] < gap[2] - s2


class FLDetector:
    """The multi-round rule: detection, then (once) removal of the flagged clients and a
    restart from the round-0 model g_0 with a fresh history; afterwards FedAvg over the
    clients never removed, without detection."""

    def __init__(self, window):
        self.window = window
        self.removed = set()
        self.restart_round = None
        self.g0 = None
        self._fresh()

    def _fresh(self):
        self.last = {}
        self.scores = []  # per round: dict client id -> normalised distance
        self.pairs_s, self.pairs_y = [], []
        self.prev_global = None
        self.prev_agg = None

    def round(self, g, w, ids, refs_fn, t=None):
        """One round (index t); returns (new global, kept client positions). refs_fn(m) ->
        (B, m). The restart round keeps no one and returns g_0."""
        g = np.asarray(g, np.float64)
        if self.g0 is None:
            self.g0 = g
        deltas = np.asarray(w, np.float64) - g
        n = len(ids)
        if self.restart_round is not None:
            kept = [p for p in range(n) if ids[p] not in self.removed]
            agg = np.mean(deltas[kept], axis=0) if kept else np.zeros_like(g)
            return g + agg, kept
        flagged = set()
        if self.pairs_s and any(c in self.last for c in ids):
            hv = lbfgs_hvp(self.pairs_s, self.pairs_y, g - self.prev_global)
            dist = {
                c: np.linalg.norm(self.last[c] + hv - deltas[p])
                for p, c in enumerate(ids)
                if c in self.last
            }
            total = sum(dist.values())
            self.scores = [*self.scores, {c: v / total for c, v in dist.items()}][-self.window :]
            susp = {}
            for c in ids:
                vals = [r[c] for r in self.scores if c in r]
                if vals:
                    susp[c] = np.mean(vals)
            x = np.array([susp[c] for c in susp])
            if len(x) >= 3 and x.max() > x.min() and gap_statistic_clusters(x, refs_fn(len(x))):
                km = KMeans(n_clusters=2, n_init=10, random_state=0).fit(x[:, None])
                high = int(np.argmax(km.cluster_centers_[:, 0]))
                flagged = {c for c, lab in zip(susp, km.labels_, strict=True) if lab == high}
        if flagged:
            self.removed |= flagged
            self.restart_round = t
            self._fresh()
            return self.g0.copy(), []
        kept = list(range(n))
        agg = np.mean(deltas[kept], axis=0)
        if self.prev_global is not None:
            self.pairs_s = [*self.pairs_s, g - self.prev_global][-self.window :]
            self.pairs_y = [*self.pairs_y, agg - self.prev_agg][-self.window :]
        for p, c in enumerate(ids):
            self.last[c] = deltas[p]
        self.prev_global, self.prev_agg = g, agg
        return g + agg, kept
