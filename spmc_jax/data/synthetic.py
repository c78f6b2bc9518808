"""Small generated datasets with real-data shapes, for fast tests when real data is absent."""

from __future__ import annotations

import numpy as np

from spmc_jax.data.sources import IMAGE_SHAPE
from spmc_jax.data.types import DATASETS, Dataset

_GRID = 4  # each class pattern is a random on/off 4x4 grid of blocks (per channel)
_LOW, _HIGH = 40.0, 200.0  # pixel values of "off" and "on" blocks
_NOISE_STD = 40.0  # per-pixel Gaussian noise: visible, but far below the 160 on/off contrast
_BRIGHTNESS_STD = 15.0  # per-image brightness offset, so images of a class are not all alike


def make_synthetic(
    kind: str = "mnist", n_train: int = 600, n_test: int = 200, seed: int = 0
) -> Dataset:
    """A learnable 10-class dataset shaped like `kind` (uint8 NHWC, int32 labels).

    Class c has a fixed random block pattern P_c (4x4 blocks per channel, each `_LOW` or
    `_HIGH`); an image of class c is clip(P_c + b + e, 0, 255) with a per-image brightness
    offset b ~ N(0, 15^2) and per-pixel noise e ~ N(0, 40^2). Labels are balanced (counts differ
    by at most one) and shuffled. Train and test share the patterns; same seed, same data.

    Args:
      kind: "mnist", "fashion_mnist" (28x28x1) or "cifar10" (32x32x3).
      n_train: number of training images (>= 1).
      n_test: number of test images (>= 1).
      seed: NumPy seed.

    Returns:
      A `Dataset` named "synthetic-<kind>" with kind=`kind`.
    """
    if kind not in DATASETS:
        raise ValueError(f"unknown kind {kind!r}; accepted: {', '.join(DATASETS)}")
    for arg, n in (("n_train", n_train), ("n_test", n_test)):
        if not isinstance(n, int | np.integer) or n < 1:
            raise ValueError(f"{arg} must be a positive integer, got {n!r}")
    h, w, c = IMAGE_SHAPE[kind]
    rng = np.random.default_rng(seed)
    on = rng.random((10, _GRID, _GRID, c)) < 0.5
    blocks = np.where(on, _HIGH, _LOW)
    # Upsample each block to (h/4, w/4) pixels (28 -> 7, 32 -> 8).
    protos = blocks.repeat(h // _GRID, axis=1).repeat(w // _GRID, axis=2)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.permutation(np.arange(n) % 10).astype(np.int32)
        bright = rng.normal(0.0, _BRIGHTNESS_STD, (n, 1, 1, 1))
        x = protos[y] + bright + rng.normal(0.0, _NOISE_STD, (n, h, w, c))
        return np.clip(np.rint(x), 0, 255).astype(np.uint8), y

    x_train, y_train = split(n_train)
    x_test, y_test = split(n_test)
    return Dataset(
        name=f"synthetic-{kind}",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        source=f"synthetic(seed={seed})",
        kind=kind,
    )
