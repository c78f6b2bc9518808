"""`fang_trmean`: the full-knowledge local model poisoning attack on trimmed mean and median
(Fang, Cao, Jia & Gong, "Local Model Poisoning Attacks to Byzantine-Robust Federated
Learning", USENIX Security 2020, §4.2).

Let s_j be the sign of the change of parameter j of the global model without attack,
estimated from the benign mean update (s_j = +1 where it is >= 0), and w_max,j / w_min,j
the largest / smallest j-th value over the benign local models. Each attacker deviates
every parameter against s_j, drawing independently and uniformly (b = 2 by default):

    s_j = +1:  w_min,j > 0:  [w_min,j / b, w_min,j]      else  [b w_min,j, w_min,j]
    s_j = -1:  w_max,j > 0:  [w_max,j, b w_max,j]        else  [w_max,j / b, w_max,j]

(an interval between the two ends written; e.g. for w_max,j < 0, w_max,j / b lies above
w_max,j), so the crafted values sit just beyond the benign range on the side that drags the
trimmed mean (or median) against its direction of change. The paper writes this for the local
*model parameters* (`space="weights"`, default); `space="updates"` applies the same rule
to the updates w_i - g and sends g + the crafted update. Draws use the attack key, one
independent uniform per attacker and coordinate. Non-finite benign rows are ignored.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spmc_jax.attacks import register
from spmc_jax.attacks.alie import benign_rows
from spmc_jax.attacks.base import AttackEnv, AttackSpec, ModelAttack, keep_benign, model_attack
from spmc_jax.attacks.fang_krum import direction

SPACES = ("weights", "updates")


def deviation_bounds(
    V: jax.Array, rows: jax.Array, s: jax.Array, b: float
) -> tuple[jax.Array, jax.Array]:
    """The two ends (d,) of the interval each crafted value is drawn from (module
    docstring); `lo + r (hi - lo)`, r ~ U[0, 1), samples it whichever end is larger.

    Args:
      V: (n, d) benign values (weights or updates).
      rows: (n,) bool, the benign finite rows.
      s: (d,) direction signs (+1 / -1).
      b: the interval factor (> 1).
    """
    wmax = jnp.max(jnp.where(rows[:, None], V, -jnp.inf), axis=0)
    wmin = jnp.min(jnp.where(rows[:, None], V, jnp.inf), axis=0)
    any_rows = jnp.any(rows)
    wmax = jnp.where(any_rows, wmax, 0.0)
    wmin = jnp.where(any_rows, wmin, 0.0)
    lo_up = jnp.where(wmax > 0, wmax, wmax / b)
    hi_up = jnp.where(wmax > 0, b * wmax, wmax)
    lo_dn = jnp.where(wmin > 0, wmin / b, b * wmin)
    lo = jnp.where(s > 0, lo_dn, lo_up)
    hi = jnp.where(s > 0, wmin, hi_up)
    return lo, hi


def fang_trmean(env: AttackEnv, *, b: float = 2.0, space: str = "weights") -> ModelAttack:
    """Fang et al.'s full-knowledge attack on trimmed mean / median.

    Args:
      env: attack environment (`param_mask`).
      b: interval factor b > 1 (the paper's 2).
      space: "weights" (the paper: model parameters) or "updates" (w - g).
    """
    if not b > 1.0:
        raise ValueError(f"fang_trmean b={b}; accepted: > 1")
    if space not in SPACES:
        raise ValueError(f"fang_trmean space={space!r}; accepted: {', '.join(SPACES)}")

    def apply(W, g, malicious, key):
        rows = benign_rows(W, malicious)
        U = W - g
        s = direction(U, rows)
        base = W if space == "weights" else U
        lo, hi = deviation_bounds(base, rows, s, b)
        r = jax.random.uniform(key, W.shape, W.dtype)
        crafted = lo + r * (hi - lo)
        out = crafted if space == "weights" else g + crafted
        return keep_benign(out.astype(W.dtype), W, malicious)

    return model_attack(env, apply)


register(
    AttackSpec(
        "fang_trmean",
        "model",
        fang_trmean,
        "Fang (trimmed mean/median, full knowledge): values just beyond the benign range, "
        "against the direction of change (b=2)",
        paper="Fang et al., Local Model Poisoning Attacks to Byzantine-Robust FL, USENIX Sec 2020",
    )
)
