"""The attack interface.

Two kinds of attack, both applied by the engine to malicious clients only:

* A **data attack** transforms a malicious client's training batch inside the jitted
  local step, after augmentation and normalisation:
  `apply(x, y, flags, rank, key) -> (x, y)` where `x` is the normalised float batch
  (B, H, W, C), `y` the labels (B,), `flags` (B,) bool marks the samples chosen for
  poisoning (drawn once per sample with probability `poison_rate`, fixed for the run,
  like the reference), `rank` is the attacker's index among the malicious clients
  (0..m-1; DBA uses it) and `key` a per-step PRNG key. Samples with `flags == False`
  must come out unchanged. `test(x, y) -> (x, y)` builds the backdoor test set (full
  trigger, target labels); None for attacks without a test-time trigger.
* A **model attack** rewrites malicious rows of the `(n, d)` matrix of trained client
  models after local training: `apply(W, global_flat, malicious, key) -> W`. It may read
  the benign rows (omniscient attacks); benign rows must come out bit-identical (use
  `keep_benign`).

Triggers are specified in pixel units ([0, 1]) or directly in normalised units; an attack
"before normalisation" converts its pixel values with `AttackEnv.to_normalized`, which is
exact because normalisation is affine and per channel.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class AttackEnv:
    """Static facts an attack may need.

    Attributes:
      image_shape: (H, W, C) of the model input (after resize / channel replication).
      mean, std: per-channel normalisation constants, length C.
      num_classes: number of labels.
      num_malicious: m, the number of malicious clients per round.
      n_clients: n, clients per round.
      lr: client learning rate.
    """

    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int = 10
    num_malicious: int = 0
    n_clients: int = 10
    lr: float = 0.01

    def to_normalized(
        self, pixel: jax.Array | np.ndarray | float, channel: Any = slice(None)
    ) -> jax.Array:
        """Map pixel-unit values of `channel` to normalised units: (v - mean) / std."""
        mean = jnp.asarray(self.mean, jnp.float32)[channel]
        std = jnp.asarray(self.std, jnp.float32)[channel]
        return (jnp.asarray(pixel, jnp.float32) - mean) / std


class DataAttack(NamedTuple):
    """A training-data backdoor / label attack (see module docstring)."""

    poison_rate: float
    apply: Callable[..., tuple[jax.Array, jax.Array]]
    test: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]] | None
    target: int | None


class ModelAttack(NamedTuple):
    """An update-matrix attack: `apply(W, global_flat, malicious, key) -> W`."""

    apply: Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """Registry entry: `factory(env, **options)` -> DataAttack | ModelAttack."""

    name: str
    kind: str  # "data" or "model"
    factory: Callable[..., DataAttack | ModelAttack]
    summary: str
    paper: str = ""


def keep_benign(new: jax.Array, old: jax.Array, malicious: jax.Array) -> jax.Array:
    """Rows of `new` where `malicious`, rows of `old` (bit-identical) elsewhere."""
    return jnp.where(malicious[:, None], new, old)


def stamp(x: jax.Array, flags: jax.Array, mask: np.ndarray, values: jax.Array) -> jax.Array:
    """Write `values` where `mask` (H, W, C bool) is set, for the samples flagged.

    Args:
      x: (B, H, W, C) batch.
      flags: (B,) bool.
      mask: (H, W, C) static bool pattern.
      values: broadcastable to (H, W, C): the trigger values (normalised units).
    """
    m = jnp.asarray(mask)[None] & flags[:, None, None, None]
    return jnp.where(m, jnp.broadcast_to(values, x.shape[1:])[None].astype(x.dtype), x)


def relabel(y: jax.Array, flags: jax.Array, target: int) -> jax.Array:
    """Labels of flagged samples set to `target`."""
    return jnp.where(flags, jnp.asarray(target, y.dtype), y)
