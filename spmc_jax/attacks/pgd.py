"""`pgd`: norm-constrained backdoor against norm-clipping defences (Sun et al., "Can You
Really Backdoor Federated Learning?", 2019; Wang et al., "Attack of the Tails", NeurIPS
2020).

Each malicious update is projected onto the l2 ball of radius r around the global model,

    u = w - g,    w_mal = g + u * min(1, r / ||u||_2),

so a norm-bounding server (clip at r) leaves it untouched. `radius` r > 0 is explicit;
r <= 0 (default) uses the median l2 norm of the benign updates (omniscient), a natural
guess of a server's clipping bound. Compose it after a data attack and, optionally, a
boost: `base+pgd`, `base+scaling+pgd` (boost then project).

Difference from the papers, documented: they project during local training (after every
step or epoch, projected gradient descent); here the projection is applied once to the
final update, since model attacks only see trained models.
"""

from __future__ import annotations

import jax.numpy as jnp

from spmc_jax.attacks import register
from spmc_jax.attacks.alie import benign_rows
from spmc_jax.attacks.base import AttackEnv, AttackSpec, ModelAttack, keep_benign, model_attack


def pgd(env: AttackEnv, *, radius: float = 0.0) -> ModelAttack:
    """Project malicious updates onto the l2 ball of radius `radius` around g.

    Args:
      env: attack environment (`param_mask`).
      radius: ball radius r; r <= 0 means the median norm of the benign updates.
    """

    # Norms are over the parameter coordinates (`model_attack`), like the norm-clipping
    # defences' (`AggregatorEnv.param_mask`), so r is a radius in the server's own metric.
    def apply(W, g, malicious, key):
        del key
        U = W - g
        norms = jnp.linalg.norm(U, axis=1)
        if radius > 0:
            r = jnp.asarray(radius, W.dtype)
        else:
            benign = benign_rows(W, malicious)
            med = jnp.nanmedian(jnp.where(benign, norms, jnp.nan))
            r = jnp.where(jnp.any(benign), med, jnp.inf)  # no benign rows: no projection
        # Only shrink, never grow: rows already inside the ball are kept exactly.
        outside = norms > r
        factor = r / jnp.where(outside, norms, 1.0)
        projected = jnp.where(outside[:, None], g + U * factor[:, None], W)
        return keep_benign(projected.astype(W.dtype), W, malicious)

    return model_attack(env, apply)


register(
    AttackSpec(
        "pgd",
        "model",
        pgd,
        "Norm-constrained backdoor: project malicious updates onto ||w-g|| <= r (r=median benign)",
        paper="Sun et al., Can You Really Backdoor FL?, 2019; Wang et al., Attack of the Tails, "
        "NeurIPS 2020",
    )
)
