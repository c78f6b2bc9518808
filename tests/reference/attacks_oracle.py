"""Float64 NumPy oracles for the attack library, written from the papers' formulas.

Model attacks take U (n, d) updates w_i - g and a benign (n,) bool mask and return the
malicious *update* (or per-row updates); the tests add g. Nothing here imports spmc_jax.
"""

from __future__ import annotations

import math

import numpy as np

# --------------------------------------------------------------------------- data attacks

# DBA's CIFAR-10 local triggers (Xie et al. 2020, the authors' cifar_params.yaml):
# (row, col) pixels of parts 0..3.
DBA_CIFAR_PARTS = (
    [(0, c) for c in range(0, 6)],
    [(0, c) for c in range(9, 15)],
    [(4, c) for c in range(0, 6)],
    [(4, c) for c in range(9, 15)],
)


def normalize(pix: np.ndarray, mean, std) -> np.ndarray:
    """Per-channel (pix - mean) / std, channels last."""
    return (np.asarray(pix, np.float64) - np.asarray(mean)) / np.asarray(std)


def denormalize(x: np.ndarray, mean, std) -> np.ndarray:
    """Inverse of `normalize`."""
    return np.asarray(x, np.float64) * np.asarray(std) + np.asarray(mean)


def blend(x: np.ndarray, pattern_pix: np.ndarray, alpha: float, mean, std) -> np.ndarray:
    """Chen et al.'s blend done in pixel space: normalise((1-a) pix(x) + a p)."""
    pix = denormalize(x, mean, std)
    return normalize((1.0 - alpha) * pix + alpha * np.asarray(pattern_pix, np.float64), mean, std)


# -------------------------------------------------------------------------- model attacks


def benign_mean_std(U: np.ndarray, benign: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased (ddof = 1) std over the benign rows, float64."""
    B = np.asarray(U, np.float64)[np.asarray(benign)]
    return B.mean(axis=0), B.std(axis=0, ddof=1)


def std_normal_ppf(p: float) -> float:
    """Phi^{-1}(p) by bisection on math.erf (independent of statistics.NormalDist)."""
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if 0.5 * (1.0 + math.erf(mid / math.sqrt(2.0))) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def alie_z(n: int, m: int, reference: bool = False) -> float:
    """Baruch et al.: s = floor(n/2) + 1 - m, z = Phi^{-1}((n - s)/n); or the reference's."""
    s = n // 2 + 1 - m
    if reference:
        return math.sqrt(2.0 * math.pi) / 2.0 * math.exp(-(s**2))
    return std_normal_ppf((n - s) / n)


def alie_update(U: np.ndarray, benign: np.ndarray, z: float) -> np.ndarray:
    """mu - z sigma of the benign updates."""
    mu, sigma = benign_mean_std(U, benign)
    return mu - z * sigma


def ipm_update(U: np.ndarray, benign: np.ndarray, eps: float) -> np.ndarray:
    """-eps * mean of the benign updates."""
    return -eps * np.asarray(U, np.float64)[benign].mean(axis=0)


def deviation(U: np.ndarray, benign: np.ndarray, dev: str) -> np.ndarray:
    """Shejwalkar & Houmansadr's perturbation directions."""
    mu, sigma = benign_mean_std(U, benign)
    if dev == "std":
        return sigma
    if dev == "unit_vec":
        return mu / np.linalg.norm(mu)
    if dev == "sign":
        return np.sign(mu)
    raise ValueError(dev)


def agnostic_bound(U: np.ndarray, benign: np.ndarray, objective: str, bound: str = "max") -> float:
    """Right-hand side over benign i, j: max_{i,j} ||u_i - u_j||^2 (min-max), or
    max_i (bound "max", paper) / min_i (bound "min", authors' code) sum_j ||u_i - u_j||^2."""
    B = np.asarray(U, np.float64)[benign]
    D = ((B[:, None, :] - B[None, :, :]) ** 2).sum(-1)
    if objective == "max":
        return float(D.max())
    sums = D.sum(axis=1)
    return float(sums.max() if bound == "max" else sums.min())


def agnostic_objective(mal: np.ndarray, U: np.ndarray, benign: np.ndarray, objective: str) -> float:
    """Left-hand side: max_i or sum_i ||mal - u_i||^2 over benign i."""
    B = np.asarray(U, np.float64)[benign]
    d = ((np.asarray(mal, np.float64)[None] - B) ** 2).sum(-1)
    return float(d.max()) if objective == "max" else float(d.sum())


def agnostic_lambda_star(
    U: np.ndarray, benign: np.ndarray, objective: str, dev: str, bound: str = "max"
) -> float:
    """The exact largest lambda >= 0 meeting the constraint (closed form).

    ||mu - lam dev - u_i||^2 = a lam^2 + 2 b_i lam + c_i with a = ||dev||^2,
    b_i = (u_i - mu).dev, c_i = ||u_i - mu||^2; the largest root of each quadratic = bound.
    """
    B = np.asarray(U, np.float64)[benign]
    mu = B.mean(axis=0)
    dv = deviation(U, benign, dev)
    V = B - mu
    a, b, c = dv @ dv, V @ dv, (V**2).sum(-1)
    rhs = agnostic_bound(U, benign, objective, bound)
    if objective == "max":
        roots = (-b + np.sqrt(b**2 - a * (c - rhs))) / a
        return float(roots.min())
    k = len(B)
    aa, bb, cc = k * a, b.sum(), c.sum() - rhs
    return float((-bb + math.sqrt(bb**2 - aa * cc)) / aa)


def agnostic_reference_lambda(
    U: np.ndarray,
    benign: np.ndarray,
    objective: str,
    dev: str,
    lam_init: float = 10.0,
    threshold: float = 1e-5,
    bound: str = "max",
) -> float:
    """The reference's bisection loop, literally, in float64 with direct distances."""
    B = np.asarray(U, np.float64)[benign]
    mu = B.mean(axis=0)
    dv = deviation(U, benign, dev)
    rhs = agnostic_bound(U, benign, objective, bound)
    lam, step, succ = lam_init, lam_init, 0.0
    while abs(succ - lam) > threshold:
        if agnostic_objective(mu - lam * dv, U, benign, objective) <= rhs:
            succ = lam
            lam = lam + step / 2
        else:
            lam = lam - step / 2
        step = step / 2
    return succ


def project_l2(u: np.ndarray, radius: float) -> np.ndarray:
    """Projection of each row of u onto the l2 ball of radius `radius`."""
    u = np.asarray(u, np.float64)
    norms = np.linalg.norm(u, axis=-1, keepdims=True)
    return np.where(norms > radius, u * radius / np.maximum(norms, 1e-300), u)


def with_params(rows: np.ndarray, param_mask: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Rows whose parameter entries (param_mask True) are `params` and whose other entries
    (BatchNorm statistics) keep the values of `rows`: what a model attack must send."""
    out = np.array(rows, np.float64)
    out[:, np.asarray(param_mask, bool)] = params
    return out
