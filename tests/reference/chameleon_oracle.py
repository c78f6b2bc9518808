"""Float64 NumPy oracle of Chameleon's contrastive loss (Dai & Li, ICML 2023), written from
the supervised contrastive loss (Khosla et al., NeurIPS 2020) with Chameleon's weights, one
anchor and one pair at a time.

Nothing here imports spmc_jax.
"""

from __future__ import annotations

import math

import numpy as np


def chameleon_supcon(
    feats: np.ndarray,
    y: np.ndarray,
    y_clean: np.ndarray,
    poisoned: np.ndarray,
    target: int,
    tau: float,
    omega: float,
    kappa: float,
) -> float:
    """L = (1/B) Σ_i ℓ_i with, for z_i = f_i/‖f_i‖,

    a_ij = κ_ij·z_i·z_j/τ   (κ_ij = κ between a poisoned image p, relabelled y_p ≠ y°_p,
                             and a clean image o of its original class, y_o = y°_p)
    ℓ_i  = −(w_i/|P(i)|) Σ_{p∈P(i)} log( exp(a_ip) / Σ_{k≠i} exp(a_ik) ),
    P(i) = {j ≠ i : y_j = y_i},  w_i = ω if y_i = target else 1,  ℓ_i = 0 if P(i) = ∅.
    """
    f = np.asarray(feats, np.float64)
    b = f.shape[0]
    z = [f[i] / max(math.sqrt(float(f[i] @ f[i])), 1e-12) for i in range(b)]

    def obstructs(p: int, o: int) -> bool:
        return bool(poisoned[p] and not poisoned[o] and y[p] != y_clean[p] and y[o] == y_clean[p])

    def a(i: int, j: int) -> float:
        k = kappa if obstructs(i, j) or obstructs(j, i) else 1.0
        return k * float(z[i] @ z[j]) / tau

    total = 0.0
    for i in range(b):
        positives = [j for j in range(b) if j != i and y[j] == y[i]]
        if not positives:
            continue
        den = sum(math.exp(a(i, k)) for k in range(b) if k != i)
        w = omega if y[i] == target else 1.0
        total += -w / len(positives) * sum(math.log(math.exp(a(i, p)) / den) for p in positives)
    return total / b
