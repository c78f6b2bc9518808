"""`spmc_evade`: an SPMC-aware model attack that keeps the attackers' server score at the
benign level (this project; an adaptive attack on He et al., SPMC, ICML 2025).

SPMC weighs client i by alpha_i = softmax(phi / T)_i with phi_i = cos(x_i, Gamma_i), Gamma_i
the uniform leave-one-out mean of the other clients, on whole weight vectors
(`space="weights"`, SPMC's default) or on updates w - g (`space="updates"`, SPMC's
`--spmc-space updates`). A backdoored model is pulled away from the others, lowering its
phi and hence its alpha. The attackers, knowing the benign models, shrink their deviation
from the benign mean mu towards it by the largest common factor that still matches the
benign score level:

    w_i(s) = mu + s (w_i - mu)  for every attacker i,   0 <= s <= s_max (`boost`, 1),
    s*     = max { s : min_{i attacker} phi_i(s) >= L({phi_j(s) : j benign}) },

phi(s) the SPMC scores of the matrix with the attackers' rows replaced (benign scores move
with them, through Gamma), L = `level` ("max", default: the attackers' alpha is at least
every benign client's; "mean", "median", "min"). s = 0 makes every attacker mu, whose score
is ~1, so the attack falls back to the benign mean when no s > 0 qualifies. s_max > 1
boosts the backdoor deviation when even the boosted models stay at the benign level; with
s_max = 1 s* is the minimal blend t = 1 - s* towards mu. Compose it after a data attack:
`--attack base+spmc_evade`.

s* is found by bisection (`steps`, 30: |s - s*| <= s_max / 2^30 for a monotone score);
each step evaluates the server's own scores (`spmc_jax.spmc.loo_cosines`) on the candidate
matrix, O(n d). The scores are over the columns the attack sees, the parameters, as SPMC
compares parameters only (its default `compare_bn=False`). Non-finite rows are left out
of every Gamma, like the server's sanitising. The attacker must use SPMC's `space`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from spmc_jax import spmc as spmc_math
from spmc_jax.attacks import register
from spmc_jax.attacks.base import AttackEnv, AttackSpec, ModelAttack, keep_benign, model_attack

LEVELS = ("max", "mean", "median", "min")


def _level(phi: jax.Array, rows: jax.Array, level: str) -> jax.Array:
    if level == "max":
        return jnp.max(jnp.where(rows, phi, -jnp.inf))
    if level == "min":
        return jnp.min(jnp.where(rows, phi, jnp.inf))
    if level == "mean":
        return jnp.sum(jnp.where(rows, phi, 0.0)) / jnp.maximum(jnp.sum(rows), 1)
    # median of the selected entries: sort with the others pushed to +inf.
    k = jnp.sum(rows)
    srt = jnp.sort(jnp.where(rows, phi, jnp.inf))
    lo = srt[jnp.maximum((k - 1) // 2, 0)]
    hi = srt[jnp.maximum(k // 2, 0)]
    return 0.5 * (lo + hi)


def evade_scale(
    W: jax.Array,
    g: jax.Array,
    malicious: jax.Array,
    space: str = "weights",
    level: str = "max",
    s_max: float = 1.0,
    steps: int = 30,
) -> tuple[jax.Array, jax.Array]:
    """(s*, mu): the common deviation scale and the benign mean (module docstring).

    Args:
      W: (n, d) client models (parameters).
      g: (d,) global model.
      malicious: (n,) bool.
      space: "weights" or "updates" (SPMC's comparison space).
      level: benign score level, one of LEVELS.
      s_max: the largest scale tried.
      steps: bisection steps.
    """
    finite = jnp.all(jnp.isfinite(W), axis=1)
    rows = ~malicious & finite
    k = jnp.maximum(jnp.sum(rows), 1).astype(W.dtype)
    X = jnp.where(finite[:, None], W, g)  # the server's sanitising, for the scores only
    mu = jnp.sum(jnp.where(rows[:, None], X, 0.0), axis=0) / k
    ref = g if space == "updates" else None

    def feasible(s):
        Xs = jnp.where(malicious[:, None], mu + s * (X - mu), X)
        phi = spmc_math.loo_cosines(Xs, None, reference=ref, valid=finite)
        worst = jnp.min(jnp.where(malicious & finite, phi, jnp.inf))
        return worst >= _level(phi, rows, level)

    def body(_, lohi):
        lo, hi = lohi
        mid = 0.5 * (lo + hi)
        ok = feasible(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    top = jnp.asarray(s_max, W.dtype)
    lo, _ = lax.fori_loop(0, steps, body, (jnp.zeros((), W.dtype), top))
    s = jnp.where(feasible(top), top, lo)
    return s, mu


def spmc_evade(
    env: AttackEnv,
    *,
    level: str = "max",
    space: str = "weights",
    boost: float = 1.0,
    steps: int = 30,
) -> ModelAttack:
    """SPMC-aware evasion: shrink the attackers' deviation until their score is benign-level.

    Args:
      env: attack environment (`param_mask`).
      level: "max" (default), "mean", "median" or "min" of the benign scores to match.
      space: "weights" (SPMC's default) or "updates"; must match `--spmc-space`.
      boost: s_max > 0, the largest deviation scale tried (1: no boost; > 1 boosts).
      steps: bisection steps (>= 1).
    """
    if level not in LEVELS:
        raise ValueError(f"spmc_evade level={level!r}; accepted: {', '.join(LEVELS)}")
    if space not in spmc_math.SPACES:
        raise ValueError(f"spmc_evade space={space!r}; accepted: {', '.join(spmc_math.SPACES)}")
    if not boost > 0:
        raise ValueError(f"spmc_evade boost={boost}; accepted: > 0")
    if steps < 1:
        raise ValueError(f"spmc_evade steps={steps}; accepted: >= 1")

    def apply(W, g, malicious, key):
        del key
        if W.shape[0] < 2:
            return W
        s, mu = evade_scale(W, g, malicious, space, level, boost, steps)
        return keep_benign((mu + s * (W - mu)).astype(W.dtype), W, malicious)

    return model_attack(env, apply)


register(
    AttackSpec(
        "spmc_evade",
        "model",
        spmc_evade,
        "SPMC-aware: attackers shrink toward the benign mean just enough that their "
        "leave-one-out cosine (SPMC's score) reaches the benign max",
        paper="this project (adaptive attack on He et al., SPMC, ICML 2025)",
    )
)
