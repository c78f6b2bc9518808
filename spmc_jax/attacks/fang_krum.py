"""`fang_krum`: the full-knowledge local model poisoning attack on Krum (Fang, Cao, Jia &
Gong, "Local Model Poisoning Attacks to Byzantine-Robust Federated Learning", USENIX
Security 2020, §4.1).

The c attackers know every benign local model. Let w_Re be the global model they received
(here g) and s the sign vector of the change of the global model without attack, estimated
from the benign mean update mu (s_j = +1 where mu_j >= 0, else -1). Every attacker sends

    w'_1 = w_Re - lambda * s,

with lambda the largest value for which Krum still selects w'_1. The search starts from
the paper's upper bound (m clients, d parameters, D the Euclidean distance, benign i, l)

    lambda_0 = 1 / ((m - 2c - 1) sqrt(d)) * min_i sum_{l in G_i} D(w_l, w_i)
               + 1 / sqrt(d) * max_i D(w_i, w_Re),

G_i the m - c - 2 benign models nearest to w_i, and halves lambda until Krum (f = c,
score = sum of the m - c - 2 smallest squared distances to the other models) picks a
crafted model, or lambda falls below `threshold` (1e-5); the last lambda tried is used.
The paper assumes m > 2c + 1 (Krum's condition); outside it (e.g. 4 clients, 2 attackers)
the attack still runs (e.g. against another rule) with m - 2c - 1 clamped to 1 in the
bound and the simulated Krum's neighbour count m - c - 2 clamped to 1 (the project's
`krum` defense itself refuses m - c - 2 < 1).
The paper places the other c - 1 crafted models close to w'_1; here they are copies of it
(distance 0), which only lowers w'_1's Krum score.

Computation: everything is in updates u_i = w_i - g (crafted update -lambda s), so
||-lambda s - u_j||^2 = ||u_j||^2 + 2 lambda s.u_j + lambda^2 ||s||^2 and each halving step
is O(n^2 log n) after one O(n d) pass; the benign pairwise distances come from the Gram
matrix of the updates centred on their mean. Non-finite benign rows are ignored. The paper
also attacks median/trimmed mean with the same directed deviation: see `fang_trmean`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from spmc_jax.attacks import register
from spmc_jax.attacks.alie import benign_rows
from spmc_jax.attacks.base import AttackEnv, AttackSpec, ModelAttack, keep_benign, model_attack

_HI = lax.Precision.HIGHEST
MAX_HALVINGS = 200  # lambda_0 / 2^200 is below any threshold > 0 for finite lambda_0


def direction(U: jax.Array, rows: jax.Array) -> jax.Array:
    """s: +1 where the mean of the selected rows is >= 0, else -1."""
    k = jnp.maximum(jnp.sum(rows), 1).astype(U.dtype)
    mu = jnp.sum(jnp.where(rows[:, None], U, 0.0), axis=0) / k
    return jnp.where(mu >= 0, 1.0, -1.0).astype(U.dtype)


def krum_scores(D2: jax.Array, valid: jax.Array, f: int) -> jax.Array:
    """Krum score of each row: sum of its n - f - 2 smallest squared distances to the other
    valid rows (inf for invalid rows). `D2` (n, n) squared distances."""
    n = D2.shape[0]
    k = max(n - f - 2, 1)
    other = valid[None, :] & ~jnp.eye(n, dtype=bool)
    nearest = jnp.sort(jnp.where(other, D2, jnp.inf), axis=1)[:, :k]
    return jnp.where(valid, jnp.sum(nearest, axis=1), jnp.inf)


def fang_krum_lambda(
    U: jax.Array, malicious: jax.Array, rows: jax.Array, f: int, threshold: float
) -> tuple[jax.Array, jax.Array]:
    """(lambda, s) of the attack (see the module docstring).

    Args:
      U: (n, d) updates.
      malicious: (n,) bool, the attackers.
      rows: (n,) bool, benign finite rows.
      f: Krum's assumed number of attackers (c).
      threshold: smallest lambda tried.
    """
    n, d = U.shape
    s = direction(U, rows)
    km = jnp.maximum(jnp.sum(rows), 1).astype(U.dtype)
    mu = jnp.sum(jnp.where(rows[:, None], U, 0.0), axis=0) / km
    V = jnp.where(rows[:, None], U - mu, 0.0)
    cq = jnp.sum(V * V, axis=1)
    gram = jnp.matmul(V, V.T, precision=_HI)
    Dbb = jnp.maximum(cq[:, None] + cq[None, :] - 2.0 * gram, 0.0)  # benign pair distances
    nu2 = jnp.sum(jnp.where(rows[:, None], U * U, 0.0), axis=1)  # ||u_j||^2
    su = jnp.matmul(jnp.where(rows[:, None], U, 0.0), s, precision=_HI)  # s.u_j
    ss = jnp.sum(s * s)

    # lambda_0 from the paper's bound over benign i and their m - c - 2 nearest benign l.
    c = jnp.sum(malicious)
    kb = max(n - f - 2, 1)
    pair = rows[:, None] & rows[None, :] & ~jnp.eye(n, dtype=bool)
    dist = jnp.sort(jnp.where(pair, jnp.sqrt(Dbb), jnp.inf), axis=1)[:, :kb]
    near = jnp.where(rows, jnp.sum(jnp.where(jnp.isfinite(dist), dist, 0.0), axis=1), jnp.inf)
    denom = jnp.maximum(n - 2 * c - 1, 1).astype(U.dtype) * math.sqrt(d)
    lam0 = jnp.min(near) / denom + jnp.max(jnp.where(rows, jnp.sqrt(nu2), 0.0)) / math.sqrt(d)
    lam0 = jnp.where(jnp.isfinite(lam0), lam0, 0.0)

    valid = rows | malicious

    def selected(lam):
        dm = jnp.maximum(nu2 + 2.0 * lam * su + lam * lam * ss, 0.0)  # crafted <-> benign
        D2 = jnp.where(
            malicious[:, None] & malicious[None, :],
            0.0,
            jnp.where(
                malicious[:, None], dm[None, :], jnp.where(malicious[None, :], dm[:, None], Dbb)
            ),
        )
        return malicious[jnp.argmin(krum_scores(D2, valid, f))]

    def cond(state):
        lam, i = state
        return (i < MAX_HALVINGS) & (lam >= threshold) & ~selected(lam)

    lam, _ = lax.while_loop(cond, lambda st: (st[0] / 2.0, st[1] + 1), (lam0, jnp.int32(0)))
    return lam, s


def fang_krum(env: AttackEnv, *, threshold: float = 1e-5) -> ModelAttack:
    """Fang et al.'s full-knowledge attack on Krum: w = g - lambda * s on every attacker.

    Args:
      env: attack environment (`n_clients` m, `num_malicious` c: Krum's f and the bound).
      threshold: the smallest lambda tried (the paper's epsilon, 1e-5).

    Raises:
      ValueError: threshold <= 0.
    """
    if not threshold > 0:
        raise ValueError(f"fang_krum threshold={threshold}; accepted: > 0")
    c = env.num_malicious

    def apply(W, g, malicious, key):
        del key
        U = W - g
        lam, s = fang_krum_lambda(U, malicious, benign_rows(W, malicious), c, threshold)
        return keep_benign((g - lam * s).astype(W.dtype), W, malicious)

    return model_attack(env, apply)


register(
    AttackSpec(
        "fang_krum",
        "model",
        fang_krum,
        "Fang (Krum, full knowledge): g - lambda*s, lambda max s.t. Krum selects it (halving)",
        paper="Fang et al., Local Model Poisoning Attacks to Byzantine-Robust FL, USENIX Sec 2020",
    )
)
