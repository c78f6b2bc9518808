"""`mimic`: the mimic attack (Karimireddy, He & Jaggi, "Byzantine-Robust Learning on
Heterogeneous Datasets via Bucketing", ICLR 2022, §4 and Appendix).

All attackers send a copy of one benign client's model, chosen to maximise the variance
the copies add along the benign updates' top principal direction:

    z   = argmax_{||z|| = 1} sum_{i benign} (z . (u_i - mu))^2   (top principal direction),
    i*  = argmax_{i benign} |z . (u_i - mu)|,                     w_mal = w_{i*},

u_i = w_i - g, mu the benign mean (the sign of z is arbitrary, hence the absolute value).
Over-representing the most atypical benign client biases robust rules towards its
(heterogeneous) data without any out-of-range value.

Computation: z . (u_i - mu) = sqrt(lambda_1) a_i with (lambda_1, a) the top eigenpair of
the k x k Gram matrix of the centred benign updates, so i* = argmax |a_i| from an n x n
`eigh`; no (d, d) covariance is formed.

Difference from the paper, documented: the paper estimates z online over a warm-up phase
and then keeps i* fixed; model attacks here are stateless per round (and clients are
resampled each round), so z and i* are recomputed from each round's benign updates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from spmc_jax.attacks import register
from spmc_jax.attacks.alie import benign_rows, masked_moments
from spmc_jax.attacks.base import AttackEnv, AttackSpec, ModelAttack, keep_benign, model_attack

_HI = lax.Precision.HIGHEST


def mimic_index(U: jax.Array, rows: jax.Array) -> jax.Array:
    """i*: the selected row with the largest |projection| on the top principal direction.

    Args:
      U: (n, d) updates.
      rows: (n,) bool, the benign finite rows.
    """
    mu, _ = masked_moments(U, rows)
    V = jnp.where(rows[:, None], U - mu, 0.0)
    gram = jnp.matmul(V, V.T, precision=_HI)
    _, vecs = jnp.linalg.eigh(gram)  # ascending eigenvalues
    a = vecs[:, -1]
    return jnp.argmax(jnp.where(rows, jnp.abs(a), -1.0))


def mimic(env: AttackEnv) -> ModelAttack:
    """Mimic: every attacker sends a copy of benign client i* (module docstring).

    Args:
      env: attack environment (`param_mask`).
    """

    def apply(W, g, malicious, key):
        del key
        rows = benign_rows(W, malicious)
        i = mimic_index(W - g, rows)
        copy = jax.lax.dynamic_index_in_dim(W, i, keepdims=False)
        out = keep_benign(jnp.broadcast_to(copy, W.shape), W, malicious)
        return jnp.where(jnp.any(rows), out, W)

    return model_attack(env, apply)


register(
    AttackSpec(
        "mimic",
        "model",
        mimic,
        "Mimic: attackers copy the benign client farthest along the top principal direction",
        paper="Karimireddy, He & Jaggi, Byzantine-Robust Learning ... via Bucketing, ICLR 2022",
    )
)
