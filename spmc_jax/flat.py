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

    def reference_order(self, model: str, params_only: bool = False) -> np.ndarray:
        """Flat coordinates in the reference's PyTorch order and layout (see `reference_order`)."""
        return reference_order(self.layout, model, params_only)

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


# PyTorch module of the reference (`RF/Backbones/*.py`) for each flax module path, in the
# order the reference registers them (= its state_dict / parameters() order). Leaves per
# module in torch order: conv/linear (weight, bias), BatchNorm (weight, bias, running_mean,
# running_var); flax names (kernel, bias) / (scale, bias, mean, var).
def _resnet10_modules() -> tuple[tuple[str, str], ...]:
    mods = [("stem", "conv1"), ("stem_bn", "bn1")]
    for i in range(1, 5):
        for ours, theirs in (
            ("conv1", "conv1"),
            ("bn1", "bn1"),
            ("conv2", "conv2"),
            ("bn2", "bn2"),
            ("shortcut_conv", "shortcut.0"),
            ("shortcut_bn", "shortcut.1"),
        ):
            mods.append((f"layer{i}/{ours}", f"layer{i}.0.{theirs}"))
    mods.append(("linear", "linear"))
    return tuple(mods)


REFERENCE_MODULES: dict[str, tuple[tuple[str, str], ...]] = {
    "simple_cnn": (
        ("conv1", "feats.conv1"),
        ("conv2", "feats.conv2"),
        ("fc1", "feats.fc1"),
        ("fc2", "feats.fc2"),
        ("l1", "l1"),
        ("l2", "l2"),
        ("cls", "cls"),
    ),
    "resnet10": _resnet10_modules(),
}
# (flax collection, flax leaf name, torch leaf name), in torch order within a module.
_TORCH_LEAVES = (
    ("params", "kernel", "weight"),
    ("params", "scale", "weight"),
    ("params", "bias", "bias"),
    ("batch_stats", "mean", "running_mean"),
    ("batch_stats", "var", "running_var"),
)


def _leaf_path(name: str) -> tuple[str, ...]:
    """ "['params']['layer1']['conv1']['kernel']" -> ("params", "layer1", "conv1", "kernel")."""
    return tuple(part.strip("'\"") for part in name.strip("[]").split("]["))


def _reference_entries(
    layout: tuple[LeafInfo, ...], model: str, params_only: bool
) -> list[tuple[str, np.ndarray]]:
    if model not in REFERENCE_MODULES:
        raise ValueError(
            f"model {model!r} has no reference (PyTorch) counterpart; accepted: "
            f"{', '.join(REFERENCE_MODULES)}"
        )
    by_path = {_leaf_path(leaf.name): leaf for leaf in layout}
    used: set[tuple[str, ...]] = set()
    out: list[tuple[str, np.ndarray]] = []
    for ours, theirs in REFERENCE_MODULES[model]:
        module = tuple(ours.split("/"))
        for coll, flax_leaf, torch_leaf in _TORCH_LEAVES:
            path = (coll, *module, flax_leaf)
            leaf = by_path.get(path)
            if leaf is None or (params_only and coll != "params"):
                continue
            idx = np.arange(leaf.start, leaf.stop).reshape(leaf.shape)
            if len(leaf.shape) == 4:  # conv HWIO -> OIHW
                idx = idx.transpose(3, 2, 0, 1)
            elif len(leaf.shape) == 2:  # dense in×out -> out×in
                idx = idx.T
            out.append((f"{theirs}.{torch_leaf}", idx))
            used.add(path)
    expected = {p for p in by_path if not params_only or p[0] == "params"}
    if used != expected:
        missing = sorted("/".join(p) for p in expected - used)
        raise ValueError(f"layout does not match model {model!r}: unmapped tensors {missing}")
    return out


def reference_order(
    layout: tuple[LeafInfo, ...], model: str, params_only: bool = False
) -> np.ndarray:
    """The reference's flattening of a model, as indices into our flat vector.

    `flat[reference_order(layout, model)]` is the PyTorch `state_dict()` of the reference
    model flattened entry by entry (`torch.cat([t.flatten() for t in sd.values()])`), in
    its order and layouts: conv weights OIHW (ours HWIO), linear weights out×in (ours
    in×out). Entries we do not have are left out: ResNet-10's duplicate aliases
    (`_features.*`, `cls.*`, spmc_reference.md §1.3) and the integer `num_batches_tracked`.
    `params_only=True` gives `parameters()` order (no running statistics): the reference's
    "param-flat" vectors (FoolsGold, RLR, RSA).

    A static permutation (numpy, built once per model); works for any width or class count.

    Raises:
      ValueError: `model` has no reference counterpart (accepted: simple_cnn, resnet10),
        or the layout does not match that model.
    """
    entries = _reference_entries(layout, model, params_only)
    return np.concatenate([idx.ravel() for _, idx in entries]).astype(np.int64)


def reference_names(
    layout: tuple[LeafInfo, ...], model: str, params_only: bool = False
) -> tuple[str, ...]:
    """The PyTorch state_dict keys of `reference_order`'s entries, in order."""
    return tuple(name for name, _ in _reference_entries(layout, model, params_only))
