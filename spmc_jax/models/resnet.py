"""CIFAR-style ResNet-10 of the SPMC reference (`RF/Backbones/ResNet.py`, §1.3).

stem conv3×3(64) → BN → ReLU; four BasicBlocks (64, 128, 256, 512; strides 1, 2, 2, 2;
projection shortcut conv1×1 + BN when the shape changes); global average pool; Linear 10.
BatchNorm as PyTorch's defaults (momentum 0.1 ⇒ flax momentum 0.9, eps 1e-5). Running
statistics live in the `batch_stats` collection: part of each client's state, flattened
with the parameters and aggregated by the server, as in the reference.

Difference: PyTorch updates the running variance with the unbiased batch variance, flax
with the biased one (factor B/(B−1) = 64/63 on the update term); evaluation differences are
negligible and documented here rather than hand-writing BatchNorm.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from spmc_jax.models.layers import Conv, Dense


def _bn(train: bool, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


class BasicBlock(nn.Module):
    """conv3×3(s) → BN → ReLU → conv3×3 → BN → + shortcut → ReLU."""

    features: int
    stride: int
    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = Conv(
            self.features, 3, self.stride, 1, use_bias=False, impl=self.conv_impl, name="conv1"
        )(x)
        y = nn.relu(_bn(train, "bn1")(y))
        y = Conv(self.features, 3, 1, 1, use_bias=False, impl=self.conv_impl, name="conv2")(y)
        y = _bn(train, "bn2")(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = Conv(
                self.features,
                1,
                self.stride,
                0,
                use_bias=False,
                impl=self.conv_impl,
                name="shortcut_conv",
            )(x)
            x = _bn(train, "shortcut_bn")(x)
        return nn.relu(y + x)


class ResNet10(nn.Module):
    """ResNet-10 ([1, 1, 1, 1] BasicBlocks, nf = 64), CIFAR stem without max-pool."""

    num_classes: int = 10
    conv_impl: str = "lax"
    width: int = 64

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, penultimate: bool = False) -> jax.Array:
        w = self.width
        x = Conv(w, 3, 1, 1, use_bias=False, impl=self.conv_impl, name="stem")(x)
        x = nn.relu(_bn(train, "stem_bn")(x))
        for i, (f, s) in enumerate(((w, 1), (2 * w, 2), (4 * w, 2), (8 * w, 2))):
            x = BasicBlock(f, s, self.conv_impl, name=f"layer{i + 1}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return x if penultimate else Dense(self.num_classes, name="linear")(x)

    def features(self, x: jax.Array) -> jax.Array:
        """Penultimate-layer representation (B, 8·width): the pooled input of the classifier
        (eval mode: BatchNorm on running statistics)."""
        return self(x, train=False, penultimate=True)
