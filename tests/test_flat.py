"""The reference-order view of the flat vector (`flat.reference_order`), for both reference models.

Oracle: the flat vector read through the view is split into the PyTorch state_dict entries
listed here from spmc_reference.md §1.3 (names, order and torch shapes: conv OIHW, linear
out×in), and a float64 NumPy forward pass written in PyTorch's layouts from those entries
must reproduce our model's logits. A wrong order, a wrong transpose or a misplaced BatchNorm
statistic changes the logits. Tolerance: float32 model vs float64 oracle, 1e-4 relative to
the largest logit (float32 rounding over ≤ 400-term sums is ~1e-6 of it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmc_jax.flat import Flattener, reference_names, reference_order
from spmc_jax.models import get_model
from spmc_jax.models.resnet import ResNet10

ATOL = 1e-4


def _torch_conv(x, w, b=None, stride=1, pad=0):
    """PyTorch Conv2d on (C, H, W) with an OIHW weight, float64."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    o, _, kh, kw = w.shape
    oh = (x.shape[1] - kh) // stride + 1
    ow = (x.shape[2] - kw) // stride + 1
    out = np.zeros((o, oh, ow))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i : i + stride * oh : stride, j : j + stride * ow : stride]
            out += np.einsum("oc,chw->ohw", w[:, :, i, j], patch)
    return out if b is None else out + b[:, None, None]


def _pool(x):
    c, h, w = x.shape
    return x.reshape(c, h // 2, 2, w // 2, 2).max(axis=(2, 4))


def _relu(x):
    return np.maximum(x, 0.0)


def _split(vec, entries):
    """{name: tensor} from consecutive slices of `vec` with the given torch shapes."""
    out, pos = {}, 0
    for name, shape in entries:
        size = int(np.prod(shape))
        out[name] = vec[pos : pos + size].reshape(shape)
        pos += size
    assert pos == vec.size
    return out


SIMPLE_CNN_SD = [  # RF/Backbones/SimpleCNN.py, §1.3
    ("feats.conv1.weight", (6, 3, 5, 5)),
    ("feats.conv1.bias", (6,)),
    ("feats.conv2.weight", (16, 6, 5, 5)),
    ("feats.conv2.bias", (16,)),
    ("feats.fc1.weight", (120, 400)),
    ("feats.fc1.bias", (120,)),
    ("feats.fc2.weight", (84, 120)),
    ("feats.fc2.bias", (84,)),
    ("l1.weight", (84, 84)),
    ("l1.bias", (84,)),
    ("l2.weight", (256, 84)),
    ("l2.bias", (256,)),
    ("cls.weight", (10, 256)),
    ("cls.bias", (10,)),
]


def _simple_cnn_torch(sd, x):
    h = _pool(_relu(_torch_conv(x, sd["feats.conv1.weight"], sd["feats.conv1.bias"])))
    h = _pool(_relu(_torch_conv(h, sd["feats.conv2.weight"], sd["feats.conv2.bias"])))
    h = h.reshape(-1)  # torch flatten: (C, H, W) order
    for name in ("feats.fc1", "feats.fc2", "l1"):
        h = _relu(sd[f"{name}.weight"] @ h + sd[f"{name}.bias"])
    h = sd["l2.weight"] @ h + sd["l2.bias"]
    return sd["cls.weight"] @ h + sd["cls.bias"]


def _bn_entries(name, c, stats):
    out = [(f"{name}.weight", (c,)), (f"{name}.bias", (c,))]
    return out + ([(f"{name}.running_mean", (c,)), (f"{name}.running_var", (c,))] if stats else [])


def _resnet_sd(w, stats=True):
    """RF/Backbones/ResNet.py state_dict order (no aliases, no num_batches_tracked), §1.3."""
    sd = [("conv1.weight", (w, 3, 3, 3)), *_bn_entries("bn1", w, stats)]
    cin = w
    for i, (c, s) in enumerate(((w, 1), (2 * w, 2), (4 * w, 2), (8 * w, 2)), start=1):
        p = f"layer{i}.0"
        sd += [(f"{p}.conv1.weight", (c, cin, 3, 3)), *_bn_entries(f"{p}.bn1", c, stats)]
        sd += [(f"{p}.conv2.weight", (c, c, 3, 3)), *_bn_entries(f"{p}.bn2", c, stats)]
        if s != 1 or cin != c:
            sd += [(f"{p}.shortcut.0.weight", (c, cin, 1, 1))]
            sd += _bn_entries(f"{p}.shortcut.1", c, stats)
        cin = c
    return [*sd, ("linear.weight", (10, 8 * w)), ("linear.bias", (10,))]


def _resnet_torch(sd, x, w):
    def bn(h, name):
        scale = sd[f"{name}.weight"] / np.sqrt(sd[f"{name}.running_var"] + 1e-5)
        return (h - sd[f"{name}.running_mean"][:, None, None]) * scale[:, None, None] + sd[
            f"{name}.bias"
        ][:, None, None]

    h = _relu(bn(_torch_conv(x, sd["conv1.weight"], pad=1), "bn1"))
    cin = w
    for i, (c, s) in enumerate(((w, 1), (2 * w, 2), (4 * w, 2), (8 * w, 2)), start=1):
        p = f"layer{i}.0"
        y = _relu(bn(_torch_conv(h, sd[f"{p}.conv1.weight"], stride=s, pad=1), f"{p}.bn1"))
        y = bn(_torch_conv(y, sd[f"{p}.conv2.weight"], pad=1), f"{p}.bn2")
        if s != 1 or cin != c:
            h = bn(_torch_conv(h, sd[f"{p}.shortcut.0.weight"], stride=s), f"{p}.shortcut.1")
        h = _relu(y + h)
        cin = c
    return sd["linear.weight"] @ h.mean(axis=(1, 2)) + sd["linear.bias"]


def _shapes(module):
    """The variables' shapes without running the initialisers (eval_shape: no compile)."""
    return jax.eval_shape(
        lambda: module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )


def _randomised(variables, seed):
    """Every leaf redrawn (BN scale/stats too, so a misplaced statistic shows)."""
    leaves, treedef = jax.tree_util.tree_flatten(variables)
    rng = np.random.default_rng(seed)
    new = [jnp.asarray(rng.uniform(-0.3, 0.3, np.shape(x)), jnp.float32) for x in leaves]
    return jax.tree_util.tree_unflatten(treedef, new)


@pytest.mark.parametrize("model", ["simple_cnn", "resnet10"])
def test_reference_view_reproduces_the_torch_forward(model):
    width = 4  # ResNet-10's layout does not depend on the width; 4 keeps the oracle fast
    module = get_model("simple_cnn") if model == "simple_cnn" else ResNet10(width=width)
    x = np.random.default_rng(1).normal(size=(1, 32, 32, 3))
    variables = _randomised(_shapes(module), 2)
    if model == "resnet10":  # keep the statistics a valid variance
        variables = jax.tree_util.tree_map_with_path(
            lambda p, v: v + 0.5 if "var" in jax.tree_util.keystr(p) else v, variables
        )
    flat = Flattener.build(variables)
    vec = np.asarray(flat.ravel(variables), np.float64)
    entries = SIMPLE_CNN_SD if model == "simple_cnn" else _resnet_sd(width)
    order = reference_order(flat.layout, model)
    assert np.array_equal(np.sort(order), np.arange(flat.dim))  # a permutation
    assert reference_names(flat.layout, model) == tuple(n for n, _ in entries)
    sd = _split(vec[order], entries)
    apply = jax.jit(lambda v, x: module.apply(v, x, train=False))
    ours = np.asarray(apply(variables, jnp.asarray(x, jnp.float32)))[0]
    x_chw = x[0].transpose(2, 0, 1)
    want = (
        _simple_cnn_torch(sd, x_chw) if model == "simple_cnn" else _resnet_torch(sd, x_chw, width)
    )
    np.testing.assert_allclose(ours, want, atol=ATOL * np.abs(want).max(), rtol=0)
    assert np.abs(want).std() > 0.1 * np.abs(want).max()  # logits that tell entries apart
    # parameters(): the same entries without the running statistics, in the same order.
    p_entries = [e for e in entries if "running" not in e[0]]
    p_order = reference_order(flat.layout, model, params_only=True)
    assert reference_names(flat.layout, model, params_only=True) == tuple(n for n, _ in p_entries)
    np.testing.assert_array_equal(
        np.concatenate([sd[n].ravel() for n, _ in p_entries]), vec[p_order]
    )


def test_reference_first_coordinates_hand_checked():
    # FoolsGold's "first 10 coordinates" of the reference (spmc_reference.md §4): SimpleCNN
    # conv1.weight[0, 0, 0:2, :] = our HWIO kernel[0:2, :, 0, 0].
    variables = _randomised(_shapes(get_model("simple_cnn")), 3)
    flat = Flattener.build(variables)
    vec = np.asarray(flat.ravel(variables))
    first = vec[flat.reference_order("simple_cnn", params_only=True)[:10]]
    kernel = np.asarray(variables["params"]["conv1"]["kernel"])
    np.testing.assert_array_equal(first, kernel[0:2, :, 0, 0].ravel())


def test_reference_view_of_the_full_resnet10_shape_only():
    # Shapes only (eval_shape): the reference's 4,903,242 parameters, its order starts at the
    # stem conv (conv1.weight[0, 0, 0, 0:3] = stem kernel[0, 0:3, 0, 0]).
    flat = Flattener.build(_shapes(get_model("resnet10")))
    p_order = flat.reference_order("resnet10", params_only=True)
    assert p_order.size == 4_903_242
    stem = next(leaf for leaf in flat.layout if leaf.name == "['params']['stem']['kernel']")
    idx = np.arange(stem.start, stem.stop).reshape(stem.shape)
    np.testing.assert_array_equal(p_order[:3], idx[0, 0:3, 0, 0])
    names = reference_names(flat.layout, "resnet10")
    assert names == tuple(n for n, _ in _resnet_sd(64))


def test_reference_view_rejects_a_model_without_reference():
    layout = Flattener.build(_shapes(get_model("mlp"))).layout
    with pytest.raises(ValueError, match="accepted: simple_cnn, resnet10"):
        reference_order(layout, "mlp")
    with pytest.raises(ValueError, match="unmapped tensors"):
        reference_order(layout, "simple_cnn")
