"""`label_flip_targeted`: targeted label flipping, one source class to one target class
(Tolpegin et al., "Data Poisoning Attacks Against Federated Learning Systems", ESORICS
2020; the "one2one" label mode of the FL backdoor benchmarks).

Only labels change, images are untouched: a flagged sample of class `source` is relabelled
`target`, every other sample (flagged or not) keeps its label:

    y' = target  if flagged and y = source,   else y.

Defaults source = 5, target = 3 (CIFAR-10 dog -> cat, Tolpegin et al.'s first setting).
Like the other label flips there is no test-time trigger (`test` and `target` are None), so
the engine reports R with the reference-trigger probe; the attack's effect shows in the
accuracy A (the source class's recall).
"""

from __future__ import annotations

import jax.numpy as jnp

from spmc_jax.attacks import register
from spmc_jax.attacks.base import AttackEnv, AttackSpec, DataAttack


def label_flip_targeted(
    env: AttackEnv, *, source: int = 5, target: int = 3, poison_rate: float = 0.3
) -> DataAttack:
    """Targeted flip: flagged labels `source` -> `target`.

    Args:
      env: attack environment (`num_classes`).
      source: the class whose flagged samples are relabelled.
      target: their new label.
      poison_rate: per-sample flip probability on malicious clients (samples of other
        classes are drawn too but stay unchanged).

    Raises:
      ValueError: source/target not labels, equal, or a rate outside [0, 1].
    """
    c = env.num_classes
    for name, v in (("source", source), ("target", target)):
        if not 0 <= v < c:
            raise ValueError(f"label_flip_targeted {name}={v} outside the labels [0, {c})")
    if source == target:
        raise ValueError(f"label_flip_targeted source={source} equals target; accepted: differ")
    if not 0.0 <= poison_rate <= 1.0:
        raise ValueError(f"poison_rate={poison_rate} outside [0, 1]")

    def apply(x, y, flags, rank, key):
        del rank, key
        hit = flags & (y == source)
        return x, jnp.where(hit, jnp.asarray(target, y.dtype), y)

    return DataAttack(poison_rate=poison_rate, apply=apply, test=None, target=None)


register(
    AttackSpec(
        "label_flip_targeted",
        "data",
        label_flip_targeted,
        "Targeted label flip: flagged samples of class source (5) -> target (3); untargeted R",
        paper="Tolpegin et al., Data Poisoning Attacks Against FL Systems, ESORICS 2020",
    )
)
