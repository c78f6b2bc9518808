"""`alie`: "A Little Is Enough" (Baruch et al., NeurIPS 2019).

The attacker knows the benign updates u_i = w_i - g (omniscient) and sends, from every
malicious client, the same update

    u_mal = mu - z * sigma,      w_mal = g + u_mal,

where mu and sigma are the per-coordinate mean and standard deviation (ddof = 1, like
`torch.std`) of the benign updates, and

    s = floor(n/2) + 1 - m,      z = Phi^{-1}((n - s) / n)

(n clients, m malicious, Phi the standard normal CDF): under a normal model of each
coordinate, about s benign values lie farther from the mean than the malicious one (the
m attackers plus those s make a majority), so median- and distance-based rules still
accept it. E.g. n = 10: z = 0.253 (m = 2),
0.524 (m = 3).

Sign convention: ALIE shifts every coordinate by z * sigma away from the benign mean,
staying inside the range the defence accepts; we take the minus sign on updates
(u = w - g), like the SPMC reference (spec §5, deltas w - g): every coordinate is
lowered by z * sigma, which equals mean - z * std of the models themselves.

`reference_z=True` uses the SPMC reference's z = (sqrt(2 pi) / 2) * exp(-s^2)
(spmc_reference.md §5; ~1.5e-4 for n = 10, m = 3) instead of the inverse CDF. Unlike the
reference we write g + u_mal into the model (the reference writes the delta itself).

This module also holds the masked benign statistics shared by the other omniscient
attacks (`ipm`, `min_max`, `min_sum`, `pgd`): jittable, no boolean indexing, and
non-finite benign rows are ignored.
"""

from __future__ import annotations

import math
import statistics

import jax
import jax.numpy as jnp

from spmc_jax.attacks import register
from spmc_jax.attacks.base import AttackEnv, AttackSpec, ModelAttack, keep_benign, model_attack


def benign_rows(W: jax.Array, malicious: jax.Array) -> jax.Array:
    """(n,) bool: rows the attacker may use as benign statistics (benign and finite)."""
    return ~malicious & jnp.all(jnp.isfinite(W), axis=1)


def masked_moments(U: jax.Array, rows: jax.Array, ddof: int = 1) -> tuple[jax.Array, jax.Array]:
    """Per-coordinate mean and std of the rows of `U` selected by `rows`.

    Args:
      U: (n, d) updates.
      rows: (n,) bool selection.
      ddof: delta degrees of freedom of the std (1: unbiased, like torch.std).

    Returns:
      (mu, sigma), each (d,); zeros when fewer than 1 (mu) or ddof + 1 (sigma) rows.
    """
    k = jnp.sum(rows).astype(U.dtype)
    sel = rows[:, None]
    mu = jnp.sum(jnp.where(sel, U, 0.0), axis=0) / jnp.maximum(k, 1.0)
    sq = jnp.sum(jnp.where(sel, jnp.square(U - mu), 0.0), axis=0)
    sigma = jnp.sqrt(sq / jnp.maximum(k - ddof, 1.0))
    return mu, sigma


def alie_z(n: int, m: int, reference: bool = False) -> float:
    """ALIE's z for n clients of which m are malicious.

    Raises:
      ValueError: if (n - s)/n is not in (0, 1), i.e. the attackers are a majority.
    """
    s = n // 2 + 1 - m
    if reference:
        return math.sqrt(2.0 * math.pi) / 2.0 * math.exp(-(s**2))
    p = (n - s) / n
    if not 0.0 < p < 1.0:
        raise ValueError(
            f"alie: z = Phi^-1((n - s)/n) undefined for n={n}, m={m} (s={s}); "
            f"needs m <= n/2, or pass z=... or reference_z=True"
        )
    return statistics.NormalDist().inv_cdf(p)


def alie(env: AttackEnv, *, reference_z: bool = False, z: float = 0.0) -> ModelAttack:
    """A Little Is Enough: every malicious row gets g + mu - z * sigma.

    Args:
      env: attack environment (`n_clients` = n and `num_malicious` = m set z).
      reference_z: use the SPMC reference's z = (sqrt(2 pi)/2) exp(-s^2).
      z: explicit z (> 0) overriding both formulas; 0 derives it.
    """
    if z < 0:
        raise ValueError(f"alie z={z} must be >= 0 (0 derives it from n and m)")
    if z > 0 and reference_z:
        raise ValueError("alie: give either z=... or reference_z=True, not both")
    if z > 0:
        zz = z
    elif env.num_malicious == 0:
        zz = 0.0  # no malicious rows: the value is never used
    else:
        zz = alie_z(env.n_clients, env.num_malicious, reference_z)

    def apply(W, g, malicious, key):
        del key
        mu, sigma = masked_moments(W - g, benign_rows(W, malicious))
        return keep_benign((g + (mu - zz * sigma)).astype(W.dtype), W, malicious)

    return model_attack(env, apply)


register(
    AttackSpec(
        "alie",
        "model",
        alie,
        "ALIE: malicious update mu - z*sigma of benign updates, z = Phi^-1((n-s)/n)",
        paper="Baruch et al., A Little Is Enough, NeurIPS 2019",
    )
)
