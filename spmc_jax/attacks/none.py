"""`none`: no attack (malicious clients, if any, behave like benign ones)."""

from __future__ import annotations

from spmc_jax.attacks import register
from spmc_jax.attacks.base import AttackEnv, AttackSpec, ModelAttack


def none(env: AttackEnv) -> ModelAttack:
    """Identity model attack."""
    del env
    return ModelAttack(apply=lambda W, g, malicious, key: W)


register(AttackSpec("none", "model", none, "no attack"))
