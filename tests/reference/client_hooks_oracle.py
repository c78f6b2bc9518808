"""Float64 NumPy oracles of the client hooks and client-side attacks, from the papers' math.

Nothing here imports spmc_jax.
"""

from __future__ import annotations

import numpy as np


def prox_gradient(g: np.ndarray, w: np.ndarray, w_global: np.ndarray, mu: float) -> np.ndarray:
    """FedProx (Li et al. 2020): ∇[F(w) + μ/2‖w − w_g‖²] = g + μ(w − w_g)."""
    return np.asarray(g, np.float64) + mu * (np.asarray(w, np.float64) - w_global)


def clip_update(W: np.ndarray, g: np.ndarray, clip: float) -> np.ndarray:
    """Rows g + (w_i − g)·min(1, C/‖w_i − g‖₂), float64, one row at a time."""
    out = np.array(W, np.float64)
    for i in range(out.shape[0]):
        u = out[i] - g
        norm = np.sqrt(np.sum(u * u))
        out[i] = g + u * (min(1.0, clip / norm) if norm > 0 else 1.0)
    return out


def neurotoxin_mask(prev: np.ndarray, cur: np.ndarray, ratio: float) -> np.ndarray:
    """Neurotoxin (Zhang et al. 2022): 1 on coordinates NOT among the top-⌈ratio·p⌉ of
    |cur − prev| (last round's global update), 0 on those; all 1 without an update."""
    delta = np.abs(np.asarray(cur, np.float64) - prev)
    p = delta.size
    if not np.any(delta > 0):
        return np.ones(p)
    k = int(np.ceil(ratio * p))
    top = np.argsort(-delta, kind="stable")[:k]
    mask = np.ones(p)
    mask[top] = 0.0
    return mask


def spmc_invert(gd: np.ndarray, gg: np.ndarray, lam: float) -> np.ndarray:
    """SPMC projection inverted (one tensor): if ⟨G_d, G_g⟩ < 0,
    G = G_d + λ·⟨G_d, G_g⟩/‖G_g‖²·G_g (the conflicting component grows), else G_d."""
    gd = np.asarray(gd, np.float64).ravel()
    gg = np.asarray(gg, np.float64).ravel()
    dot = gd @ gg
    if dot < 0:
        return gd + lam * dot / (gg @ gg) * gg
    return gd
