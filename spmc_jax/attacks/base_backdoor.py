"""`base`: the SPMC reference backdoor (spmc_reference.md §1.6).

Each training sample is poisoned independently with probability `poison_rate` (0.3),
drawn once per sample for the run. A poisoned sample gets label `target` (2) and the value
`value` (1.0) written into the *normalised* tensor (after crop/flip) at channel 0, rows
{0, 2} x cols {0, 1, 2, 4, 5, 6}: two dashed 3-pixel lines in the top-left corner.
The backdoor test set triggers all test images and relabels them `target` (target-class
images included, like the reference; the engine also reports R without them).

Difference from the reference, documented: the reference freezes one augmented copy of the
malicious clients' data; here the augmentation is fresh every epoch and the trigger is
stamped after it, so the trigger position is the same and only the augmentation of the
poisoned images differs.
"""

from __future__ import annotations

import numpy as np

from spmc_jax.attacks import register
from spmc_jax.attacks.base import AttackEnv, AttackSpec, DataAttack, stamped_trigger_attack

TRIGGER_ROWS = (0, 2)
TRIGGER_COLS = (0, 1, 2, 4, 5, 6)


def trigger_mask(
    image_shape: tuple[int, int, int],
    rows: tuple[int, ...] = TRIGGER_ROWS,
    cols: tuple[int, ...] = TRIGGER_COLS,
    channels: tuple[int, ...] = (0,),
) -> np.ndarray:
    """(H, W, C) bool mask of the reference trigger."""
    mask = np.zeros(image_shape, bool)
    for r in rows:
        for c in cols:
            for ch in channels:
                mask[r, c, ch] = True
    return mask


def base(
    env: AttackEnv,
    *,
    target: int = 2,
    poison_rate: float = 0.3,
    value: float = 1.0,
    after_norm: bool = True,
) -> DataAttack:
    """Reference backdoor.

    Args:
      env: attack environment.
      target: backdoor target label.
      poison_rate: per-sample poisoning probability on malicious clients.
      value: trigger value; in normalised units when `after_norm` (reference), else pixels.
      after_norm: write `value` after normalisation (reference) or as a pixel value.
    """
    if not 0 <= target < env.num_classes:
        raise ValueError(f"target={target} outside [0, {env.num_classes})")
    if not 0.0 <= poison_rate <= 1.0:
        raise ValueError(f"poison_rate={poison_rate} outside [0, 1]")
    mask = trigger_mask(env.image_shape)
    v = value if after_norm else env.to_normalized(value, 0)

    return stamped_trigger_attack(mask, v, target, poison_rate)


register(
    AttackSpec(
        "base",
        "data",
        base,
        "SPMC reference backdoor: 12-pixel trigger on channel 0, label 2",
        paper="He et al., SPMC (ICML 2025), reference code",
    )
)
