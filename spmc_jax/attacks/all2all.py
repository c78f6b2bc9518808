"""`all2all`: trigger -> the next label (Gu et al., "BadNets", arXiv:1708.06733, 2017, §3:
the all-to-all attack maps digit i to i + 1; the "all2all" mode of the FL backdoor
benchmarks).

A poisoned sample gets the trigger and the label (y + 1) mod C:

    x' = T(x),   y' = (y + 1) mod C,

T chosen with `trigger` like `all2one` ("pattern" default, "pixel", "square"). The backdoor
test set stamps every test image and relabels it (y + 1) mod C, so R = 100 - % of
triggered test images predicted as their own next label.

There is no single target label: `DataAttack.target` is -1, which no label equals, so the
engine's "target class excluded" R (R_excl_target) excludes nothing and equals R (no test
image is already of its backdoor label, since (y + 1) mod C != y).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from spmc_jax.attacks import register
from spmc_jax.attacks.all2one import make_trigger
from spmc_jax.attacks.base import AttackEnv, AttackSpec, DataAttack, stamp

NO_SINGLE_TARGET = -1


def all2all(env: AttackEnv, *, poison_rate: float = 0.3, trigger: str = "pattern") -> DataAttack:
    """All-to-all backdoor: trigger -> (y + 1) mod C.

    Args:
      env: attack environment (`num_classes` = C >= 2).
      poison_rate: per-sample poisoning probability on malicious clients.
      trigger: "pattern" (default), "pixel" or "square".
    """
    if not 0.0 <= poison_rate <= 1.0:
        raise ValueError(f"poison_rate={poison_rate} outside [0, 1]")
    c = env.num_classes
    if c < 2:
        raise ValueError(f"all2all needs num_classes >= 2, got {c}")
    mask, values = make_trigger(env, trigger)

    def shift(y, flags):
        return jnp.where(flags, (y + 1) % c, y).astype(y.dtype)

    def apply(x, y, flags, rank, key):
        del rank, key
        return stamp(x, flags, mask, values), shift(y, flags)

    def test(x, y):
        flags = np.ones(x.shape[:1], bool)
        return stamp(x, flags, mask, values), shift(y, flags)

    return DataAttack(poison_rate=poison_rate, apply=apply, test=test, target=NO_SINGLE_TARGET)


register(
    AttackSpec(
        "all2all",
        "data",
        all2all,
        "All-to-all backdoor: trigger (pattern/pixel/square) -> label (y+1) mod C",
        paper="Gu et al., BadNets, arXiv:1708.06733 (2017), all-to-all",
    )
)
