"""`pixel`: a single-pixel trigger (the 1-pixel BadNets variant, Gu et al., "BadNets",
arXiv:1708.06733, 2017; Tran, Li & Madry, "Spectral Signatures in Backdoor Attacks",
NeurIPS 2018, use the same single-pixel backdoor).

One pixel, on every channel, is set to `value` (1.0 = white, pixel units converted per
channel with `AttackEnv.to_normalized`, or normalised units when `after_norm`) and the label
to `target`:

    x'[r, c, :] = to_normalized(value),    y' = target,

with (r, c) = `position`: one of the corners / "center" of `badnets`, or "ROW,COL"; the
default is the bottom-right pixel (H - 1, W - 1). The backdoor test set stamps every test
image and relabels it `target`.
"""

from __future__ import annotations

import numpy as np

from spmc_jax.attacks import register
from spmc_jax.attacks.badnets import check_target_rate, square_mask, square_origin, trigger_value
from spmc_jax.attacks.base import AttackEnv, AttackSpec, DataAttack, stamped_trigger_attack


def pixel_trigger(
    env: AttackEnv, position: str = "bottom_right", value: float = 1.0, after_norm: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(mask (H, W, C) bool with one pixel set on every channel, values (C,) normalised)."""
    origin = square_origin(position, 1, env.image_shape)
    return square_mask(env.image_shape, 1, origin), trigger_value(env, value, after_norm)


def pixel(
    env: AttackEnv,
    *,
    target: int = 2,
    poison_rate: float = 0.3,
    position: str = "bottom_right",
    value: float = 1.0,
    after_norm: bool = False,
) -> DataAttack:
    """Single-pixel backdoor (all-to-one).

    Args:
      env: attack environment.
      target: backdoor target label.
      poison_rate: per-sample poisoning probability on malicious clients.
      position: "bottom_right" (default), "bottom_left", "top_right", "top_left", "center"
        or "ROW,COL".
      value: the pixel's value; pixel units ([0, 1]) unless `after_norm`.
      after_norm: `value` is in normalised units.
    """
    check_target_rate(env, target, poison_rate)
    mask, v = pixel_trigger(env, position, value, after_norm)

    return stamped_trigger_attack(mask, v, target, poison_rate)


register(
    AttackSpec(
        "pixel",
        "data",
        pixel,
        "Single-pixel trigger (white, bottom-right pixel, every channel), label -> target",
        paper="Gu et al., BadNets, arXiv:1708.06733 (2017); Tran et al., NeurIPS 2018",
    )
)
