"""A small MLP, for fast tests and quick experiments (not in the paper)."""

from __future__ import annotations

import flax.linen as nn
import jax

from spmc_jax.models.layers import Dense


class MLP(nn.Module):
    """Flatten → Dense(hidden) → ReLU → Dense(num_classes)."""

    num_classes: int = 10
    hidden: int = 64
    conv_impl: str = "lax"  # accepted for a uniform constructor; unused

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, penultimate: bool = False) -> jax.Array:
        del train
        x = x.reshape(x.shape[0], -1)
        h = nn.relu(Dense(self.hidden, name="hidden")(x))
        return h if penultimate else Dense(self.num_classes, name="out")(h)

    def features(self, x: jax.Array) -> jax.Array:
        """Penultimate-layer representation (B, hidden): the input of the classifier layer."""
        return self(x, train=False, penultimate=True)
