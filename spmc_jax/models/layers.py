"""Conv / Dense layers with PyTorch's default initialisation and a vmap-friendly conv.

PyTorch initialises Conv2d/Linear weights with kaiming_uniform(a=√5) and biases with
U(−1/√fan_in, 1/√fan_in); both reduce to U(−1/√fan_in, 1/√fan_in). We match that so the
reference's training dynamics (lr 0.01, no warm-up) carry over.

`conv_impl`:
  * "lax": `lax.conv_general_dilated` (fastest for one model on GPU).
  * "patches": im2col as kh·kw shifted slices, then one matmul. Numerically the same
    contraction (up to float32 summation order); under `vmap` over clients it lowers to a
    batched matmul instead of a grouped convolution, which XLA:CPU runs far faster.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

CONV_IMPLS = ("lax", "patches")


def torch_uniform(fan_in: int):
    """U(−1/√fan_in, 1/√fan_in) initializer (PyTorch's default for weights and biases)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    stride: int = 1,
    padding: int = 0,
    impl: str = "lax",
) -> jax.Array:
    """2-D convolution, NHWC input, HWIO kernel (cross-correlation, like PyTorch)."""
    if impl == "lax":
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(stride, stride),
            padding=[(padding, padding), (padding, padding)],
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
    if impl != "patches":
        raise ValueError(f"conv_impl={impl!r}; accepted: {CONV_IMPLS}")
    kh, kw, cin, cout = kernel.shape
    if padding:
        x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    _, h, w, _ = x.shape
    oh = (h - kh) // stride + 1
    ow = (w - kw) // stride + 1
    if kh == kw == 1:
        cols = x[:, : (oh - 1) * stride + 1 : stride, : (ow - 1) * stride + 1 : stride, :]
        return cols @ kernel.reshape(cin, cout)
    # (B, oh, ow, kh*kw*cin) in HWI order, matching kernel.reshape(kh*kw*cin, cout).
    cols = jnp.concatenate(
        [
            x[:, i : i + (oh - 1) * stride + 1 : stride, j : j + (ow - 1) * stride + 1 : stride, :]
            for i in range(kh)
            for j in range(kw)
        ],
        axis=-1,
    )
    return cols @ kernel.reshape(kh * kw * cin, cout)


class Conv(nn.Module):
    """Conv2d with PyTorch init; NHWC."""

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    use_bias: bool = True
    impl: str = "lax"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cin = x.shape[-1]
        fan_in = cin * self.kernel_size**2
        k = self.param(
            "kernel",
            torch_uniform(fan_in),
            (self.kernel_size, self.kernel_size, cin, self.features),
        )
        y = conv2d(x, k, self.stride, self.padding, self.impl)
        if self.use_bias:
            y = y + self.param("bias", torch_uniform(fan_in), (self.features,))
        return y


class Dense(nn.Module):
    """Linear layer with PyTorch init."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = x.shape[-1]
        k = self.param("kernel", torch_uniform(fan_in), (fan_in, self.features))
        b = self.param("bias", torch_uniform(fan_in), (self.features,))
        return x @ k + b


def max_pool(x: jax.Array, window: int = 2) -> jax.Array:
    """Non-overlapping max pooling (PyTorch MaxPool2d(2))."""
    return nn.max_pool(x, (window, window), strides=(window, window))


def flatten_chw(x: jax.Array) -> jax.Array:
    """Flatten NHWC features in PyTorch's (C, H, W) order, so fc1's rows mean the same."""
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
