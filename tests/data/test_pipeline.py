"""Tests for spmc_jax.data.pipeline: Pillow-exact resize, crop/flip, normalisation, jit/vmap."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmc_jax.data.pipeline import (
    channel_replicate,
    make_test_transform,
    make_train_transform,
    normalize,
    pil_bilinear_resize,
    random_crop,
    random_hflip,
)
from spmc_jax.data.types import FLIP, MEAN, STD

Image = pytest.importorskip("PIL.Image")
ImageDraw = pytest.importorskip("PIL.ImageDraw")
ImageFilter = pytest.importorskip("PIL.ImageFilter")

# float32 result vs float64 oracle: outputs are at most ~3.3 in magnitude and come from two
# float32 roundings (/255, then subtract/divide), so a few ulps of 3.3 (2.4e-7 each) bound the
# error; 2e-6 leaves margin for XLA rewriting the division as a multiply by the reciprocal.
ATOL_NORMALIZE = 2e-6


@functools.cache
def jitted_train(kind: str):
    """One jitted train transform per kind, shared by the tests (CPU compiles are the cost)."""
    return jax.jit(make_train_transform(kind, MEAN[kind], STD[kind], FLIP[kind]))


@functools.cache
def jitted_test(kind: str):
    return jax.jit(make_test_transform(kind, MEAN[kind], STD[kind]))


resize_jit = jax.jit(pil_bilinear_resize, static_argnums=1)


def pil_resize(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Oracle: Pillow's bilinear resize of each (H, W, 1) uint8 image, as torchvision does it."""
    out = [
        np.asarray(Image.fromarray(im[..., 0], mode="L").resize(size[::-1], Image.BILINEAR))
        for im in images
    ]
    return np.stack(out)[..., None]


def digit_like_images(n: int, seed: int = 0) -> np.ndarray:
    """MNIST-looking 28x28 images: anti-aliased strokes on black, then a slight blur."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        im = Image.new("L", (28, 28), 0)
        draw = ImageDraw.Draw(im)
        for _ in range(rng.integers(1, 4)):
            pts = [tuple(int(v) for v in rng.integers(4, 24, 2)) for _ in range(3)]
            draw.line(pts, fill=int(rng.integers(180, 256)), width=int(rng.integers(2, 4)))
        out.append(np.asarray(im.filter(ImageFilter.GaussianBlur(0.7))))
    return np.stack(out)[..., None]


def mnist_images_if_available() -> np.ndarray | None:
    """The first 200 real MNIST train images (project loader, else the cache file), or None."""
    try:
        from spmc_jax.data.sources import load_dataset

        return np.asarray(load_dataset("mnist", fetch=False, log=lambda *a: None).x_train[:200])
    except Exception:  # missing module/files: fall back to the cache file
        pass
    cache = Path.home() / ".cache" / "spmc_jax" / "mnist.npz"
    if not cache.exists():
        return None
    with np.load(cache) as f:
        x = np.asarray(f["x_train"][:200])
    return x.reshape(-1, 28, 28, 1).astype(np.uint8)


@pytest.mark.parametrize("source", ["uniform", "digits", "extremes", "mnist"])
def test_resize_28_to_32_matches_pillow_exactly(source):
    """Measured: max |ours - Pillow| = 0 gray levels on every source (tolerance: exact)."""
    rng = np.random.default_rng(1)
    if source == "uniform":
        x = rng.integers(0, 256, (200, 28, 28, 1), dtype=np.uint8)
    elif source == "digits":
        x = digit_like_images(200)
    elif source == "extremes":  # saturated 0/255 patterns stress the rounding and the clip
        x = (rng.integers(0, 2, (200, 28, 28, 1)) * 255).astype(np.uint8)
    else:
        x = mnist_images_if_available()
        if x is None:
            pytest.skip("MNIST not available locally")
    ours = np.asarray(resize_jit(jnp.asarray(x), (32, 32)))
    assert ours.dtype == np.uint8 and ours.shape == (len(x), 32, 32, 1)
    np.testing.assert_array_equal(ours, pil_resize(x, (32, 32)))


@pytest.mark.parametrize(
    ("hw", "out"), [((7, 9), (32, 5)), ((40, 30), (17, 23)), ((1, 50), (1, 13))]
)
def test_resize_other_sizes_close_to_pillow(hw, out):
    """General sizes: one pass at a time is exact; 2-D reductions may differ by 1 gray level.

    We always resample horizontally first (as Pillow did for years); newer Pillow releases
    may run the vertical pass first when that is cheaper, which moves the uint8 rounding of the
    intermediate image. Tolerance: 1 gray level. The project only relies on the 28->32 case,
    tested exactly above.
    """
    x = np.random.default_rng(2).integers(0, 256, (40, *hw, 1), dtype=np.uint8)
    ours = np.asarray(resize_jit(jnp.asarray(x), out)).astype(int)
    assert np.abs(ours - pil_resize(x, out)).max() <= 1


def test_resize_identity_and_constant():
    x = np.random.default_rng(3).integers(0, 256, (4, 32, 32, 1), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(pil_bilinear_resize(jnp.asarray(x))), x)
    const = jnp.full((200, 28, 28, 1), 137, dtype=jnp.uint8)
    assert np.all(np.asarray(resize_jit(const, (32, 32))) == 137)


def oracle_test_transform(kind: str, x: np.ndarray) -> np.ndarray:
    """float64 reference: (Pillow resize) -> /255 -> replicate -> (x - mean) / std."""
    if kind != "cifar10":
        x = pil_resize(x, (32, 32))
    v = x.astype(np.float64) / 255.0
    if v.shape[-1] == 1:
        v = np.repeat(v, 3, axis=-1)
    return (v - np.asarray(MEAN[kind], np.float64)) / np.asarray(STD[kind], np.float64)


@pytest.mark.parametrize("kind", ["mnist", "fashion_mnist", "cifar10"])
def test_test_transform_matches_float64_oracle(kind):
    shape = (16, 32, 32, 3) if kind == "cifar10" else (16, 28, 28, 1)
    x = np.random.default_rng(4).integers(0, 256, shape, dtype=np.uint8)
    x[0] = 0
    x[1] = 255  # the extremes of the normalised range
    fn = jitted_test(kind)
    out = fn(jnp.asarray(x))
    assert out.dtype == jnp.float32 and out.shape == (16, 32, 32, 3)
    np.testing.assert_allclose(
        np.asarray(out), oracle_test_transform(kind, x), rtol=0, atol=ATOL_NORMALIZE
    )
    np.testing.assert_array_equal(np.asarray(fn(jnp.asarray(x))), np.asarray(out))  # deterministic


def test_normalize_constants():
    mean, std = MEAN["cifar10"], STD["cifar10"]
    out = np.asarray(normalize(jnp.array([[[[0.0] * 3, [1.0] * 3]]]), mean, std))[0, 0]
    expected = np.array(
        [
            [-m / s for m, s in zip(mean, std, strict=True)],
            [(1 - m) / s for m, s in zip(mean, std, strict=True)],
        ]
    )
    np.testing.assert_allclose(out, expected, rtol=0, atol=ATOL_NORMALIZE)
    with pytest.raises(ValueError, match="std"):
        normalize(jnp.zeros((1, 3)), mean, (0.1, 0.0, 0.2))
    with pytest.raises(ValueError, match="mean"):
        normalize(jnp.zeros((1, 3)), (0.1, 0.2), std)
    x = jnp.arange(6, dtype=jnp.float32).reshape(1, 2, 3, 1)
    rep = channel_replicate(x)
    assert rep.shape == (1, 2, 3, 3) and np.all(np.asarray(rep) == np.asarray(x))


def windows(padded: np.ndarray, size: int = 32) -> np.ndarray:
    """All size x size windows of one (H, W, C) image: (n_i, n_j, size, size, C)."""
    h, w = padded.shape[:2]
    return np.stack(
        [
            np.stack([padded[i : i + size, j : j + size] for j in range(w - size + 1)])
            for i in range(h - size + 1)
        ]
    )


def match_window(img: np.ndarray, padded: np.ndarray) -> list[tuple[int, int]]:
    """Offsets (i, j) at which `img` equals a window of `padded`."""
    eq = np.all(windows(padded) == img, axis=(2, 3, 4))
    return [tuple(int(v) for v in ij) for ij in np.argwhere(eq)]


def test_random_crop_is_a_window_of_the_zero_padded_image():
    # Distinct random pixels make the matching window unique.
    x = np.random.default_rng(5).integers(1, 256, (400, 32, 32, 3), dtype=np.uint8)
    out = np.asarray(jax.jit(random_crop)(jax.random.key(0), jnp.asarray(x)))
    assert out.shape == x.shape and out.dtype == np.uint8
    offsets = []
    for img, src in zip(out, x, strict=True):
        padded = np.pad(src, ((4, 4), (4, 4), (0, 0)))
        found = match_window(img, padded)
        assert len(found) == 1
        offsets.append(found[0])
    offsets = np.array(offsets)
    # Offsets uniform on {0..8}^2, independent per sample: each of the 9 row (and column)
    # values expected 400/9 = 44.4 times; 5 binomial sigmas (~31) make a false alarm
    # impossible in practice for this fixed key, while a constant or biased offset fails.
    for axis in (0, 1):
        counts = np.bincount(offsets[:, axis], minlength=9)
        assert len(counts) == 9 and np.all(np.abs(counts - 400 / 9) < 5 * np.sqrt(400 / 9 * 8 / 9))


def test_random_hflip_statistics():
    x = np.random.default_rng(6).integers(0, 256, (4000, 4, 5, 1), dtype=np.uint8)
    out = np.asarray(jax.jit(random_hflip)(jax.random.key(1), jnp.asarray(x)))
    same = np.all(out == x, axis=(1, 2, 3))
    flipped = np.all(out == x[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(same ^ flipped)  # every sample is either untouched or mirrored
    # Bernoulli(0.5) over 4000 samples: sigma = 0.0079; 5 sigmas = 0.04.
    assert abs(flipped.mean() - 0.5) < 0.04


def denormalize(out: np.ndarray, kind: str) -> np.ndarray:
    """Invert the normalisation back to uint8 pixels (exact after rounding)."""
    pix = (out.astype(np.float64) * np.asarray(STD[kind]) + np.asarray(MEAN[kind])) * 255
    assert np.abs(pix - np.round(pix)).max() < 1e-3
    return np.round(pix).astype(np.uint8)


@pytest.mark.parametrize("kind", ["mnist", "cifar10"])
def test_train_transform_is_crop_flip_of_reference_pixels(kind):
    rng = np.random.default_rng(7)
    shape = (256, 32, 32, 3) if kind == "cifar10" else (256, 28, 28, 1)
    x = rng.integers(1, 256, shape, dtype=np.uint8)
    out = np.asarray(jitted_train(kind)(jax.random.key(2), jnp.asarray(x)))
    assert out.dtype == np.float32 and out.shape == (256, 32, 32, 3)
    pix = denormalize(out, kind)
    base = x if kind == "cifar10" else np.repeat(pil_resize(x, (32, 32)), 3, axis=-1)
    n_flipped = 0
    for img, src in zip(pix, base, strict=True):
        padded = np.pad(src, ((4, 4), (4, 4), (0, 0)))
        plain = match_window(img, padded)
        mirrored = match_window(img[:, ::-1], padded)
        assert len(plain) + len(mirrored) >= 1
        n_flipped += not plain
    if FLIP[kind]:
        assert 0.34 < n_flipped / 256 < 0.66  # Bernoulli(0.5), 256 draws: +-5 sigma
    else:
        assert n_flipped == 0


def test_train_transform_randomness():
    fn = jitted_train("cifar10")
    x = jnp.asarray(np.random.default_rng(8).integers(0, 256, (256, 32, 32, 3), dtype=np.uint8))
    a = np.asarray(fn(jax.random.key(3), x))
    np.testing.assert_array_equal(a, np.asarray(fn(jax.random.key(3), x)))
    assert not np.array_equal(a, np.asarray(fn(jax.random.key(4), x)))
    # Raw uint32 keys work too.
    assert fn(jax.random.PRNGKey(0), x).shape == (256, 32, 32, 3)


def test_train_transform_vmaps_over_clients():
    """vmap over a leading client axis equals a Python loop of the same function."""
    kind = "mnist"
    fn = make_train_transform(kind, MEAN[kind], STD[kind], FLIP[kind])
    single = jitted_train(kind)
    # Per-client batch 256 and the (2, 8) test batch reuse the shapes compiled by other tests.
    x = jnp.asarray(np.random.default_rng(9).integers(0, 256, (3, 256, 28, 28, 1), dtype=np.uint8))
    keys = jax.random.split(jax.random.key(5), 3)
    batched = np.asarray(jax.jit(jax.vmap(fn))(keys, x))
    assert batched.shape == (3, 256, 32, 32, 3)
    for c in range(3):
        # Same randomness and pixels; only float rounding may differ (XLA can fold the
        # division by the constant std differently under jit), hence ATOL_NORMALIZE.
        np.testing.assert_allclose(
            batched[c], np.asarray(single(keys[c], x[c])), rtol=0, atol=ATOL_NORMALIZE
        )
    test_fn = make_test_transform(kind, MEAN[kind], STD[kind])
    x = x[:2, :8]
    np.testing.assert_allclose(
        np.asarray(jax.jit(jax.vmap(test_fn))(x)).reshape(16, 32, 32, 3),
        np.asarray(jitted_test(kind)(x.reshape(16, 28, 28, 1))),
        rtol=0,
        atol=ATOL_NORMALIZE,
    )


def test_train_transform_inside_scan():
    kind = "cifar10"
    fn = make_train_transform(kind, MEAN[kind], STD[kind], True)
    x = jnp.asarray(np.random.default_rng(10).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))

    def step(carry, key):
        return carry + fn(key, x).sum(), None

    total, _ = jax.jit(lambda k: jax.lax.scan(step, 0.0, jax.random.split(k, 3)))(jax.random.key(6))
    assert np.isfinite(float(total))


def test_presized_mnist_skips_resize():
    """A dataset resized once on the host (32x32x1) gives the same test output."""
    fn = jitted_test("mnist")
    x = np.random.default_rng(11).integers(0, 256, (16, 28, 28, 1), dtype=np.uint8)
    pre = resize_jit(jnp.asarray(x), (32, 32))
    np.testing.assert_array_equal(np.asarray(fn(pre)), np.asarray(fn(jnp.asarray(x))))


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown dataset kind 'svhn'"):
        make_train_transform("svhn", MEAN["mnist"], STD["mnist"], False)
    with pytest.raises(ValueError, match="std"):
        make_test_transform("mnist", MEAN["mnist"], (0.0, 0.0, 0.0))
    fn = make_test_transform("cifar10", MEAN["cifar10"], STD["cifar10"])
    with pytest.raises(ValueError, match="cifar10 images"):
        fn(jnp.zeros((2, 28, 28, 1), jnp.uint8))
    with pytest.raises(ValueError, match="uint8"):
        fn(jnp.zeros((2, 32, 32, 3), jnp.float32))
    mn = make_train_transform("mnist", MEAN["mnist"], STD["mnist"], False)
    with pytest.raises(ValueError, match="1 channel"):
        mn(jax.random.key(0), jnp.zeros((2, 28, 28, 3), jnp.uint8))
