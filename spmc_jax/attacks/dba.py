"""`dba`: distributed backdoor attack (Xie et al., "DBA: Distributed Backdoor Attacks
against Federated Learning", ICLR 2020).

A global trigger is split into K local triggers; the attacker of rank r (0..m-1) trains
only with local trigger r mod K, while the backdoor test set uses the full (global)
trigger, the union of the K parts. Poisoned samples are relabelled `target`.

Trigger geometry (defaults = the DBA code's CIFAR-10 pattern): part k is a horizontal
bar of 1 x `size` pixels on every channel,

    row(k) = row + (k // 2) * row_step
    cols(k) = col + (k % 2) * (size + gap)  ...  + size - 1

i.e. two bars per row, `gap` pixels apart, rows `row_step` apart. With the defaults
(size 6, gap 3, row_step 4, origin (0, 0)) and K = 4:

    part 0: row 0, cols 0-5     part 1: row 0, cols 9-14
    part 2: row 4, cols 0-5     part 3: row 4, cols 9-14

The parts are disjoint. K = `parts`, or min(4, m) when `parts` is 0 (so that every part
is trained by some attacker; 4 when m = 0). The value is written, like the DBA code, into
the *normalised* tensor (1.0 on every channel) unless `after_norm` is False, in which case
it is a pixel value converted with `AttackEnv.to_normalized`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from spmc_jax.attacks import register
from spmc_jax.attacks.badnets import check_target_rate, trigger_value
from spmc_jax.attacks.base import AttackEnv, AttackSpec, DataAttack, relabel, stamp


def part_masks(
    image_shape: tuple[int, int, int],
    parts: int,
    size: int = 6,
    gap: int = 3,
    row_step: int = 4,
    origin: tuple[int, int] = (0, 0),
) -> np.ndarray:
    """(K, H, W, C) bool masks of the K local triggers (see the module docstring).

    Raises:
      ValueError: for non-positive sizes or a layout that does not fit in the image.
    """
    h, w = image_shape[:2]
    if parts < 1:
        raise ValueError(f"dba parts={parts} must be >= 1 (or 0 for min(4, m))")
    if size < 1 or gap < 0 or row_step < 1:
        raise ValueError(f"dba size={size} (>= 1), gap={gap} (>= 0), row_step={row_step} (>= 1)")
    r0, c0 = origin
    masks = np.zeros((parts, *image_shape), bool)
    for k in range(parts):
        r = r0 + (k // 2) * row_step
        c = c0 + (k % 2) * (size + gap)
        if not (0 <= r < h and c >= 0 and c + size <= w):
            raise ValueError(
                f"dba part {k} (row {r}, cols {c}..{c + size - 1}) does not fit in a {h}x{w} "
                f"image; reduce parts/size/gap/row_step or move row/col"
            )
        masks[k, r, c : c + size, :] = True
    return masks


def dba(
    env: AttackEnv,
    *,
    target: int = 2,
    poison_rate: float = 0.3,
    parts: int = 0,
    size: int = 6,
    gap: int = 3,
    row_step: int = 4,
    row: int = 0,
    col: int = 0,
    value: float = 1.0,
    after_norm: bool = True,
) -> DataAttack:
    """Distributed backdoor: attacker `rank` stamps local trigger `rank mod K`.

    Args:
      env: attack environment (`num_malicious` sets the default K).
      target: backdoor target label.
      poison_rate: per-sample poisoning probability on malicious clients.
      parts: K, the number of local triggers; 0 means min(4, m) (4 when m = 0).
      size: length of each bar in pixels.
      gap: horizontal gap between the two bars of a row.
      row_step: vertical distance between rows of bars.
      row, col: top-left pixel of part 0.
      value: trigger value; normalised units when `after_norm` (the DBA code), else pixels.
      after_norm: see `value`.
    """
    check_target_rate(env, target, poison_rate)
    if parts < 0:
        raise ValueError(f"dba parts={parts} must be >= 1, or 0 for min(4, m)")
    k = parts if parts > 0 else (min(4, env.num_malicious) if env.num_malicious > 0 else 4)
    masks = part_masks(env.image_shape, k, size, gap, row_step, (row, col))
    full = masks.any(axis=0)
    v = trigger_value(env, value, after_norm)

    def apply(x, y, flags, rank, key):
        del key
        mask = jnp.asarray(masks)[jnp.asarray(rank) % k]
        return stamp(x, flags, mask, v), relabel(y, flags, target)

    def test(x, y):
        flags = np.ones(x.shape[:1], bool)
        return stamp(x, flags, full, v), relabel(y, flags, target)

    return DataAttack(poison_rate=poison_rate, apply=apply, test=test, target=target)


register(
    AttackSpec(
        "dba",
        "data",
        dba,
        "DBA: trigger split into K=min(4,m) bars, attacker r stamps part r mod K; full at test",
        paper="Xie et al., DBA: Distributed Backdoor Attacks against FL, ICLR 2020",
    )
)
