"""`min_max` and `min_sum`: AGR-agnostic optimisation attacks (Shejwalkar & Houmansadr,
"Manipulating the Byzantine: Optimizing Model Poisoning Attacks and Defenses for Federated
Learning", NDSS 2021).

Every malicious client sends the same update u_mal = mu - lambda * dev, where mu is the
mean of the benign updates u_i = w_i - g (omniscient) and dev a perturbation direction:

    "std"       per-coordinate std of the benign updates (ddof = 1; default, like the
                SPMC reference's `dev_type`)
    "unit_vec"  mu / ||mu||
    "sign"      sign(mu)

lambda is the largest value (found by bisection) for which u_mal stays as close to the
benign updates as the benign updates are to each other, over benign i, j:

    min_max:  max_i ||u_mal - u_i||^2  <=  max_{i,j} ||u_i - u_j||^2
    min_sum:  sum_i ||u_mal - u_i||^2  <=  max_i sum_j ||u_i - u_j||^2

(the paper's definitions and spec §5). The NDSS authors' public code bounds min-sum by
the *minimum* over i of sum_j ||u_i - u_j||^2 instead; `min_sum` option bound="min"
selects that stricter variant.

Bisection exactly as the reference (spec §5) and the paper's code: lambda = lam_init (10),
step = lam_init, lambda_succ = 0; repeat {if feasible(lambda): lambda_succ = lambda,
lambda += step/2 else lambda -= step/2; step /= 2} while |lambda_succ - lambda| >
threshold (1e-5). After k rounds |lambda_succ - lambda| = lam_init / 2^k exactly, so the
loop runs a fixed K = min{k : lam_init / 2^k <= threshold} times (20 for the defaults)
and is a `lax.fori_loop`. The searched range is [0, 2 lam_init): a feasible lambda
>= 2 lam_init comes out as 2 lam_init - lam_init / 2^(K-1), the last value tried.
lambda = 0 (u_mal = mu) is always feasible, and the feasible lambdas >= 0 form an
interval (both objectives are convex quadratics in lambda), so the result is the
largest feasible lambda up to the threshold.

Computation: with v_i = u_i - mu, ||u_mal - u_i||^2 = ||v_i||^2 + 2 lambda v_i.dev +
lambda^2 ||dev||^2, so the O(n d) work (norms, one matrix-vector product, for min_max the
benign Gram matrix V V^T at full float32 precision) is done once and each bisection step
is O(n). Centring on mu first keeps the Gram-based pairwise distances accurate.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from spmc_jax.attacks import register
from spmc_jax.attacks.alie import benign_rows, masked_moments
from spmc_jax.attacks.base import AttackEnv, AttackSpec, ModelAttack, keep_benign, model_attack

DEVIATIONS = ("std", "unit_vec", "sign")
OBJECTIVES = ("max", "sum")
BOUNDS = ("max", "min")
_HI = lax.Precision.HIGHEST  # no TF32/bf16 passes: distances are compared at ~1e-6


def bisection_steps(lam_init: float, threshold: float) -> int:
    """Number of bisection rounds the reference's loop runs: min{k : lam_init/2^k <= thr}."""
    k = 0
    while lam_init / 2.0**k > threshold:
        k += 1
    return k


def bisect(feasible: Callable[[jax.Array], jax.Array], lam_init: float, steps: int) -> jax.Array:
    """The reference's bisection: the last feasible lambda tried (0.0 if none)."""

    def body(_, state):
        lam, step, succ = state
        ok = feasible(lam)
        succ = jnp.where(ok, lam, succ)
        lam = jnp.where(ok, lam + step / 2, lam - step / 2)
        return lam, step / 2, succ

    init = (jnp.float32(lam_init), jnp.float32(lam_init), jnp.float32(0.0))
    return lax.fori_loop(0, steps, body, init)[2]


def deviation(mu: jax.Array, sigma: jax.Array, dev: str) -> jax.Array:
    """The perturbation direction `dev` (see the module docstring)."""
    if dev == "std":
        return sigma
    if dev == "unit_vec":
        norm = jnp.linalg.norm(mu)
        return jnp.where(norm > 0, mu / jnp.where(norm > 0, norm, 1.0), 0.0)
    if dev == "sign":
        return jnp.sign(mu)
    raise ValueError(f"dev={dev!r}; accepted: {', '.join(DEVIATIONS)}")


def agnostic_update(
    U: jax.Array,
    rows: jax.Array,
    objective: str,
    dev: str = "std",
    lam_init: float = 10.0,
    threshold: float = 1e-5,
    bound: str = "max",
) -> tuple[jax.Array, jax.Array]:
    """The min-max / min-sum malicious update.

    Args:
      U: (n, d) client updates w_i - g.
      rows: (n,) bool, the benign rows the attacker uses.
      objective: "max" (min-max) or "sum" (min-sum).
      dev: perturbation direction, one of DEVIATIONS.
      lam_init: initial lambda (and first step) of the bisection.
      threshold: bisection stopping threshold.
      bound: min-sum only: "max" (paper) or "min" (authors' code) over benign i of
        sum_j ||u_i - u_j||^2.

    Returns:
      (u_mal (d,), lambda) with u_mal = mu - lambda * dev.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}; accepted: {', '.join(OBJECTIVES)}")
    if bound not in BOUNDS:
        raise ValueError(f"bound={bound!r}; accepted: {', '.join(BOUNDS)}")
    mu, sigma = masked_moments(U, rows)
    dv = deviation(mu, sigma, dev)
    V = jnp.where(rows[:, None], U - mu, 0.0)
    c = jnp.sum(jnp.square(V), axis=1)  # ||u_i - mu||^2
    b = jnp.matmul(V, dv, precision=_HI)  # (u_i - mu) . dev
    a = jnp.sum(jnp.square(dv))  # ||dev||^2
    if objective == "max":
        gram = jnp.matmul(V, V.T, precision=_HI)
        pair = jnp.maximum(c[:, None] + c[None, :] - 2.0 * gram, 0.0)
        rhs = jnp.max(jnp.where(rows[:, None] & rows[None, :], pair, 0.0))
    else:
        k = jnp.sum(rows).astype(U.dtype)
        s = jnp.sum(V, axis=0)  # ~0 by construction; kept so the identity is not assumed
        row_sums = k * c + jnp.sum(c) - 2.0 * jnp.matmul(V, s, precision=_HI)
        if bound == "max":
            rhs = jnp.max(jnp.where(rows, row_sums, 0.0))
        else:
            rhs = jnp.min(jnp.where(rows, row_sums, jnp.inf))
            rhs = jnp.where(jnp.isfinite(rhs), rhs, 0.0)  # no benign rows

    def feasible(lam):
        dist = c + 2.0 * lam * b + lam * lam * a  # ||mu - lam dev - u_i||^2
        if objective == "max":
            return jnp.max(jnp.where(rows, dist, -jnp.inf)) <= rhs
        return jnp.sum(jnp.where(rows, dist, 0.0)) <= rhs

    lam = bisect(feasible, lam_init, bisection_steps(lam_init, threshold))
    return mu - lam * dv, lam


def _make(
    env: AttackEnv, objective: str, dev: str, lam_init: float, threshold: float, bound: str = "max"
) -> ModelAttack:
    if bound not in BOUNDS:
        raise ValueError(f"min_sum bound={bound!r}; accepted: {', '.join(BOUNDS)}")
    if dev not in DEVIATIONS:
        raise ValueError(f"dev={dev!r}; accepted: {', '.join(DEVIATIONS)}")
    if lam_init <= 0 or threshold <= 0:
        raise ValueError(f"lam_init={lam_init} and threshold={threshold} must be > 0")

    def apply(W, g, malicious, key):
        del key
        u, _ = agnostic_update(
            W - g, benign_rows(W, malicious), objective, dev, lam_init, threshold, bound
        )
        return keep_benign((g + u).astype(W.dtype), W, malicious)

    return model_attack(env, apply)


def min_max(
    env: AttackEnv, *, dev: str = "std", lam_init: float = 10.0, threshold: float = 1e-5
) -> ModelAttack:
    """Min-max attack: max distance to benign updates <= max benign pairwise distance.

    Args:
      env: attack environment (`param_mask`).
      dev: perturbation direction: "std" (default), "unit_vec" or "sign".
      lam_init: initial lambda of the bisection (reference 10).
      threshold: bisection threshold (reference 1e-5).
    """
    return _make(env, "max", dev, lam_init, threshold)


def min_sum(
    env: AttackEnv,
    *,
    dev: str = "std",
    lam_init: float = 10.0,
    threshold: float = 1e-5,
    bound: str = "max",
) -> ModelAttack:
    """Min-sum attack: sum of distances to benign updates <= max benign sum of distances.

    Args:
      env: attack environment (`param_mask`).
      dev: perturbation direction: "std" (default), "unit_vec" or "sign".
      lam_init: initial lambda of the bisection (reference 10).
      threshold: bisection threshold (reference 1e-5).
      bound: "max" (paper, default) or "min" (the authors' public code) over benign i of
        sum_j ||u_i - u_j||^2.
    """
    return _make(env, "sum", dev, lam_init, threshold, bound)


_PAPER = "Shejwalkar & Houmansadr, Manipulating the Byzantine, NDSS 2021"
register(
    AttackSpec(
        "min_max",
        "model",
        min_max,
        "Min-max: mu - lambda*dev, lambda max s.t. max dist to benign <= max benign pair dist",
        paper=_PAPER,
    )
)
register(
    AttackSpec(
        "min_sum",
        "model",
        min_sum,
        "Min-sum: mu - lambda*dev, lambda max s.t. sum dist to benign <= max benign sum",
        paper=_PAPER,
    )
)
