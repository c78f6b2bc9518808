"""Conv / Dense layers with PyTorch's default initialisation and a vmap-friendly conv.

PyTorch initialises Conv2d/Linear weights with kaiming_uniform(a=√5) and biases with
U(−1/√fan_in, 1/√fan_in); both reduce to U(−1/√fan_in, 1/√fan_in). We match that so the
reference's training dynamics (lr 0.01, no warm-up) carry over.

`conv_impl`:
  * "lax": `lax.conv_general_dilated` (fastest for one model on GPU).
  * "patches": row-wise im2col (the kw shifted column slices concatenated on the channel
    axis), then one matmul per kernel row, summed. Numerically the same contraction (up to
    float32 summation order); under `vmap` over clients it lowers to batched matmuls instead
    of a grouped convolution, and XLA:CPU runs it inside `lax.scan` at full speed (its
    `lax.conv` runs ~10× slower in a while-loop body). Row-wise rather than full im2col:
    XLA:CPU copies a last-axis concatenate in C-element pieces, and the full kh·kw-way
    concatenate was the slowest op of the whole client step (benchmarks/RESULTS.md). Inputs
    of ≤ 3 channels (the RGB stem) take the full im2col instead, built channel-first (at
    stride 1 from contiguous slices of the flattened images, `_flat_stem_conv`): their
    row-wise matmuls (K = 15) were too thin (issue 14); they run over blocks of
    `IM2COL_BATCH_BLOCK` images, so the buffer stays in cache.

An input of 2-3 channels that are all equal (grayscale replicated to RGB, as the (F)MNIST
transforms do) takes, through a runtime `lax.cond`, a one-channel convolution with the kernel
summed over its input channels (`FOLD_EQUAL_CHANNELS`): the same value up to float32
summation order, a third of the stem's im2col and matmul work (issue 14, one core: FedAvg
steps 1.47x, SPMC steps 1.33x faster). A batch with any unequal pixel (a channel-0 backdoor
trigger, a colour image) takes the full convolution, bit for bit as without the fold.

`max_pool` is reshape + max with a custom gradient that routes each window's gradient to
its first maximum (row-major), exactly what `reduce_window`'s select-and-scatter and
PyTorch's MaxPool2d do; it runs ~25 % faster than `reduce_window` on CPU.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import custom_batching, lax
from jax.custom_derivatives import SymbolicZero

CONV_IMPLS = ("lax", "patches")
# "patches" builds the full im2col (one matmul) when the input has at most this many channels.
FULL_IM2COL_MAX_CIN = 3
# A full-im2col convolution (input of <= FULL_IM2COL_MAX_CIN channels) runs over blocks of
# this many images (when it divides the batch), so one block's buffer (conv1 at batch 64:
# 15 MB whole, 1.9 MB per 8 images) stays in cache; the backward pass recomputes each block's
# im2col instead of storing it. None: one block. Issue 14: 1.22x less CPU time per FedAvg
# step. Row-wise convolutions are not blocked: their buffer is kw times smaller, and a
# sequential loop of small matmuls made conv2 slower (1.2x faster steps without it).
IM2COL_BATCH_BLOCK: int | None = 8
# "patches" convolves a 2-3 channel input whose channels are all equal as one channel with the
# kernel summed over its input channels (module docstring). False: always the full input.
FOLD_EQUAL_CHANNELS = True


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
    if FOLD_EQUAL_CHANNELS and 1 < x.shape[-1] <= FULL_IM2COL_MAX_CIN:
        equal = _in_every_lane(jnp.all(x == x[..., :1]))
        return lax.cond(
            equal,
            lambda x, k: _equal_channels_conv(x, k, stride, padding),
            lambda x, k: _blocked_patches_conv(x, k, stride, padding),
            x,
            kernel,
        )
    return _blocked_patches_conv(x, kernel, stride, padding)


def _blocked_patches_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """The "patches" convolution, over batch blocks where the full im2col applies."""
    b, blk = x.shape[0], IM2COL_BATCH_BLOCK
    full = x.shape[-1] <= FULL_IM2COL_MAX_CIN
    if full and blk is not None and b > blk and b % blk == 0:
        one = jax.checkpoint(lambda xb: _patches_conv(xb, kernel, stride, padding))
        y = jax.lax.map(one, x.reshape(b // blk, blk, *x.shape[1:]))
        return y.reshape(b, *y.shape[2:])
    return _patches_conv(x, kernel, stride, padding)


@custom_batching.custom_vmap
def _in_every_lane(flag: jax.Array) -> jax.Array:
    """`flag` (a bool scalar); under `vmap`, one unbatched bool: whether it holds in every lane.

    Keeps the fold's `lax.cond` a real branch when clients (or federations) are vmapped: a
    batched predicate would turn it into a select that computes both convolutions. Every
    lane then takes the fold, or none does; both are exact.
    """
    return flag


@_in_every_lane.def_vmap
def _in_every_lane_vmap(
    axis_size: int, in_batched: list[bool], flag: jax.Array
) -> tuple[jax.Array, bool]:
    del axis_size
    return (jnp.all(flag) if in_batched[0] else flag), False


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _equal_channels_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """`conv2d` of an input whose channels are all equal: Σ_c x_c ⋆ k_c = x_0 ⋆ (Σ_c k_c).

    The kernel's gradient follows by autodiff (Σ_c's transpose hands each input channel the
    folded kernel's gradient, which is exact because the channels are equal). The input's
    must not be the folded map's (that would put all of it on channel 0): the custom JVP gives
    the full convolution's tangent in x, so input gradients (trigger optimisation, Hessian-
    vector products) stay exact, and computes it only when x carries a tangent.
    """
    return _blocked_patches_conv(x[..., :1], kernel.sum(axis=2, keepdims=True), stride, padding)


def _equal_channels_conv_jvp(stride: int, padding: int, primals, tangents):
    x, kernel = primals
    dx, dk = tangents
    y = _equal_channels_conv(x, kernel, stride, padding)
    dy = None
    if not isinstance(dk, SymbolicZero):
        dy = _equal_channels_conv(x, dk, stride, padding)
    if not isinstance(dx, SymbolicZero):
        term = _blocked_patches_conv(dx, kernel, stride, padding)
        dy = term if dy is None else dy + term
    return y, (jnp.zeros_like(y) if dy is None else dy)


_equal_channels_conv.defjvp(_equal_channels_conv_jvp, symbolic_zeros=True)


def _patches_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """The "patches" convolution of one batch block (see the module docstring)."""
    kh, kw, cin, cout = kernel.shape
    if padding:
        x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    _, h, w, _ = x.shape
    oh = (h - kh) // stride + 1
    ow = (w - kw) // stride + 1
    span_h, span_w = (oh - 1) * stride + 1, (ow - 1) * stride + 1
    # (B, h, ow, kw*cin) in (kw, cin) order, matching kernel[i].reshape(kw*cin, cout). Stacked
    # on a new axis and reshaped rather than concatenated on the last axis: the same values in
    # the same order, ~10 % faster on XLA:CPU (benchmarks/RESULTS.md, issue 14).
    b = x.shape[0]
    if cin <= FULL_IM2COL_MAX_CIN:
        # Few input channels (the RGB stem): a K = kw·cin matmul per kernel row is too thin;
        # one full-im2col matmul (K = cin·kh·kw, PyTorch's order) is faster. Built channel-
        # first, (K, pixels), so each window is copied as whole rows of one channel, not in
        # cin-float pieces (1.13-1.22x faster FedAvg steps, issue 14).
        xc = jnp.transpose(x, (3, 0, 1, 2))
        k_t = jnp.transpose(kernel, (3, 2, 0, 1)).reshape(cout, cin * kh * kw)
        if stride == 1:
            return _flat_stem_conv(xc, k_t, kh, kw)
        windows = [
            xc[:, :, i : i + span_h : stride, j : j + span_w : stride]
            for i in range(kh)
            for j in range(kw)
        ]
        cols_t = jnp.stack(windows, axis=1).reshape(cin * kh * kw, b * oh * ow)
        return (k_t @ cols_t).reshape(cout, b, oh, ow).transpose(1, 2, 3, 0)
    cols = jnp.stack([x[:, :, j : j + span_w : stride, :] for j in range(kw)], axis=-2)
    cols = cols.reshape(b, h, ow, kw * cin)
    out = None
    for i in range(kh):
        term = cols[:, i : i + span_h : stride] @ kernel[i].reshape(kw * cin, cout)
        out = term if out is None else out + term
    assert out is not None
    return out


def _flat_stem_conv(xc: jax.Array, k_t: jax.Array, kh: int, kw: int) -> jax.Array:
    """Stride-1 full-im2col convolution of channel-first ``xc`` (C, B, h, w) -> NHWC.

    With each image flattened to h·w pixels, window (i, j) of output pixel (r, c) is pixel
    ``(r·w + c) + (i·w + j)``: on an output grid as wide as the input (c < w, the last
    w − ow columns are discarded), every window is one contiguous slice of the flat image.
    The kh·kw slices are taken as a kw-way stack (shifts of the whole image) and a kh-way
    stack of row offsets of those: XLA:CPU turns one kh·kw-way stack into as many separate
    copies (issue 14: conv1's forward + kernel gradient 1.7x faster than from the 25-window
    stack). The discarded columns cost (w − ow)/ow more matmul work and add exact zeros to
    the kernel gradient.
    """
    cin, b, h, w = xc.shape
    cout = k_t.shape[0]
    oh, ow = h - kh + 1, w - kw + 1
    # kw - 1 zeros after the last pixel: only discarded columns of the last rows read them.
    flat = jnp.pad(xc.reshape(cin, b, h * w), ((0, 0), (0, 0), (0, kw - 1)))
    shifted = jnp.stack([flat[:, :, j : j + h * w] for j in range(kw)], axis=1)
    cols = jnp.stack([shifted[..., i * w : (i + oh) * w] for i in range(kh)], axis=1)
    y = k_t @ cols.reshape(cin * kh * kw, b * oh * w)  # K in (cin, kh, kw) order
    return y.reshape(cout, b, oh, w)[..., :ow].transpose(1, 2, 3, 0)


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
    """Non-overlapping max pooling (PyTorch MaxPool2d(window): floor, no padding), NHWC.

    The gradient goes to each window's first maximum in row-major order (PyTorch's and
    `reduce_window`'s convention); plain `jnp.max` would split it among ties, which matter
    here: zero-padded crop borders give equal activations over whole windows.
    """
    _, h, w, _ = x.shape
    oh, ow = h // window, w // window
    if (oh * window, ow * window) != (h, w):
        x = x[:, : oh * window, : ow * window]
    return _window_max(x, window)


def _windows(x: jax.Array, window: int) -> jax.Array:
    """(B, H, W, C) → (B, H/w, W/w, w·w, C), window elements in row-major order."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // window, w // window, window**2, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _window_max(x: jax.Array, window: int) -> jax.Array:
    b, h, w, c = x.shape
    return x.reshape(b, h // window, window, w // window, window, c).max(axis=(2, 4))


def _window_max_fwd(x: jax.Array, window: int):
    return _window_max(x, window), x


def _window_max_bwd(window: int, x: jax.Array, g: jax.Array):
    b, h, w, c = x.shape
    first = jnp.argmax(_windows(x, window), axis=3)  # (B, H/w, W/w, C)
    hit = jnp.arange(window**2)[:, None] == first[:, :, :, None, :]
    dx = jnp.where(hit, g[:, :, :, None, :], jnp.zeros((), g.dtype))
    dx = dx.reshape(b, h // window, w // window, window, window, c)
    return (dx.transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c),)


_window_max.defvjp(_window_max_fwd, _window_max_bwd)


def flatten_chw(x: jax.Array) -> jax.Array:
    """Flatten NHWC features in PyTorch's (C, H, W) order, so fc1's rows mean the same."""
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
