"""Oracle: SPMC's projection, leave-one-out cosines, weights and teachers, in float64 NumPy.

Written from spmc_reference.md §2-§3 the naive way the reference code does it: unit vectors
for the projection, and for the server an explicit loop that builds each coalition model
Γ_i from the other rows (O(n²·d)). It shares no code with `spmc_jax.spmc`, so a match is
evidence, not a tautology.
"""

from __future__ import annotations

import numpy as np

COS_EPS = 1e-5  # the reference's cosine denominator guard


def project_leaf(gd, gg, lam):
    """AlignedGradient.py:101-140 for one tensor: unit vectors, test ⟨d̂, ĝ⟩ < 0."""
    gd = np.asarray(gd, np.float64)
    gg = np.asarray(gg, np.float64)
    nd, ng = np.linalg.norm(gd), np.linalg.norm(gg)
    if nd == 0 or ng == 0:  # the reference's cosine is NaN here; NaN < 0 is False
        return gd, False
    g_hat = gg / ng
    d_hat = gd / nd
    if float(np.sum(d_hat * g_hat)) < 0:
        return gd - lam * float(np.sum(gd * g_hat)) * g_hat, True
    return gd, False


def project(g_data_leaves, g_guide_leaves, lam):
    """Per-leaf projection of lists of arrays; returns (leaves, number projected)."""
    out, count = [], 0
    for gd, gg in zip(g_data_leaves, g_guide_leaves, strict=True):
        res, hit = project_leaf(gd, gg, lam)
        out.append(res)
        count += int(hit)
    return out, count


def cosine(a, b):
    """⟨a,b⟩ / (‖a‖·‖b‖ + 1e-5), SPMD.py's `cosine_distance` (a similarity)."""
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + COS_EPS))


def loo_cosines(w, mask=None, reference=None, valid=None):
    """φ_i = cos(w_i − r, Γ_i − r) on the masked coordinates, Γ_i = mean of the other valid rows.

    Invalid rows are scored 0 and left out of every Γ_i; with < 2 valid rows all φ are 0.
    """
    w = np.asarray(w, np.float64)
    n, d = w.shape
    mask = np.ones(d, bool) if mask is None else np.asarray(mask, bool)
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    r = np.zeros(d) if reference is None else np.asarray(reference, np.float64)
    out = np.zeros(n)
    if valid.sum() < 2:
        return out
    for i in range(n):
        if not valid[i]:
            continue
        total = np.zeros(d)
        count = 0
        for j in range(n):  # the coalition model N∖{i}, one row at a time
            if j != i and valid[j]:
                total += w[j]
                count += 1
        gamma = total / count
        x = (w[i] - r)[mask]
        if not np.any(x):
            continue  # ⟨0, y⟩ / (0 + 1e-5) = 0
        out[i] = cosine(x, (gamma - r)[mask])
    return out


def margin_weights(cos, temperature=1.0, valid=None):
    """SPMD.py:96-102: e_p = exp(φ_p/T − max φ/T + 1e-5), α = e/Σe, over valid clients."""
    cos = np.asarray(cos, np.float64)
    valid = np.ones(cos.shape, bool) if valid is None else np.asarray(valid, bool)
    alpha = np.zeros(cos.shape)
    if not valid.any():
        return alpha
    z = cos[valid] / temperature
    e = np.exp(z - z.max() + 1e-5)
    alpha[valid] = e / e.sum()
    return alpha


def margin_contribution(w, mask=None, temperature=1.0, reference=None, valid=None):
    """(Σ_p α_p w_p, α) with α = softmax(loo_cosines / T)."""
    w = np.asarray(w, np.float64)
    alpha = margin_weights(loo_cosines(w, mask, reference, valid), temperature, valid)
    g = np.zeros(w.shape[1])
    for p in range(w.shape[0]):
        g += alpha[p] * w[p]
    return g, alpha


def teachers(w, alpha):
    """T_i = Σ_{j≠i} α_j w_j / Σ_{j≠i} α_j, by an explicit loop (g when the others weigh 0)."""
    w = np.asarray(w, np.float64)
    alpha = np.asarray(alpha, np.float64)
    n = w.shape[0]
    g = alpha @ w
    out = np.zeros_like(w)
    for i in range(n):
        num = np.zeros(w.shape[1])
        den = 0.0
        for j in range(n):
            if j != i:
                num += alpha[j] * w[j]
                den += alpha[j]
        out[i] = num / den if den > 0 else g
    return out


def teachers_marginal_form(g, w, alpha):
    """The reference's own formula, (g − α_i w_i)/(1 − α_i) (training.py:125-132)."""
    g = np.asarray(g, np.float64)
    w = np.asarray(w, np.float64)
    alpha = np.asarray(alpha, np.float64)
    return (g[None, :] - alpha[:, None] * w) / (1.0 - alpha[:, None])
