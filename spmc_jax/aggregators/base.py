"""The aggregator interface shared by every server rule.

An aggregator is a pair of pure functions over the flattened client matrix
(design.md, "Core shapes"):

    init(global_flat[d]) -> state
    aggregate(client_flat[n, d], state, ctx) -> (new_global[d], state, AggInfo)

`client_flat` holds the clients' *trained local models* (not deltas), flattened by
`spmc_jax.flat.Flattener` (parameters first, then BatchNorm statistics). Rules that work
on updates compute `client_flat - ctx.global_flat` themselves. Non-finite rows arrive
already replaced by `ctx.global_flat` (a zero update) and flagged `ctx.valid == False`
(`sanitize`, run once per round: by `get_aggregator`'s wrapper, or by the caller when it
builds the rule with `inputs_sanitized=True`, as the engine does); rules must give them
zero weight where they weight clients.

Static, per-run facts (client count, attacker count, learning rate, which coordinates
are trainable parameters, the server's proxy-data operations) come in an
`AggregatorEnv` when the rule is built, so `aggregate` stays a function of arrays only
and jits once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from spmc_jax.flat import LeafInfo

PyTree = Any


class AggInfo(NamedTuple):
    """What every rule reports per round.

    Attributes:
      client_weights: (n,) float32, the weight each client's model/update received in
        the new global model (selection rules: 1/k for the k selected, 0 otherwise).
        Comparable across rules; logged per round.
    """

    client_weights: jax.Array


class RoundContext(NamedTuple):
    """Per-round arrays handed to `aggregate` (a pytree: traced under jit).

    Attributes:
      global_flat: (d,) the global model at the start of the round.
      round: int32 scalar, 0-based round index.
      key: PRNG key for randomised rules (DnC's coordinate subsample, CRFL's noise).
      n_samples: (n,) float32, each participating client's data size n_i.
      valid: (n,) bool, False where the client's row was non-finite (already neutralised).
      client_ids: (n,) int32, registered ids of the participating clients (for rules that
        keep per-client state across rounds under partial participation).
    """

    global_flat: jax.Array
    round: jax.Array
    key: jax.Array
    n_samples: jax.Array
    valid: jax.Array
    client_ids: jax.Array


class ProxyOps(Protocol):
    """Server-side operations on the clean proxy set (last 10% of the train set).

    Built by the engine from on-device data; all are jittable functions of flat models.
    """

    def loss_entropy(self, flat: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Mean cross-entropy and mean prediction entropy of model `flat` on the proxy set."""
        ...

    def train(self, flat: jax.Array, key: jax.Array, epochs: int) -> jax.Array:
        """`epochs` passes of local SGD (the clients' optimiser) on the proxy set from `flat`."""
        ...

    def logits(self, flat: jax.Array, x: jax.Array) -> jax.Array:
        """Eval-mode logits (B, C) of model `flat` on normalised model inputs x (B, H, W, C)."""
        ...

    def inputs(self) -> tuple[jax.Array, jax.Array]:
        """The proxy set as normalised model inputs (P, H, W, C) float32 and labels (P,)."""
        ...

    def features(self, flat: jax.Array, x: jax.Array) -> jax.Array:
        """Eval-mode penultimate-layer representation (B, h) of model `flat` on inputs x
        (the classifier layer's input: `logits = features @ W + b`)."""
        ...


@dataclasses.dataclass(frozen=True)
class AggregatorEnv:
    """Static facts a rule may need, fixed for the whole run.

    Attributes:
      n_clients: clients aggregated per round (n).
      num_malicious: attacker count the rule may assume (rules that need it say so);
        defaults to floor(n * gamma) like the reference.
      lr: client learning rate (rules working on pseudo-gradients (g - w)/lr).
      rounds: total communication rounds (CRFL's last-round rule).
      param_mask: (d,) bool numpy array, True for trainable parameters, False for
        BatchNorm statistics.
      total_clients: registered clients N (>= n under partial participation), for
        per-client persistent state.
      proxy: server proxy-set operations, or None when the run has no proxy data.
      layout: each variable tensor's slice of the flat vector (`Flattener.layout`), for
        layer-wise rules; () when unknown (rules that need it must say so).
      output_layer: flax module name of the classifier layer ("cls", "linear", "out"), whose
        tensors are the `layout` entries with `['params']['<output_layer>']` in their name.
      reference_param_order: (num_params,) int flat coordinates of the parameters in the
        reference's PyTorch `parameters()` order and layout (`flat.reference_order`), for
        rules reproducing the reference's coordinate choices; None when the model has no
        reference counterpart (mlp) or the env was built without a model.
      dataset: the run's dataset name ("mnist", "fashion_mnist", "cifar10"); "" when the
        env was built without one (unit tests), for rules that load another dataset.
      data_dir: where datasets live (None: the default cache), as in `AttackEnv`.
      mean, std: the run's per-channel normalisation; () when unknown.
    """

    n_clients: int
    num_malicious: int
    lr: float
    rounds: int
    param_mask: np.ndarray
    total_clients: int | None = None
    proxy: ProxyOps | None = None
    layout: tuple[LeafInfo, ...] = ()
    output_layer: str = ""
    reference_param_order: np.ndarray | None = None
    dataset: str = ""
    data_dir: str | None = None
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @property
    def n_registered(self) -> int:
        return self.total_clients if self.total_clients is not None else self.n_clients


class Aggregator(NamedTuple):
    """A server rule: `init(global_flat) -> state`, `aggregate(W, state, ctx)`."""

    init: Callable[[jax.Array], PyTree]
    aggregate: Callable[[jax.Array, PyTree, RoundContext], tuple[jax.Array, PyTree, AggInfo]]


@dataclasses.dataclass(frozen=True)
class AggregatorSpec:
    """A registry entry: `factory(env, **options) -> Aggregator` and a one-line summary.

    `options` are the rule's hyperparameters: keyword-only arguments of `factory` with
    defaults (the reference's values) and type annotations, so the CLI can validate and
    list them.
    """

    name: str
    factory: Callable[..., Aggregator]
    summary: str
    needs_proxy: bool = False
    needs_num_malicious: bool = False


def sanitize(client_flat: jax.Array, global_flat: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Replace non-finite rows by the global model (a zero update) and flag them.

    Returns:
      (clean matrix, valid mask (n,) bool).
    """
    valid = jnp.all(jnp.isfinite(client_flat), axis=1)
    clean = jnp.where(valid[:, None], client_flat, global_flat[None, :])
    return clean, valid


def weighted_mean(client_flat: jax.Array, weights: jax.Array) -> jax.Array:
    """Σ_i w_i x_i / Σ_i w_i (weights need not be normalised; all-zero gives zeros)."""
    w = weights.astype(client_flat.dtype)
    total = jnp.sum(w)
    # HIGHEST: TPUs and recent GPUs would otherwise round float32 inputs to bf16/TF32.
    agg = jnp.matmul(w, client_flat, precision=jax.lax.Precision.HIGHEST)
    return agg / jnp.where(total > 0, total, 1.0)


def normalized(weights: jax.Array) -> jax.Array:
    """weights / sum(weights), with an all-zero vector left at zero."""
    total = jnp.sum(weights)
    return weights / jnp.where(total > 0, total, 1.0)
