"""`pattern`: a fixed multi-pixel pattern trigger (Bagdasaryan & Shmatikov, "Blind Backdoors
in Deep Learning Models", USENIX Security 2021, the `backdoors101` pattern synthesizer, also
the "pattern" trigger of the FL backdoor benchmarks).

The trigger is the 5 x 3 pixel pattern (1 = white, 0 = black, . = untouched)

    1 0 1
    . 1 .
    . . 0
    . 1 .
    1 0 1

written on every channel with its top-left pixel at (`row`, `col`) = (3, 23), i.e. rows 3-7,
cols 23-25 of the 32 x 32 input (backdoors101's x_top = 3, y_top = 23 on C x H x W tensors).
A poisoned sample gets the pattern and the label `target` (all-to-one):

    x'[r, c, :] = to_normalized(P[r - row, c - col])  where P is set,   y' = target.

Values are pixel units converted per channel with `AttackEnv.to_normalized` (exact: the
normalisation is affine per channel), or normalised units when `after_norm`. The backdoor
test set stamps every test image and relabels it `target`.
"""

from __future__ import annotations

import numpy as np

from spmc_jax.attacks import register
from spmc_jax.attacks.badnets import check_target_rate
from spmc_jax.attacks.base import AttackEnv, AttackSpec, DataAttack, stamped_trigger_attack

# NaN = pixel not part of the trigger.
PATTERN = np.array(
    [
        [1.0, 0.0, 1.0],
        [np.nan, 1.0, np.nan],
        [np.nan, np.nan, 0.0],
        [np.nan, 1.0, np.nan],
        [1.0, 0.0, 1.0],
    ]
)
ROW, COL = 3, 23


def pattern_trigger(
    env: AttackEnv, row: int = ROW, col: int = COL, after_norm: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(mask (H, W, C) bool, values (H, W, C) float32 normalised) of the pattern at (row, col).

    Raises:
      ValueError: if the 5 x 3 pattern does not fit in the image at (row, col).
    """
    h, w, c = env.image_shape
    ph, pw = PATTERN.shape
    if not (0 <= row <= h - ph and 0 <= col <= w - pw):
        raise ValueError(
            f"pattern row={row}, col={col}: the {ph}x{pw} pattern must fit in a {h}x{w} "
            f"image; accepted: 0 <= row <= {h - ph}, 0 <= col <= {w - pw}"
        )
    pix = np.zeros((h, w), np.float64)
    set2d = np.zeros((h, w), bool)
    pix[row : row + ph, col : col + pw] = np.nan_to_num(PATTERN)
    set2d[row : row + ph, col : col + pw] = ~np.isnan(PATTERN)
    mask = np.repeat(set2d[:, :, None], c, axis=2)
    pix3 = np.repeat(pix[:, :, None], c, axis=2).astype(np.float32)
    values = pix3 if after_norm else np.asarray(env.to_normalized(pix3), np.float32)
    return mask, values


def pattern(
    env: AttackEnv,
    *,
    target: int = 2,
    poison_rate: float = 0.3,
    row: int = ROW,
    col: int = COL,
    after_norm: bool = False,
) -> DataAttack:
    """Pattern-trigger backdoor (all-to-one).

    Args:
      env: attack environment.
      target: backdoor target label.
      poison_rate: per-sample poisoning probability on malicious clients.
      row, col: top-left pixel of the 5 x 3 pattern (default 3, 23).
      after_norm: the pattern's 1/0 values are normalised units rather than pixels.
    """
    check_target_rate(env, target, poison_rate)
    mask, values = pattern_trigger(env, row, col, after_norm)

    return stamped_trigger_attack(mask, values, target, poison_rate)


register(
    AttackSpec(
        "pattern",
        "data",
        pattern,
        "Pattern trigger: the backdoors101 5x3 black/white pattern at rows 3-7, cols 23-25",
        paper="Bagdasaryan & Shmatikov, Blind Backdoors in Deep Learning Models, USENIX Sec 2021",
    )
)
