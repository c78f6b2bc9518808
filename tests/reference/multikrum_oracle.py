"""Oracle: Multi-Krum (Blanchard et al., NeurIPS 2017) in float64 NumPy.

The mean of the m updates with the lowest Krum scores (scores and tie-break from `krum_oracle`).
"""

from __future__ import annotations

import numpy as np

from tests.reference.krum_oracle import krum_order


def multikrum(
    global_flat, client_flat, f, m=None, valid=None, num_neighbors=None, squared=True, mask=None
):
    """Returns (new global, sorted list of selected indices).

    m defaults to n_valid - f (at least 1); an explicit m is capped at n_valid.
    """
    g = np.asarray(global_flat, np.float64)
    deltas = np.asarray(client_flat, np.float64) - g
    n = deltas.shape[0]
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    n_valid = int(valid.sum())
    m_eff = max(n_valid - f, 1) if m is None else m
    m_eff = min(m_eff, n_valid)
    order = krum_order(deltas, f, valid, num_neighbors, squared, mask)
    chosen = sorted(order[:m_eff])
    return g + deltas[chosen].mean(axis=0), chosen
