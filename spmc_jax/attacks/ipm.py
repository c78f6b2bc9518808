"""`ipm`: inner-product manipulation (Xie et al., "Fall of Empires: Breaking Byzantine-
tolerant SGD by Inner Product Manipulation", UAI 2019).

Every malicious client sends the same update, the benign mean reversed and shrunk,

    u_mal = -epsilon * mu,      w_mal = g + u_mal,

with mu the mean of the benign updates u_i = w_i - g (omniscient). A small epsilon keeps
u_mal close to the benign cloud (passes distance-based rules such as Krum) while making
the inner product of the aggregate with the true direction negative; a large epsilon
targets mean/median-type rules. Default epsilon = 0.5; use 0.1 for the small-epsilon
setting (`--attack-opt ipm.epsilon=0.1`).
"""

from __future__ import annotations

from spmc_jax.attacks import register
from spmc_jax.attacks.alie import benign_rows, masked_moments
from spmc_jax.attacks.base import AttackEnv, AttackSpec, ModelAttack, keep_benign, model_attack


def ipm(env: AttackEnv, *, epsilon: float = 0.5) -> ModelAttack:
    """Inner-product manipulation: malicious rows get g - epsilon * mean benign update.

    Args:
      env: attack environment (`param_mask`).
      epsilon: shrink factor (> 0).
    """
    if epsilon <= 0:
        raise ValueError(f"ipm epsilon={epsilon} must be > 0")

    def apply(W, g, malicious, key):
        del key
        mu, _ = masked_moments(W - g, benign_rows(W, malicious))
        return keep_benign((g - epsilon * mu).astype(W.dtype), W, malicious)

    return model_attack(env, apply)


register(
    AttackSpec(
        "ipm",
        "model",
        ipm,
        "Inner-product manipulation: malicious update = -epsilon * benign mean (epsilon=0.5)",
        paper="Xie et al., Fall of Empires, UAI 2019",
    )
)
