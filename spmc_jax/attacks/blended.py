"""`blended`: blended-injection backdoor (Chen et al., "Targeted Backdoor Attacks on Deep
Learning Systems Using Data Poisoning", 2017).

A poisoned sample is blended with a fixed key pattern p and relabelled `target`:

    x'_pix = (1 - a) * x_pix + a * p,    y' = target

in pixel space, with p (H, W, C) drawn once, uniformly in [0, 1] per pixel and channel,
from `numpy.random.default_rng(seed)` (Chen et al.'s random-noise key pattern). Because
normalisation is affine per channel, the blend is done exactly on the normalised batch:

    x' = (1 - a) * x + a * to_normalized(p).

With `after_norm`, p's values are taken as normalised units instead (no conversion).
The backdoor test set blends every test image with the same a and relabels it `target`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from spmc_jax.attacks import register
from spmc_jax.attacks.badnets import check_target_rate
from spmc_jax.attacks.base import AttackEnv, AttackSpec, DataAttack, relabel


def blend_pattern(image_shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """The key pattern p: (H, W, C) float32, uniform in [0, 1], fixed by `seed`."""
    return np.random.default_rng(seed).uniform(0.0, 1.0, image_shape).astype(np.float32)


def blended(
    env: AttackEnv,
    *,
    target: int = 2,
    poison_rate: float = 0.3,
    alpha: float = 0.2,
    seed: int = 0,
    after_norm: bool = False,
) -> DataAttack:
    """Blended random-pattern backdoor.

    Args:
      env: attack environment.
      target: backdoor target label.
      poison_rate: per-sample poisoning probability on malicious clients.
      alpha: blend ratio a in (0, 1].
      seed: seed of the random key pattern.
      after_norm: the pattern's values are normalised units rather than pixels.
    """
    check_target_rate(env, target, poison_rate)
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"blended alpha={alpha} outside (0, 1]")
    if seed < 0:
        raise ValueError(f"blended seed={seed} must be >= 0")
    p = blend_pattern(env.image_shape, seed)
    pn = p if after_norm else np.asarray(env.to_normalized(p), np.float32)

    def blend(x, flags):
        mixed = (1.0 - alpha) * x + alpha * jnp.asarray(pn, x.dtype)[None]
        return jnp.where(flags[:, None, None, None], mixed.astype(x.dtype), x)

    def apply(x, y, flags, rank, key):
        del rank, key
        return blend(x, flags), relabel(y, flags, target)

    def test(x, y):
        flags = np.ones(x.shape[:1], bool)
        return blend(x, flags), relabel(y, flags, target)

    return DataAttack(poison_rate=poison_rate, apply=apply, test=test, target=target)


register(
    AttackSpec(
        "blended",
        "data",
        blended,
        "Blended: x' = (1-a)x + a*p with a fixed random pattern p (a=0.2), label -> target",
        paper="Chen et al., Targeted Backdoor Attacks ... Using Data Poisoning, arXiv:1712.05526",
    )
)
