"""Models: the reference parameter counts, PyTorch-style init, and conv implementations agree."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmc_jax.flat import Flattener
from spmc_jax.models import get_model, layers
from spmc_jax.models.layers import FULL_IM2COL_MAX_CIN, IM2COL_BATCH_BLOCK, conv2d, max_pool
from tests.reference.conv_oracle import (
    conv2d_nhwc,
    conv2d_nhwc_input_grad,
    conv2d_nhwc_kernel_grad,
)


def _init(name, impl="lax"):
    m = get_model(name, conv_impl=impl)
    # Jitted: ResNet-10's init op by op compiles each small op on its own (seconds each test).
    return m, jax.jit(m.init)(jax.random.key(0), jnp.zeros((2, 32, 32, 3)))


def test_simple_cnn_has_reference_parameter_count():
    _, v = _init("simple_cnn")
    assert sum(x.size for x in jax.tree.leaves(v["params"])) == 92_626
    assert "batch_stats" not in v


def test_resnet10_parameter_count_and_batch_stats():
    _, v = _init("resnet10")
    # spmc_reference.md §1.3: ≈ 4,903,242 parameters (de-duplicated `parameters()`).
    assert sum(x.size for x in jax.tree.leaves(v["params"])) == 4_903_242
    assert sum(x.size for x in jax.tree.leaves(v["batch_stats"])) > 0


def test_torch_default_init_bounds():
    _, v = _init("simple_cnn")
    k = np.asarray(v["params"]["conv1"]["kernel"])  # fan_in = 3·5·5 = 75
    assert np.abs(k).max() <= 1 / np.sqrt(75)
    assert np.abs(k).max() > 0.9 / np.sqrt(75)  # uniform fills the interval


@pytest.mark.parametrize("stride,pad,ksize", [(1, 0, 5), (2, 1, 3), (1, 1, 3), (2, 0, 1)])
def test_patch_conv_equals_xla_conv(stride, pad, ksize):
    kx, kk = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (3, 12, 12, 4))
    k = jax.random.normal(kk, (ksize, ksize, 4, 5))
    a = conv2d(x, k, stride, pad, "lax")
    b = conv2d(x, k, stride, pad, "patches")
    # Same contraction, different float32 summation order: ~1e-6 relative.
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "cin,stride,pad,ksize", [(3, 1, 0, 5), (3, 1, 1, 3), (1, 1, 2, 5), (3, 2, 1, 3), (1, 2, 2, 5)]
)
def test_patch_conv_full_im2col_path_matches_float64_oracle(cin, stride, pad, ksize):
    # cin <= FULL_IM2COL_MAX_CIN takes the one-matmul full-im2col branch of "patches": at
    # stride 1 from flat contiguous slices on an input-wide output grid (the discarded
    # columns, padding included, must not leak into the result), else from strided windows.
    assert cin <= FULL_IM2COL_MAX_CIN
    kx, kk = jax.random.split(jax.random.key(2))
    x = jax.random.normal(kx, (2, 11, 13, cin))
    k = jax.random.normal(kk, (ksize, ksize, cin, 4))
    want = conv2d_nhwc(np.asarray(x), np.asarray(k), stride, pad)  # float64 oracle
    got = conv2d(x, k, stride, pad, "patches")
    # float32 sums of <= 75 unit-normal products: ~1e-6 relative to their magnitude.
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cin,stride,pad", [(3, 1, 0), (6, 2, 1)])
def test_patch_conv_batch_blocks_match_float64_oracle(cin, stride, pad):
    # 3 blocks of IM2COL_BATCH_BLOCK images: the blocked full-im2col path (cin <= 3: lax.map
    # over the blocks, each block's im2col recomputed in the backward pass), and the row-wise
    # conv at the same batch (not blocked).
    assert IM2COL_BATCH_BLOCK is not None
    b = 3 * IM2COL_BATCH_BLOCK
    kx, kk, kg = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(kx, (b, 12, 12, cin))
    k = jax.random.normal(kk, (5, 5, cin, 4))
    got = conv2d(x, k, stride, pad, "patches")
    want = conv2d_nhwc(np.asarray(x), np.asarray(k), stride, pad)
    # float32 sums of <= 150 unit-normal products: ~1e-6 relative to their magnitude.
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    g = jax.random.normal(kg, got.shape)
    dx, dk = jax.grad(lambda x, k: jnp.sum(conv2d(x, k, stride, pad, "patches") * g), (0, 1))(x, k)
    # dk sums b·oh·ow (<= 1,536) products per entry, magnitude ~40: float32 order ~1e-5.
    want_dk = conv2d_nhwc_kernel_grad(np.asarray(x), np.asarray(g), k.shape, stride, pad)
    np.testing.assert_allclose(np.asarray(dk), want_dk, rtol=1e-5, atol=1e-4)
    # dx against XLA's own convolution (independent of the im2col code).
    dx_lax = jax.grad(lambda x: jnp.sum(conv2d(x, k, stride, pad, "lax") * g))(x)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(dx_lax), rtol=1e-5, atol=1e-5)


def _gray(key, b, h, w, cin):
    """(b, h, w, cin) images whose channels are all equal (grayscale replicated)."""
    g = jax.random.normal(key, (b, h, w, 1))
    return jnp.broadcast_to(g, (b, h, w, cin))


@pytest.mark.parametrize(
    "cin,b,stride,pad", [(3, 2, 1, 0), (3, 3 * IM2COL_BATCH_BLOCK, 1, 2), (2, 3, 2, 1)]
)
def test_equal_channel_fold_matches_float64_oracle(cin, b, stride, pad):
    # Equal channels take the one-channel fold (blocked at b = 24); value, kernel gradient
    # and input gradient against the float64 definitions of the full convolution. The input
    # gradient is the one the folded map alone would get wrong (all of it on channel 0).
    kx, kk, kg = jax.random.split(jax.random.key(4), 3)
    x = _gray(kx, b, 12, 11, cin)
    k = jax.random.normal(kk, (5, 5, cin, 4))
    y = conv2d(x, k, stride, pad, "patches")
    xn, kn = np.asarray(x), np.asarray(k)
    # float32 sums of <= 75 unit-normal products: ~1e-6 relative to their magnitude.
    want = conv2d_nhwc(xn, kn, stride, pad)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
    g = jax.random.normal(kg, y.shape)
    dx, dk = jax.grad(lambda x, k: jnp.sum(conv2d(x, k, stride, pad, "patches") * g), (0, 1))(x, k)
    gn = np.asarray(g)
    # dk sums up to b·oh·ow = 24·8·7 products of magnitude ~1 per entry: float32 order ~1e-5.
    want_dk = conv2d_nhwc_kernel_grad(xn, gn, k.shape, stride, pad)
    np.testing.assert_allclose(np.asarray(dk), want_dk, rtol=1e-5, atol=1e-4)
    want_dx = conv2d_nhwc_input_grad(gn, kn, x.shape, stride, pad)
    np.testing.assert_allclose(np.asarray(dx), want_dx, rtol=1e-5, atol=1e-5)
    # It really was the fold: bit for bit the one-channel convolution of the summed kernel.
    fold = layers._blocked_patches_conv(x[..., :1], k.sum(2, keepdims=True), stride, pad)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(fold))


def test_unequal_channels_take_the_full_convolution_bit_for_bit(monkeypatch):
    # One pixel of channel 0 differs (a backdoor trigger's case): the full convolution, with
    # exactly the values and gradients it has with the fold switched off.
    kx, kk = jax.random.split(jax.random.key(5))
    x = _gray(kx, 2 * IM2COL_BATCH_BLOCK, 12, 12, 3).at[1, 0, 0, 0].add(1.0)
    k = jax.random.normal(kk, (5, 5, 3, 4))

    def run():
        f = lambda x, k: jnp.sum(conv2d(x, k, 1, 0, "patches") ** 2)
        return conv2d(x, k, 1, 0, "patches"), jax.grad(f, (0, 1))(x, k)

    on = run()
    monkeypatch.setattr(layers, "FOLD_EQUAL_CHANNELS", False)
    off = run()
    for a, b in zip(jax.tree.leaves(on), jax.tree.leaves(off), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    fold = layers._blocked_patches_conv(x[..., :1], k.sum(2, keepdims=True), 1, 0)
    assert not np.array_equal(np.asarray(on[0]), np.asarray(fold))  # the test can tell


def test_equal_channel_fold_higher_order_and_vmap_agree_with_the_full_convolution(monkeypatch):
    # Forward-over-reverse (3DFed's Hessian-vector product), in the kernel and in the input,
    # and vmapped lanes: one real `cond` for all lanes (fold only if every lane is equal).
    kx, kk, kt = jax.random.split(jax.random.key(6), 3)
    x = _gray(kx, 4, 10, 10, 3)
    k = jax.random.normal(kk, (5, 5, 3, 4))
    t = jax.random.normal(kt, k.shape)
    xs_equal = jnp.stack([x, 2.0 * x])
    xs_mixed = jnp.stack([x, x.at[0, 3, 3, 2].add(1.0)])

    def loss(x, k):
        return jnp.sum(jnp.tanh(conv2d(x, k, 1, 1, "patches")))

    def all_of_it():
        return {
            "hvp_k": jax.jvp(lambda k: jax.grad(loss, 1)(x, k), (k,), (t,))[1],
            "hvp_xk": jax.jvp(lambda x: jax.grad(loss, 1)(x, k), (x,), (0.5 * x,))[1],
            "hvp_x": jax.jvp(lambda x: jax.grad(loss, 0)(x, k), (x,), (0.5 * x,))[1],
            "vmap_equal": jax.vmap(jax.grad(loss, 1), (0, None))(xs_equal, k),
            "vmap_mixed": jax.vmap(jax.grad(loss, 1), (0, None))(xs_mixed, k),
        }

    jaxpr = str(jax.make_jaxpr(jax.vmap(jax.grad(loss, 1), (0, None)))(xs_equal, k))
    assert "cond[" in jaxpr and "select_n" not in jaxpr  # both lanes share one branch
    on = all_of_it()
    monkeypatch.setattr(layers, "FOLD_EQUAL_CHANNELS", False)
    off = all_of_it()
    np.testing.assert_array_equal(np.asarray(on["vmap_mixed"]), np.asarray(off["vmap_mixed"]))
    assert not np.array_equal(np.asarray(on["vmap_equal"]), np.asarray(off["vmap_equal"]))
    for name in on:
        # float32 order: the fold sums the kernel over channels before the dot.
        np.testing.assert_allclose(on[name], off[name], rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("name", ["simple_cnn", "resnet10"])
def test_model_outputs_and_gradients_match_across_conv_impls(name):
    m1, v = _init(name, "lax")
    m2 = get_model(name, conv_impl="patches")
    x = jax.random.normal(jax.random.key(2), (4, 32, 32, 3))

    def loss(params, m):
        out = m.apply({**v, "params": params}, x, train=False)
        return jnp.sum(out**2)

    # Jitted: op by op, ResNet-10's many small ops each compile on their own (~30 s).
    apply1, apply2 = jax.jit(m1.apply), jax.jit(m2.apply)
    np.testing.assert_allclose(
        np.asarray(apply1(v, x)), np.asarray(apply2(v, x)), rtol=1e-4, atol=1e-5
    )
    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g1, g2 = grad(v["params"], m1), grad(v["params"], m2)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        # float32 rounding of reordered sums, amplified by the squared-output loss.
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=1e-4)


def test_flattener_roundtrip_and_param_mask():
    _, v = _init("resnet10")
    f = Flattener.build(v)
    flat = f.ravel(v)
    assert flat.shape == (f.dim,)
    back = f.unravel(flat)
    for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert f.param_mask.sum() == f.num_params == 4_903_242
    # Parameters come first in the flat layout.
    assert f.param_mask[: f.num_params].all() and not f.param_mask[f.num_params :].any()


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="accepted: simple_cnn"):
        get_model("vgg")


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 7, 9, 2)])
def test_max_pool_matches_reduce_window_values_and_tie_gradients(shape):
    # Small integers: many exact ties inside windows, the case where conventions differ.
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randint(0, 3, shape).astype(np.float32))
    oh, ow = shape[1] // 2, shape[2] // 2
    g = jnp.asarray(rng.randn(shape[0], oh, ow, shape[3]).astype(np.float32))
    ref = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
    y_ref, vjp_ref = jax.vjp(ref, x)
    y, vjp = jax.vjp(max_pool, x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
    np.testing.assert_array_equal(np.asarray(vjp(g)[0]), np.asarray(vjp_ref(g)[0]))
    # Hand rule: each window's gradient lands on its first maximum (row-major).
    xn, gn = np.asarray(x), np.asarray(g)
    want = np.zeros_like(xn)
    for b, i, j, c in np.ndindex(shape[0], oh, ow, shape[3]):
        win = xn[b, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2, c].reshape(-1)
        k = int(np.argmax(win))
        want[b, 2 * i + k // 2, 2 * j + k % 2, c] = gn[b, i, j, c]
    np.testing.assert_array_equal(np.asarray(vjp(g)[0]), want)


def test_bfloat16_compute_keeps_float32_weights_and_tracks_float32():
    m32 = get_model("simple_cnn", conv_impl="patches")
    m16 = get_model("simple_cnn", conv_impl="patches", compute_dtype="bfloat16")
    v = m32.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert (
        jax.tree.map(lambda a: a.dtype, m16.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))[
            "params"
        ]["conv1"]["kernel"]
        == jnp.float32
    )
    x = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
    y = jnp.arange(8) % 10

    def loss(params, m):
        logits = m.apply({"params": params}, x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1)), logits

    value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (l32, z32), g32 = value_and_grad(v["params"], m32)
    (l16, z16), g16 = value_and_grad(v["params"], m16)
    assert z16.dtype == jnp.float32 and all(
        a.dtype == jnp.float32 for a in jax.tree.leaves(g16)
    )  # master weights and their gradients stay float32
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 ≈ 0.2 % per op); through 7 layers
    # the logits stay within a few percent of their scale, the gradient direction within 1°.
    np.testing.assert_allclose(z16, z32, atol=0.05 * float(jnp.abs(z32).max()))
    a, b = (np.concatenate([np.ravel(t) for t in jax.tree.leaves(g)]) for g in (g32, g16))
    assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.99
    assert abs(float(l16) - float(l32)) < 0.05 * float(l32)
    with pytest.raises(ValueError, match="accepted"):
        get_model("simple_cnn", compute_dtype="float16")


@pytest.mark.parametrize(("name", "layer"), [("mlp", "out"), ("simple_cnn", "cls")])
def test_features_are_the_classifier_input(name, layer):
    """`features` (FLARE's penultimate-layer representation) fed to the classifier layer
    reproduces the logits: logits = features @ kernel + bias (float32 rounding, 1e-5)."""
    model = get_model(name, 10)
    x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
    variables = model.init(jax.random.key(0), x, train=False)

    @jax.jit  # one compilation instead of one per eager op
    def both(v):
        return model.apply(v, x, method="features"), model.apply(v, x, train=False)

    feats, logits = both(variables)
    cls = variables["params"][layer]
    np.testing.assert_allclose(feats @ cls["kernel"] + cls["bias"], logits, atol=1e-5)
