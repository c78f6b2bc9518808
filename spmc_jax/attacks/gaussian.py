"""`gaussian`: Gaussian noise attack (Blanchard et al., "Machine Learning with Adversaries:
Byzantine Tolerant Gradient Descent", NeurIPS 2017).

With noise e ~ N(0, sigma^2 I_d), drawn independently per malicious client and coordinate
from the per-round key:

    mode "replace":  w_mal = g + e          (the update is pure noise, as in the paper)
    mode "add":      w_mal = w + e          (noise added to the honest update)

Unit: sigma is in model-update units. The noise goes on the trainable parameters only
(`AttackEnv.param_mask`); BatchNorm statistics keep the values the client trained, so a
running variance never turns negative. Blanchard et al. use std 200 on *gradients*; our
default sigma = 1.0 is already large against typical per-round updates at lr 0.01.
"""

from __future__ import annotations

import jax

from spmc_jax.attacks import register
from spmc_jax.attacks.base import AttackEnv, AttackSpec, ModelAttack, keep_benign, model_attack

MODES = ("replace", "add")


def gaussian(env: AttackEnv, *, sigma: float = 1.0, mode: str = "replace") -> ModelAttack:
    """Gaussian noise updates.

    Args:
      env: attack environment (`param_mask`).
      sigma: noise standard deviation (>= 0) per coordinate.
      mode: "replace" (update := noise) or "add" (update += noise).
    """
    if sigma < 0:
        raise ValueError(f"gaussian sigma={sigma} must be >= 0")
    if mode not in MODES:
        raise ValueError(f"gaussian mode={mode!r}; accepted: {', '.join(MODES)}")

    def apply(W, g, malicious, key):
        noise = sigma * jax.random.normal(key, W.shape, W.dtype)
        base = g if mode == "replace" else W
        return keep_benign((base + noise).astype(W.dtype), W, malicious)

    return model_attack(env, apply)


register(
    AttackSpec(
        "gaussian",
        "model",
        gaussian,
        "Gaussian noise: w = g + N(0, sigma^2) (mode=replace) or w + N(0, sigma^2) (mode=add)",
        paper="Blanchard et al., Byzantine Tolerant Gradient Descent (Krum), NeurIPS 2017",
    )
)
