"""SimpleCNN of the SPMC reference (`RF/Backbones/SimpleCNN.py`, spmc_reference.md §1.3).

3×32×32 → conv5(6) → ReLU → maxpool2 → conv5(16) → ReLU → maxpool2 → flatten(400) →
fc1 120 → ReLU → fc2 84 → ReLU → l1 84 → ReLU → l2 256 (no activation) → cls 10.
92,626 parameters, no BatchNorm.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from spmc_jax.models.layers import Conv, Dense, flatten_chw, max_pool


class SimpleCNN(nn.Module):
    """The reference SimpleCNN (LeNet-5 trunk plus an 84→84→256 head)."""

    num_classes: int = 10
    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, penultimate: bool = False) -> jax.Array:
        del train  # no dropout / BatchNorm
        x = max_pool(nn.relu(Conv(6, 5, impl=self.conv_impl, name="conv1")(x)))
        x = max_pool(nn.relu(Conv(16, 5, impl=self.conv_impl, name="conv2")(x)))
        x = flatten_chw(x)
        x = nn.relu(Dense(120, name="fc1")(x))
        x = nn.relu(Dense(84, name="fc2")(x))
        x = nn.relu(Dense(84, name="l1")(x))
        x = Dense(256, name="l2")(x)
        return x if penultimate else Dense(self.num_classes, name="cls")(x)

    def features(self, x: jax.Array) -> jax.Array:
        """Penultimate-layer representation (B, 256): the input of the classifier layer."""
        return self(x, train=False, penultimate=True)
