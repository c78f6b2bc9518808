"""Float64 NumPy oracles for the attacks of issue 15 part A, written from the papers.

Images are channels-last (H, W, C) in normalised units; model attacks take the (n, d)
updates U = W - g and a benign (n,) bool mask. Nothing here imports spmc_jax.
"""

from __future__ import annotations

import numpy as np

# ------------------------------------------------------------------------- data attacks

# backdoors101's pattern (Bagdasaryan & Shmatikov 2021), written as (row, col, pixel value)
# relative to its top-left corner; the other cells of the 5 x 3 box are untouched.
PATTERN_CELLS = (
    (0, 0, 1.0), (0, 1, 0.0), (0, 2, 1.0),
    (1, 1, 1.0),
    (2, 2, 0.0),
    (3, 1, 1.0),
    (4, 0, 1.0), (4, 1, 0.0), (4, 2, 1.0),
)  # fmt: skip


def stamp_cells(x, cells, row0, col0, mean, std):
    """Write pixel values `cells` [(r, c, v)] at (row0 + r, col0 + c) on every channel."""
    out = np.array(x, np.float64)
    for r, c, v in cells:
        out[..., row0 + r, col0 + c, :] = (v - np.asarray(mean)) / np.asarray(std)
    return out


def label_flip_targeted(y, flags, source, target):
    """Tolpegin et al.: flagged samples of class `source` get label `target`."""
    y = np.asarray(y)
    return np.where(np.asarray(flags) & (y == source), target, y)


def all2all_labels(y, flags, num_classes):
    """BadNets all-to-all: flagged y -> (y + 1) mod C."""
    y = np.asarray(y)
    return np.where(np.asarray(flags), (y + 1) % num_classes, y)


# ------------------------------------------------------------------------ model attacks


def pairwise_sq(X: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances between rows, directly (float64)."""
    X = np.asarray(X, np.float64)
    return ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)


def krum_select(X: np.ndarray, f: int) -> int:
    """Krum (Blanchard et al. 2017): argmin_i sum of the n - f - 2 smallest ||x_i - x_j||^2."""
    D = pairwise_sq(X)
    n = len(X)
    scores = [np.sort(np.delete(D[i], i))[: n - f - 2].sum() for i in range(n)]
    return int(np.argmin(scores))


def fang_direction(U: np.ndarray, benign: np.ndarray) -> np.ndarray:
    """s = sign of the change of the global model without attack: the benign mean update
    (zero mean coordinates count as +1)."""
    mu = np.asarray(U, np.float64)[benign].mean(axis=0)
    return np.where(mu >= 0, 1.0, -1.0)


def fang_krum_lambda(U: np.ndarray, benign: np.ndarray, eps: float = 1e-5) -> float:
    """Fang et al. (2020) §4.1: the bound on lambda, then halving until Krum picks w'_1.

    With the global model at 0 (updates): w'_1 = -lambda s for every attacker,
    lambda_0 = min_{benign i} sum_{l in the m-c-2 benign nearest of i} D(w_l, w_i)
               / ((m - 2c - 1) sqrt(d)) + max_{benign i} D(w_i, 0) / sqrt(d).
    """
    U = np.asarray(U, np.float64)
    m, d = U.shape
    mal = ~benign
    c = int(mal.sum())
    B = U[benign]
    Db = np.sqrt(pairwise_sq(B))
    near = [np.sort(np.delete(Db[i], i))[: m - c - 2].sum() for i in range(len(B))]
    lam = min(near) / ((m - 2 * c - 1) * np.sqrt(d)) + np.linalg.norm(B, axis=1).max() / np.sqrt(d)
    s = fang_direction(U, benign)
    while True:
        X = U.copy()
        X[mal] = -lam * s
        if mal[krum_select(X, c)] or lam < eps:
            return float(lam)
        lam /= 2.0


def fang_trmean_bounds(V: np.ndarray, benign: np.ndarray, s: np.ndarray, b: float):
    """Fang et al. §4.2 (full knowledge): the interval each crafted value is drawn from.

    s_j = +1 (would increase): below w_min,j: [w_min/b, w_min] if w_min > 0 else
    [b w_min, w_min]; s_j = -1: above w_max,j: [w_max, b w_max] if w_max > 0 else
    [w_max/b, w_max] (the paper's notation: an interval between the two ends, so for
    w_max < 0 it is [w_max, w_max/b]). Returns the two ends (lo, hi) per coordinate, as
    written, not sorted.
    """
    B = np.asarray(V, np.float64)[benign]
    wmax, wmin = B.max(axis=0), B.min(axis=0)
    lo_up = np.where(wmax > 0, wmax, wmax / b)
    hi_up = np.where(wmax > 0, b * wmax, wmax)
    lo_dn = np.where(wmin > 0, wmin / b, b * wmin)
    hi_dn = np.where(wmin > 0, wmin, wmin)
    lo = np.where(s > 0, lo_dn, lo_up)
    hi = np.where(s > 0, hi_dn, hi_up)
    return lo, hi


def mimic_index(U: np.ndarray, benign: np.ndarray) -> int:
    """Karimireddy et al. (2022): the benign client with the largest |projection| on the top
    principal direction of the centred benign updates (from an SVD)."""
    idx = np.flatnonzero(benign)
    B = np.asarray(U, np.float64)[idx]
    V = B - B.mean(axis=0)
    z = np.linalg.svd(V, full_matrices=False)[2][0]
    return int(idx[np.argmax(np.abs(V @ z))])


def loo_cos(X: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """SPMC's score: cos(x_i, mean_{j != i} x_j) = <x, y>/(|x||y| + eps), directly."""
    X = np.asarray(X, np.float64)
    n = len(X)
    out = np.empty(n)
    for i in range(n):
        y = np.delete(X, i, axis=0).mean(axis=0)
        out[i] = X[i] @ y / (np.linalg.norm(X[i]) * np.linalg.norm(y) + eps)
    return out


def spmc_evade_rows(W, g, mal, s, space):
    """Malicious rows mu + s (w_i - mu), mu the benign mean, in the comparison space."""
    W = np.asarray(W, np.float64)
    mu = W[~mal].mean(axis=0)
    X = W.copy()
    X[mal] = mu + s * (W[mal] - mu)
    return X - np.asarray(g, np.float64) if space == "updates" else X


def spmc_evade_feasible(W, g, mal, s, space, level) -> bool:
    """min_{malicious} phi >= level_{benign} phi on the blended matrix."""
    phi = loo_cos(spmc_evade_rows(W, g, mal, s, space))
    stat = {"max": np.max, "mean": np.mean, "median": np.median, "min": np.min}[level]
    return bool(phi[mal].min() >= stat(phi[~mal]))


def spmc_evade_scale(W, g, mal, space="weights", level="max", s_max=1.0) -> float:
    """The largest feasible s in [0, s_max] (60 float64 bisection steps)."""
    if spmc_evade_feasible(W, g, mal, s_max, space, level):
        return s_max
    lo, hi = 0.0, s_max
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if spmc_evade_feasible(W, g, mal, mid, space, level):
            lo = mid
        else:
            hi = mid
    return lo


def normalize_uint8(x_uint8: np.ndarray, mean, std) -> np.ndarray:
    """(x / 255 - mean) / std per channel, float64 (a 32x32x3 image needs no resize)."""
    return (np.asarray(x_uint8, np.float64) / 255.0 - np.asarray(mean)) / np.asarray(std)
