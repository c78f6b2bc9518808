"""`sign_flip`: sign-flipping attack (Li et al., "RSA: Byzantine-Robust Stochastic
Aggregation Methods for Distributed Learning from Heterogeneous Datasets", AAAI 2019):
each malicious client sends its own update reversed and scaled,

    w_mal = g - s * (w - g),     s = `scale` (default 1).
"""

from __future__ import annotations

from spmc_jax.attacks import register
from spmc_jax.attacks.base import AttackEnv, AttackSpec, ModelAttack, keep_benign, model_attack


def sign_flip(env: AttackEnv, *, scale: float = 1.0) -> ModelAttack:
    """Reverse (and scale) malicious updates.

    Args:
      env: attack environment (`param_mask`).
      scale: s > 0.
    """
    if scale <= 0:
        raise ValueError(f"sign_flip scale={scale} must be > 0")

    def apply(W, g, malicious, key):
        del key
        return keep_benign((g - scale * (W - g)).astype(W.dtype), W, malicious)

    return model_attack(env, apply)


register(
    AttackSpec(
        "sign_flip",
        "model",
        sign_flip,
        "Sign flip: w = g - s*(w - g), s = 1",
        paper="Li et al., RSA, AAAI 2019 (sign-flipping attack)",
    )
)
