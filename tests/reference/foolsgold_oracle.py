"""Oracle: FoolsGold (Fung et al., RAID 2020, Algorithm 1, as in the authors' code) in
float64 NumPy: a dict of per-client histories and the pardoning / logit steps written as
explicit loops.
"""

from __future__ import annotations

import numpy as np


class FoolsGold:
    def __init__(self, param_mask, normalize=True, norm_eps=0.1, confidence=1.0):
        self.pm = np.asarray(param_mask, bool)
        self.normalize = normalize
        self.norm_eps = norm_eps
        self.confidence = confidence
        self.history = {}

    def round(self, W, g, valid, client_ids, coords=None):
        """Returns (new_global, weights). `coords`: history coordinates used for cosines."""
        W = np.asarray(W, np.float64)
        g = np.asarray(g, np.float64)
        n, d = W.shape
        for i in range(n):
            cid = int(client_ids[i])
            h = self.history.setdefault(cid, np.zeros(d))
            if not valid[i]:
                continue
            u = np.where(self.pm, W[i] - g, 0.0)
            if self.normalize:
                u = u / (np.linalg.norm(u) + self.norm_eps)
            self.history[cid] = h + u
        ids = [i for i in range(n) if valid[i]]
        hs = [self.history[int(client_ids[i])] for i in ids]
        if coords is not None:
            hs = [h[np.asarray(coords)] for h in hs]
        m = len(ids)
        cs = np.zeros((m, m))
        for a in range(m):
            for b in range(m):
                if a != b:
                    na, nb = np.linalg.norm(hs[a]), np.linalg.norm(hs[b])
                    cs[a, b] = hs[a] @ hs[b] / (na * nb) if na > 0 and nb > 0 else 0.0
        maxcs = cs.max(axis=1) + 1e-5
        for a in range(m):
            for b in range(m):
                if a != b and maxcs[a] < maxcs[b]:
                    cs[a, b] = cs[a, b] * maxcs[a] / maxcs[b]
        wv = np.clip(1.0 - cs.max(axis=1), 0.0, 1.0)
        wv = wv / wv.max() if wv.max() > 0 else np.zeros(m)
        wv[wv == 1.0] = 0.99
        with np.errstate(divide="ignore"):
            wv = self.confidence * (np.log(wv / (1.0 - wv) + 1e-5) + 0.5)
        wv[np.isinf(wv) | (wv > 1.0)] = 1.0
        wv[wv < 0.0] = 0.0
        w = np.zeros(n)
        for a, i in enumerate(ids):
            w[i] = wv[a]
        if w.sum() == 0:
            w = np.asarray(valid, np.float64)
        w = w / w.sum()
        return w @ W, w
