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
  trigger, target labels); None for attacks without a test-time trigger. An attack whose
  backdoor test set is not a transform of the clean test set (`edge_case`: held-out
  out-of-distribution images) gives it as `test_set` (a `BackdoorSet`) instead; the engine
  then measures R on it.
* A **model attack** rewrites malicious rows of the `(n, d)` matrix of trained client
  models after local training: `apply(W, global_flat, malicious, key) -> W`. It may read
  the benign rows (omniscient attacks); benign rows must come out bit-identical (use
  `keep_benign`). Model attacks act on the trainable parameters only: a factory returns
  `model_attack(env, apply)`, which runs `apply` on the parameter columns
  (`AttackEnv.param_mask`) and leaves every other column (BatchNorm running statistics)
  at the value the client trained. So `apply` computes its statistics (means, stds,
  norms, distances) over parameters only and cannot, e.g., make a running variance
  negative or boost it.

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
      param_mask: (d,) bool NumPy array over the flat model vector, True on trainable
        parameters (`Flattener.param_mask`); model attacks modify and measure only those
        coordinates. None: every coordinate is a parameter.
      model: `client.ModelOps` (flattener, eval-mode logits) for client-hook attacks that
        evaluate the model (A3FL, IBA) or map flat vectors to parameters (Neurotoxin); set
        by the engine, None elsewhere.
      dataset: the run's dataset name ("" when unknown); `edge_case` picks its
        out-of-distribution source from it.
      data_dir: the run's `--data-dir` (where `edge_case` looks for its source).
      output_layer: flax module name of the model's classifier layer ("" when unknown;
        `chameleon` trains it apart from the encoder).
    """

    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int = 10
    num_malicious: int = 0
    n_clients: int = 10
    lr: float = 0.01
    param_mask: np.ndarray | None = None
    model: Any = None
    dataset: str = ""
    data_dir: str | None = None
    output_layer: str = ""

    def __post_init__(self) -> None:
        if self.param_mask is not None:
            mask = np.asarray(self.param_mask)
            if mask.ndim != 1 or mask.dtype != np.bool_:
                raise ValueError(
                    f"AttackEnv.param_mask must be a 1-D bool array or None, got "
                    f"dtype={mask.dtype} shape={mask.shape}"
                )
            object.__setattr__(self, "param_mask", mask)

    def to_normalized(
        self, pixel: jax.Array | np.ndarray | float, channel: Any = slice(None)
    ) -> jax.Array:
        """Map pixel-unit values of `channel` to normalised units: (v - mean) / std."""
        mean = jnp.asarray(self.mean, jnp.float32)[channel]
        std = jnp.asarray(self.std, jnp.float32)[channel]
        return (jnp.asarray(pixel, jnp.float32) - mean) / std


class BackdoorSet(NamedTuple):
    """A standalone backdoor test set: R = 100 - % of `x` predicted as `y`.

    Attributes:
      x: (M, h, w, c) uint8 images in their source's stored layout.
      y: (M,) int32 backdoor labels.
      transform: uint8 batch -> normalised (B, H, W, C) model input (the run's
        normalisation), e.g. `make_test_transform(source_kind, env.mean, env.std)`.
    """

    x: np.ndarray
    y: np.ndarray
    transform: Callable[[jax.Array], jax.Array]


class DataAttack(NamedTuple):
    """A training-data backdoor / label attack (see module docstring).

    `hook`: a stateful trigger (A3FL, IBA) carries its `client.ClientHook`; its state (the
    trigger being optimised) is then passed as a last argument to both `apply(x, y, flags,
    rank, key, state)` and `test(x, y, state)`.

    `target` is the backdoor label (None: untargeted; -1: no single target, `all2all`).
    """

    poison_rate: float
    apply: Callable[..., tuple[jax.Array, jax.Array]]
    test: Callable[..., tuple[jax.Array, jax.Array]] | None
    target: int | None
    hook: Any = None
    test_set: BackdoorSet | None = None


ModelApply = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


class ModelAttack(NamedTuple):
    """An update-matrix attack: `apply(W, global_flat, malicious, key) -> W`."""

    apply: ModelApply


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """Registry entry: `factory(env, **options)` -> DataAttack | ModelAttack."""

    name: str
    # "data", "model", "client" (a training-time attack: the factory returns a
    # client.ClientHook) or "client_data" (a DataAttack whose trigger is a hook's state)
    kind: str
    factory: Callable[..., Any]
    summary: str
    paper: str = ""


def keep_benign(new: jax.Array, old: jax.Array, malicious: jax.Array) -> jax.Array:
    """Rows of `new` where `malicious`, rows of `old` (bit-identical) elsewhere."""
    return jnp.where(malicious[:, None], new, old)


def restrict_to_params(apply: ModelApply, param_mask: np.ndarray | None) -> ModelApply:
    """`apply` run on the parameter columns of W only; other columns keep W's values.

    The wrapped function gathers W[:, mask] and g[mask], calls `apply` on them (so every
    statistic it computes is over parameters only) and writes the result back into those
    columns. Entries outside the mask come out bit-identical to W, for malicious rows too.
    Params come first in the flat layout, so the mask is normally one contiguous block and
    the gather/scatter are a slice and an in-place `dynamic_update_slice`; any other mask
    uses index gather/scatter.

    Args:
      apply: a model attack's `apply(W, g, malicious, key) -> W` on (n, p) / (p,) arrays.
      param_mask: (d,) bool, True on parameters; None or all True returns `apply` itself.
    """
    if param_mask is None:
        return apply
    mask = np.asarray(param_mask, bool)
    if mask.all():
        return apply
    idx = np.flatnonzero(mask)
    if idx.size == 0:  # no parameters: nothing an attack may touch
        return lambda W, g, malicious, key: W
    lo, hi = int(idx[0]), int(idx[-1]) + 1
    contiguous = hi - lo == idx.size

    def restricted(W: jax.Array, g: jax.Array, malicious: jax.Array, key: jax.Array) -> jax.Array:
        if W.shape[-1] != mask.size or g.shape[-1] != mask.size:
            raise ValueError(
                f"model attack: W {W.shape} / global {g.shape} do not match "
                f"AttackEnv.param_mask of length {mask.size}"
            )
        if contiguous:
            sub = apply(W[:, lo:hi], g[lo:hi], malicious, key)
            return jax.lax.dynamic_update_slice_in_dim(W, sub.astype(W.dtype), lo, axis=1)
        sub = apply(W[:, idx], g[idx], malicious, key)
        return W.at[:, idx].set(sub.astype(W.dtype))

    return restricted


def model_attack(env: AttackEnv, apply: ModelApply) -> ModelAttack:
    """The ModelAttack every model-attack factory returns: `apply` on parameters only.

    Args:
      env: attack environment; its `param_mask` selects the columns `apply` sees.
      apply: `apply(W, g, malicious, key) -> W`, written for a matrix of parameters.
    """
    return ModelAttack(apply=restrict_to_params(apply, env.param_mask))


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


def stamped_trigger_attack(
    mask: np.ndarray, values: Any, target: int, poison_rate: float
) -> DataAttack:
    """The DataAttack of a fixed stamped trigger: flagged training samples (and every test
    image) get `values` where `mask` is set and the label `target`.

    Args:
      mask: (H, W, C) static bool pattern.
      values: trigger values (normalised units), broadcastable to (H, W, C).
      target: backdoor label.
      poison_rate: per-sample poisoning probability.
    """

    def apply(x, y, flags, rank, key):
        del rank, key
        return stamp(x, flags, mask, values), relabel(y, flags, target)

    def test(x, y):
        flags = np.ones(x.shape[:1], bool)
        return stamp(x, flags, mask, values), relabel(y, flags, target)

    return DataAttack(poison_rate=poison_rate, apply=apply, test=test, target=target)
