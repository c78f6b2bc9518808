"""In-jit data pipeline: the reference's torchvision transforms as pure JAX on uint8 batches.

Reference transforms (spmc_reference.md §1.2):

- (F)MNIST train: Resize 28->32 (PIL bilinear) -> RandomCrop 32, zero padding 4 -> ToTensor
  (/255) -> repeat to 3 channels -> Normalize. Test: the same without the crop.
- CIFAR-10 train: RandomCrop 32, zero padding 4 -> RandomHorizontalFlip(0.5) -> ToTensor ->
  Normalize. Test: ToTensor -> Normalize.

Every function here is shape-static, jittable and vmappable (the engine vmaps the transform over
clients inside `lax.scan`). Images are NHWC. Geometry (resize, crop, flip) runs on uint8/int32
pixels, where torchvision runs it on the PIL image, so padding is 0 in pixel space and the resize
rounds to uint8 as PIL does; conversion to float happens once at the end.

The resize is deterministic and comes before any randomness, so callers may also apply
`pil_bilinear_resize` once to a whole dataset and feed 32x32 images: the transforms skip the
resize when the input is already 32x32 (PIL returns a copy for a same-size resize).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from spmc_jax.data.types import DATASETS

__all__ = [
    "OUT_SIZE",
    "PAD",
    "channel_replicate",
    "make_test_transform",
    "make_train_transform",
    "normalize",
    "pil_bilinear_coeffs",
    "pil_bilinear_resize",
    "random_crop",
    "random_hflip",
]

OUT_SIZE = 32  # every dataset becomes 32x32x3 (types.INPUT_SHAPE)
PAD = 4  # RandomCrop(32, padding=4)

# Pillow's 8-bit resampling works in fixed point with this many fractional bits
# (libImaging/Resample.c: PRECISION_BITS = 32 - 8 - 2).
_PRECISION_BITS = 22


@functools.lru_cache(maxsize=32)
def pil_bilinear_coeffs(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Tap indices and fixed-point weights of Pillow's bilinear resampling along one axis.

    Restates Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` (libImaging/Resample.c) for
    the triangle filter ``f(t) = max(0, 1 - |t|)``, support 1: with ``scale = in/out`` and
    ``fs = max(scale, 1)``, output pixel ``o`` has center ``c = (o + 0.5) * scale``, taps
    ``i`` in ``[int(c - fs + 0.5), int(c + fs + 0.5))`` clipped to the image, raw weights
    ``f((i - c + 0.5) / fs)`` normalised to sum 1, then stored as ``int(0.5 + w * 2**22)``.
    Python floats are IEEE doubles like the C code, so the integers are identical.

    Args:
      in_size: input length along the axis.
      out_size: output length.

    Returns:
      ``(index, weight)``, both (out_size, ksize) int32; unused taps have weight 0 and a
      valid (clipped) index.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be >= 1, got in_size={in_size}, out_size={out_size}")
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    ksize = math.ceil(support) * 2 + 1
    inv = 1.0 / filterscale  # Pillow multiplies by the reciprocal; keep its rounding
    index = np.zeros((out_size, ksize), dtype=np.int32)
    weight = np.zeros((out_size, ksize), dtype=np.int32)
    for o in range(out_size):
        center = (o + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        raw = [max(0.0, 1.0 - abs((x + xmin - center + 0.5) * inv)) for x in range(xmax)]
        total = sum(raw)
        for x, w in enumerate(raw):
            w = w / total if total != 0.0 else w
            weight[o, x] = int(0.5 + w * (1 << _PRECISION_BITS))
        index[o, :] = np.minimum(xmin + np.arange(ksize), in_size - 1)
    return index, weight


def _resample_axis(x: jax.Array, in_size: int, out_size: int, axis: int) -> jax.Array:
    """One Pillow resampling pass along `axis` of an int32 array; returns values in [0, 255]."""
    index, weight = pil_bilinear_coeffs(in_size, out_size)
    shape = [1] * x.ndim
    shape[axis] = out_size
    # Rounding offset, then integer multiply-add; 255 * 2**22 fits int32 as in Pillow.
    acc = jnp.full((), 1 << (_PRECISION_BITS - 1), dtype=jnp.int32)
    for t in range(index.shape[1]):
        w = jnp.asarray(weight[:, t].reshape(shape))
        acc = acc + jnp.take(x, jnp.asarray(index[:, t]), axis=axis) * w
    return jnp.clip(jnp.right_shift(acc, _PRECISION_BITS), 0, 255)


def pil_bilinear_resize(x: jax.Array, size: tuple[int, int] = (OUT_SIZE, OUT_SIZE)) -> jax.Array:
    """Resize uint8 NHWC images as Pillow's bilinear ``resize`` of an 'L' image.

    This is torchvision's ``Resize((h, w))`` on a PIL image (``img.resize((w, h), BILINEAR)``).
    Pillow resamples in fixed point, one axis at a time, rounding the intermediate to uint8; we
    do the same in int32, horizontal pass first. For 28x28 -> 32x32 (and any enlargement, or a
    single-axis resize) the result is bit-identical to Pillow (tested on random images and on
    all 60 000 MNIST training images). Newer Pillow releases may run the vertical pass first for
    2-D reductions, which can move the intermediate rounding by one gray level. A same-size
    resize is the identity.

    Args:
      x: (..., H, W, C) uint8.
      size: output (height, width).

    Returns:
      (..., size[0], size[1], C) uint8.
    """
    if x.ndim < 3:
        raise ValueError(f"expected (..., H, W, C) images, got shape {x.shape}")
    h, w = x.shape[-3], x.shape[-2]
    out_h, out_w = size
    if (h, w) == (out_h, out_w):
        return x
    y = x.astype(jnp.int32)
    if w != out_w:
        y = _resample_axis(y, w, out_w, axis=x.ndim - 2)
    if h != out_h:
        y = _resample_axis(y, h, out_h, axis=x.ndim - 3)
    return y.astype(jnp.uint8)


def random_crop(key: jax.Array, x: jax.Array, size: int = OUT_SIZE, pad: int = PAD) -> jax.Array:
    """torchvision ``RandomCrop(size, padding=pad)`` (fill 0), independently per sample.

    Pads each image with ``pad`` zero pixels on every side, then takes the ``size x size``
    window at offsets ``(i, j)`` drawn uniformly from ``{0, .., H + 2 pad - size}`` (and the
    same for W), per sample. Implemented as a vmapped `lax.dynamic_slice` (one gather).

    Args:
      key: PRNG key.
      x: (B, H, W, C) images, any dtype (pad value 0).
      size: crop size.
      pad: zero padding per side.

    Returns:
      (B, size, size, C), same dtype.
    """
    b, h, w, c = x.shape
    if h + 2 * pad < size or w + 2 * pad < size:
        raise ValueError(f"crop {size} larger than padded image {(h + 2 * pad, w + 2 * pad)}")
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    k_row, k_col = jax.random.split(key)
    rows = jax.random.randint(k_row, (b,), 0, h + 2 * pad - size + 1)
    cols = jax.random.randint(k_col, (b,), 0, w + 2 * pad - size + 1)
    crop = lambda img, i, j: lax.dynamic_slice(img, (i, j, 0), (size, size, c))
    return jax.vmap(crop)(padded, rows, cols)


def random_hflip(key: jax.Array, x: jax.Array, p: float = 0.5) -> jax.Array:
    """torchvision ``RandomHorizontalFlip(p)``: mirror each sample's width axis w.p. ``p``."""
    flip = jax.random.bernoulli(key, p, (x.shape[0],))
    return jnp.where(flip[:, None, None, None], x[:, :, ::-1, :], x)


def channel_replicate(x: jax.Array, channels: int = 3) -> jax.Array:
    """Repeat a single channel (``tensor.repeat(3, 1, 1)`` in the reference), NHWC."""
    if x.shape[-1] != 1:
        raise ValueError(f"expected 1 channel to replicate, got shape {x.shape}")
    return jnp.broadcast_to(x, (*x.shape[:-1], channels))


def _as_channel_vector(values: Sequence[float], name: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float32).reshape(-1)
    if v.size not in (1, 3):
        raise ValueError(f"{name} must have 1 or 3 entries, got {values!r}")
    return v


def normalize(x01: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """torchvision ``Normalize``: ``(x - mean_c) / std_c`` per channel, in float32.

    Args:
      x01: (..., C) float images in [0, 1] (after ToTensor's /255).
      mean, std: per-channel constants (1 or C entries); std must be > 0.
    """
    m = _as_channel_vector(mean, "mean")
    s = _as_channel_vector(std, "std")
    if np.any(s <= 0):
        raise ValueError(f"std must be > 0, got {std!r}")
    return (x01.astype(jnp.float32) - m) / s


def _to_tensor(x_uint8: jax.Array) -> jax.Array:
    """torchvision ``ToTensor`` on uint8 pixels: float32 ``x / 255``."""
    return x_uint8.astype(jnp.float32) / 255.0


def _check_kind(kind: str) -> None:
    if kind not in DATASETS:
        raise ValueError(f"unknown dataset kind {kind!r}; accepted: {DATASETS}")


def _check_batch(kind: str, x: jax.Array) -> None:
    """Static shape/dtype checks (run at trace time)."""
    if x.ndim != 4 or x.dtype != jnp.uint8:
        raise ValueError(f"expected uint8 (B, H, W, C) images, got {x.dtype} {x.shape}")
    if kind == "cifar10":
        if x.shape[1:] != (OUT_SIZE, OUT_SIZE, 3):
            raise ValueError(f"cifar10 images must be (B, 32, 32, 3), got {x.shape}")
    elif x.shape[-1] != 1:
        raise ValueError(f"{kind} images must have 1 channel (B, H, W, 1), got {x.shape}")


def make_train_transform(
    kind: str, mean: Sequence[float], std: Sequence[float], flip: bool
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Build the reference training transform ``fn(key, x_uint8[B,h,w,c]) -> f32[B,32,32,3]``.

    (F)MNIST: PIL-bilinear resize to 32x32 (skipped if already 32x32) -> random crop 32 with
    zero padding 4 -> /255 -> 3 channels -> normalise. CIFAR-10: random crop -> horizontal flip
    (if ``flip``) -> /255 -> normalise. Crop offsets are uniform in ``{0..8}`` per axis and the
    flip is Bernoulli(0.5), independently per sample. ``flip`` is honoured for every kind
    (the reference flips CIFAR-10 only; see `types.FLIP`).

    Args:
      kind: one of `types.DATASETS`.
      mean, std: per-channel normalisation constants (`types.MEAN[kind]`, `types.STD[kind]`).
      flip: apply the random horizontal flip.

    Returns:
      A pure function, jittable and vmappable (e.g. over a leading client axis).
    """
    _check_kind(kind)
    normalize(jnp.zeros((1, 1, 1, 3)), mean, std)  # validate the constants eagerly

    def transform(key: jax.Array, x: jax.Array) -> jax.Array:
        _check_batch(kind, x)
        k_crop, k_flip = jax.random.split(key)
        if kind != "cifar10":
            x = pil_bilinear_resize(x)
        x = random_crop(k_crop, x)
        if flip:
            x = random_hflip(k_flip, x)
        x = _to_tensor(x)
        if x.shape[-1] == 1:
            x = channel_replicate(x)
        return normalize(x, mean, std)

    return transform


def make_test_transform(
    kind: str, mean: Sequence[float], std: Sequence[float]
) -> Callable[[jax.Array], jax.Array]:
    """Build the reference test transform ``fn(x_uint8[B,h,w,c]) -> f32[B,32,32,3]``.

    (F)MNIST: resize to 32x32 -> /255 -> 3 channels -> normalise. CIFAR-10: /255 -> normalise.
    No randomness.
    """
    _check_kind(kind)
    normalize(jnp.zeros((1, 1, 1, 3)), mean, std)

    def transform(x: jax.Array) -> jax.Array:
        _check_batch(kind, x)
        if kind != "cifar10":
            x = pil_bilinear_resize(x)
        x = _to_tensor(x)
        if x.shape[-1] == 1:
            x = channel_replicate(x)
        return normalize(x, mean, std)

    return transform
