"""Label-flipping attacks (spmc_reference.md §5, `PairFlip` / `SymFlip`).

Only labels change, images are untouched, and there is no test-time trigger (`test` is
None, `target` None). The engine draws the flagged samples with `poison_rate` (the
reference's `noise_data_rate`, 0.3), once per sample for the run.

* `label_flip_pair`:  y' = (y + 1) mod C.
* `label_flip_sym`:   y' = (y + o) mod C with o uniform in {1, ..., C-1}, i.e. a uniformly
  random *other* class (probability rate/(C-1) each).

Difference from the reference, documented: the reference draws the symmetric target once
per sample and freezes it; here `apply` only sees the batch, so the other class is redrawn
from the per-step key every time a flagged sample is seen. It is deterministic given that
key, and which samples are flipped is still fixed for the run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spmc_jax.attacks import register
from spmc_jax.attacks.base import AttackEnv, AttackSpec, DataAttack


def _check(env: AttackEnv, poison_rate: float) -> None:
    if not 0.0 <= poison_rate <= 1.0:
        raise ValueError(f"poison_rate={poison_rate} outside [0, 1]")
    if env.num_classes < 2:
        raise ValueError(f"label flipping needs num_classes >= 2, got {env.num_classes}")


def label_flip_pair(env: AttackEnv, *, poison_rate: float = 0.3) -> DataAttack:
    """Pair flip: flagged labels y -> (y + 1) mod C.

    Args:
      env: attack environment (`num_classes`).
      poison_rate: per-sample flip probability on malicious clients.
    """
    _check(env, poison_rate)
    c = env.num_classes

    def apply(x, y, flags, rank, key):
        del rank, key
        return x, jnp.where(flags, (y + 1) % c, y).astype(y.dtype)

    return DataAttack(poison_rate=poison_rate, apply=apply, test=None, target=None)


def label_flip_sym(env: AttackEnv, *, poison_rate: float = 0.3) -> DataAttack:
    """Symmetric flip: flagged labels go to a uniformly random other class.

    Args:
      env: attack environment (`num_classes`).
      poison_rate: per-sample flip probability on malicious clients.
    """
    _check(env, poison_rate)
    c = env.num_classes

    def apply(x, y, flags, rank, key):
        del rank
        offset = jax.random.randint(key, y.shape, 1, c, dtype=jnp.int32)
        return x, jnp.where(flags, (y + offset) % c, y).astype(y.dtype)

    return DataAttack(poison_rate=poison_rate, apply=apply, test=None, target=None)


register(
    AttackSpec(
        "label_flip_pair",
        "data",
        label_flip_pair,
        "Pair label flip: y -> (y+1) mod C on flagged samples (reference PairFlip)",
        paper="SPMC reference RF/Attack/byzantine (PairFlip); cf. Tolpegin et al., ESORICS 2020",
    )
)
register(
    AttackSpec(
        "label_flip_sym",
        "data",
        label_flip_sym,
        "Symmetric label flip: flagged y -> uniformly random other class (reference SymFlip)",
        paper="SPMC reference RF/Attack/byzantine (SymFlip); cf. Tolpegin et al., ESORICS 2020",
    )
)
