"""`all2one`: trigger -> one target label, with a choice of trigger (the "all2one" label mode
of backdoor attacks, Gu et al., "BadNets", arXiv:1708.06733, 2017, §3; named so in the FL
backdoor benchmarks).

A poisoned sample of any class gets the trigger and the label `target`:

    x' = T(x),   y' = target,

T one of the project's fixed triggers (`trigger` option): "pattern" (the backdoors101 5x3
pattern, see `pattern.py`), "pixel" (the white bottom-right pixel, `pixel.py`) or "square"
(the 3x3 white BadNets square, `badnets.py`), each at its default geometry. The backdoor
test set stamps every test image and relabels it `target`. `all2one trigger=pattern` is the
same attack as `pattern`; `all2all` is the all-to-all counterpart.

This module also holds `make_trigger`, shared with `all2all`.
"""

from __future__ import annotations

import numpy as np

from spmc_jax.attacks import register
from spmc_jax.attacks.badnets import check_target_rate, square_mask, square_origin, trigger_value
from spmc_jax.attacks.base import AttackEnv, AttackSpec, DataAttack, stamped_trigger_attack
from spmc_jax.attacks.pattern import pattern_trigger
from spmc_jax.attacks.pixel import pixel_trigger

TRIGGERS = ("pattern", "pixel", "square")


def make_trigger(env: AttackEnv, trigger: str) -> tuple[np.ndarray, np.ndarray]:
    """(mask (H, W, C) bool, values broadcastable to (H, W, C), normalised) of `trigger`.

    Raises:
      ValueError: for a trigger name not in TRIGGERS.
    """
    if trigger == "pattern":
        return pattern_trigger(env)
    if trigger == "pixel":
        return pixel_trigger(env)
    if trigger == "square":
        origin = square_origin("bottom_right", 3, env.image_shape)
        return square_mask(env.image_shape, 3, origin), trigger_value(env, 1.0, False)
    raise ValueError(f"trigger={trigger!r}; accepted: {', '.join(TRIGGERS)}")


def all2one(
    env: AttackEnv, *, target: int = 2, poison_rate: float = 0.3, trigger: str = "pattern"
) -> DataAttack:
    """All-to-one backdoor: trigger -> `target`.

    Args:
      env: attack environment.
      target: backdoor target label.
      poison_rate: per-sample poisoning probability on malicious clients.
      trigger: "pattern" (default), "pixel" or "square".
    """
    check_target_rate(env, target, poison_rate)
    mask, values = make_trigger(env, trigger)

    return stamped_trigger_attack(mask, values, target, poison_rate)


register(
    AttackSpec(
        "all2one",
        "data",
        all2one,
        "All-to-one backdoor: trigger (pattern/pixel/square) -> one target label (2)",
        paper="Gu et al., BadNets, arXiv:1708.06733 (2017), all-to-one",
    )
)
