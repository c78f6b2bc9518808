"""Dataset container and per-dataset constants (spmc_reference.md §1.2)."""

from __future__ import annotations

import dataclasses

import numpy as np

DATASETS = ("mnist", "fashion_mnist", "cifar10")

# Normalisation constants of the reference transforms (per channel, after replication).
MEAN = {
    "mnist": (0.1307, 0.1307, 0.1307),
    "fashion_mnist": (0.1307, 0.1307, 0.1307),  # the reference reuses MNIST's constants
    "cifar10": (0.4914, 0.4822, 0.4465),
}
STD = {
    "mnist": (0.3081, 0.3081, 0.3081),
    "fashion_mnist": (0.3081, 0.3081, 0.3081),
    "cifar10": (0.2470, 0.2435, 0.2615),
}
# Horizontal flip augmentation: CIFAR-10 only.
FLIP = {"mnist": False, "fashion_mnist": False, "cifar10": True}
# Model input: every dataset becomes 32x32x3.
INPUT_SHAPE = (32, 32, 3)
TRAIN_SIZE = {"mnist": 60_000, "fashion_mnist": 60_000, "cifar10": 50_000}
TEST_SIZE = {"mnist": 10_000, "fashion_mnist": 10_000, "cifar10": 10_000}


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A classification dataset as host uint8 arrays, in the canonical order.

    Attributes:
      name: one of DATASETS (or "synthetic-<base>" for generated test data).
      x_train: (N, H, W, C) uint8; (F)MNIST is (N, 28, 28, 1), CIFAR-10 (N, 32, 32, 3).
      y_train: (N,) int32 labels in [0, 10).
      x_test, y_test: the test split, same layout.
      source: human-readable origin (e.g. "tfds", "idx:/path", "cifar10-jpeg:/path").
      kind: which reference transform family applies ("mnist", "fashion_mnist", "cifar10").
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str
    kind: str
    num_classes: int = 10

    def __post_init__(self) -> None:
        if self.kind not in DATASETS:
            raise ValueError(f"unknown dataset kind {self.kind!r}; accepted: {DATASETS}")
        splits = (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test))
        for split, x, y in splits:
            if x.dtype != np.uint8 or x.ndim != 4:
                raise ValueError(f"{split} images must be uint8 (N,H,W,C), got {x.dtype} {x.shape}")
            if y.shape != (x.shape[0],):
                raise ValueError(f"{split} labels shape {y.shape} != ({x.shape[0]},)")

    @property
    def mean(self) -> tuple[float, ...]:
        return MEAN[self.kind]

    @property
    def std(self) -> tuple[float, ...]:
        return STD[self.kind]

    @property
    def flip(self) -> bool:
        return FLIP[self.kind]
