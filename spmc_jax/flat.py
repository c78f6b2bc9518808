"""Ravel / unravel a model's variables to one float32 vector, built once per model.

Layout: every `params` leaf first (in flax's sorted path order), then every non-parameter
collection (BatchNorm `batch_stats`). `param_mask` marks the parameter coordinates, which
is what SPMC's cosine and CRFL's norm look at; aggregators average the whole vector
(BatchNorm statistics included), like the reference's state_dict averaging.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


class LeafInfo(NamedTuple):
    """One variable tensor's place in the flat vector (`Flattener.layout`).

    Attributes:
      name: flax path, e.g. "['params']['cls']['kernel']".
      start, stop: its coordinates are flat[start:stop].
      shape: the tensor's shape (flax layout: conv HWIO, dense in×out).
      is_param: trainable parameter (False: BatchNorm statistics).
    """

    name: str
    start: int
    stop: int
    shape: tuple[int, ...]
    is_param: bool


@dataclasses.dataclass(frozen=True)
class Flattener:
    """Static description of a variables pytree; `ravel`/`unravel` are jittable and vmappable."""

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    sizes: tuple[int, ...]
    is_param: tuple[bool, ...]
    names: tuple[str, ...]
    order: tuple[int, ...]  # leaf positions in flat order (params first)

    @staticmethod
    def build(variables: PyTree) -> Flattener:
        """Describe `variables`, a flax variables dict ({'params': ..., 'batch_stats': ...})."""
        leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(variables)
        names = tuple(jax.tree_util.keystr(p) for p, _ in leaves_with_path)
        is_param = tuple(
            bool(p) and getattr(p[0], "key", None) == "params" for p, _ in leaves_with_path
        )
        order = tuple(
            [i for i, ip in enumerate(is_param) if ip]
            + [i for i, ip in enumerate(is_param) if not ip]
        )
        shapes = tuple(tuple(np.shape(leaf)) for _, leaf in leaves_with_path)
        sizes = tuple(int(np.prod(s)) for s in shapes)
        return Flattener(treedef, shapes, sizes, is_param, names, order)

    @property
    def dim(self) -> int:
        return sum(self.sizes)

    @property
    def num_params(self) -> int:
        return sum(s for s, p in zip(self.sizes, self.is_param, strict=True) if p)

    @property
    def param_mask(self) -> np.ndarray:
        """(d,) bool: True on trainable-parameter coordinates."""
        return np.concatenate([np.full(self.sizes[i], self.is_param[i], bool) for i in self.order])

    @property
    def layout(self) -> tuple[LeafInfo, ...]:
        """Every tensor's slice of the flat vector, in flat order (parameters first).

        Layer-wise rules (per-tensor statistics, the output layer's rows) read it from
        `AggregatorEnv.layout`.
        """
        out, offset = [], 0
        for i in self.order:
            out.append(
                LeafInfo(
                    self.names[i], offset, offset + self.sizes[i], self.shapes[i], self.is_param[i]
                )
            )
            offset += self.sizes[i]
        return tuple(out)

    def ravel(self, variables: PyTree) -> jax.Array:
        leaves = jax.tree_util.tree_leaves(variables)
        return jnp.concatenate([jnp.ravel(leaves[i]).astype(jnp.float32) for i in self.order])

    def unravel(self, flat: jax.Array) -> PyTree:
        leaves: list[Any] = [None] * len(self.sizes)
        offset = 0
        for i in self.order:
            leaves[i] = flat[offset : offset + self.sizes[i]].reshape(self.shapes[i])
            offset += self.sizes[i]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)
