"""`badnets`: a solid square patch trigger (Gu et al., "BadNets", 2017).

A poisoned sample x gets a `size` x `size` square written on every channel and the label
`target`:

    x'[r0:r0+size, c0:c0+size, :] = v,    y' = target

with v = `value` (default 1.0 = white) in pixel units converted per channel with
`AttackEnv.to_normalized`, or directly in normalised units when `after_norm` (the SPMC
reference's convention). The default square is 3 x 3 in the bottom-right corner, touching
the image border. The backdoor test set stamps every test image and relabels it `target`.

This module also holds the option checks and geometry helpers shared by the other
trigger attacks (`blended`, `dba`).
"""

from __future__ import annotations

import numpy as np

from spmc_jax.attacks import register
from spmc_jax.attacks.base import AttackEnv, AttackSpec, DataAttack, stamped_trigger_attack

CORNERS = ("bottom_right", "bottom_left", "top_right", "top_left", "center")


def check_target_rate(env: AttackEnv, target: int, poison_rate: float) -> None:
    """Validate the options every backdoor shares.

    Raises:
      ValueError: if `target` is not a label or `poison_rate` is outside [0, 1].
    """
    if not 0 <= target < env.num_classes:
        raise ValueError(f"target={target} outside the labels [0, {env.num_classes})")
    if not 0.0 <= poison_rate <= 1.0:
        raise ValueError(f"poison_rate={poison_rate} outside [0, 1]")


def trigger_value(env: AttackEnv, value: float, after_norm: bool) -> np.ndarray:
    """Per-channel trigger value (C,) in normalised units.

    Args:
      env: attack environment (normalisation constants).
      value: the trigger value, in normalised units if `after_norm`, else in pixels [0, 1].
      after_norm: see `value`.
    """
    channels = env.image_shape[-1]
    if after_norm:
        return np.full((channels,), value, np.float32)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"pixel trigger value={value} outside [0, 1] (or set after_norm=True)")
    return np.asarray(env.to_normalized(value), np.float32)


def square_origin(position: str, size: int, image_shape: tuple[int, int, int]) -> tuple[int, int]:
    """Top-left corner (row, col) of a `size` x `size` square placed at `position`.

    Args:
      position: one of CORNERS or "ROW,COL" (the square's top-left pixel).
      size: side length in pixels.
      image_shape: (H, W, C).

    Raises:
      ValueError: for an unknown position or a square that does not fit in the image.
    """
    h, w = image_shape[:2]
    if size < 1 or size > min(h, w):
        raise ValueError(f"trigger size={size} outside [1, {min(h, w)}]")
    named = {
        "bottom_right": (h - size, w - size),
        "bottom_left": (h - size, 0),
        "top_right": (0, w - size),
        "top_left": (0, 0),
        "center": ((h - size) // 2, (w - size) // 2),
    }
    if position in named:
        return named[position]
    try:
        r, c = (int(v) for v in position.split(","))
    except ValueError:
        raise ValueError(
            f"trigger position={position!r}; accepted: {', '.join(CORNERS)} or 'ROW,COL'"
        ) from None
    if not (0 <= r <= h - size and 0 <= c <= w - size):
        raise ValueError(
            f"trigger position={position!r} with size={size} does not fit in a {h}x{w} image"
        )
    return r, c


def square_mask(
    image_shape: tuple[int, int, int], size: int, origin: tuple[int, int]
) -> np.ndarray:
    """(H, W, C) bool mask of a `size` x `size` square at `origin`, on every channel."""
    mask = np.zeros(image_shape, bool)
    r, c = origin
    mask[r : r + size, c : c + size, :] = True
    return mask


def badnets(
    env: AttackEnv,
    *,
    target: int = 2,
    poison_rate: float = 0.3,
    size: int = 3,
    position: str = "bottom_right",
    value: float = 1.0,
    after_norm: bool = False,
) -> DataAttack:
    """BadNets square-patch backdoor.

    Args:
      env: attack environment.
      target: backdoor target label.
      poison_rate: per-sample poisoning probability on malicious clients.
      size: side of the square, in pixels.
      position: one of "bottom_right" (default), "bottom_left", "top_right", "top_left",
        "center", or "ROW,COL" for the square's top-left pixel.
      value: trigger value; pixel units ([0, 1], 1.0 = white) unless `after_norm`.
      after_norm: `value` is in normalised units (the SPMC reference's convention).
    """
    check_target_rate(env, target, poison_rate)
    mask = square_mask(env.image_shape, size, square_origin(position, size, env.image_shape))
    v = trigger_value(env, value, after_norm)

    return stamped_trigger_attack(mask, v, target, poison_rate)


register(
    AttackSpec(
        "badnets",
        "data",
        badnets,
        "BadNets: solid square patch (3x3 white, bottom-right), label -> target",
        paper="Gu et al., BadNets, arXiv:1708.06733 (2017)",
    )
)
