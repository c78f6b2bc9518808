"""Grad-CAM: the math against an oracle, and `python -m spmc_jax.gradcam` on a tiny trained run."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmc_jax import gradcam, train
from spmc_jax.checkpoint import load_final_model, save_final_model
from spmc_jax.config import Config
from spmc_jax.models import ResNet10
from tests.conftest import make_blob_dataset
from tests.reference.gradcam_oracle import gap_linear_cam

# float32 forward/backward through a small ResNet vs a float64 oracle: relative error ~1e-6
# per op; 1e-4 of the map's peak leaves room for a few dozen accumulated roundings.
F32_CAM_REL = 1e-4
# One batch shape for every Grad-CAM call of the module: compiled once.
N_IMAGES = 2


def _init(model, x, seed=0):
    """Random variables of the model's shapes, drawn on the host (compiling flax's ResNet init
    takes about a minute on a CPU); BatchNorm variances positive."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    rng = np.random.RandomState(seed)

    def draw(path, leaf):
        if jax.tree_util.keystr(path).endswith("['var']"):
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), jnp.float32)
        return jnp.asarray(rng.normal(0.0, 0.3, leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def test_resnet_grad_cam_equals_cam_of_its_linear_head():
    """Behind global average pooling and one linear layer, Grad-CAM is CAM (Selvaraju et al.
    §3.1): α_k = W[k, c] / (h w), so L = ReLU(A · W[:, c]) / (h w)."""
    model = ResNet10(num_classes=10, width=4)
    x = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))
    variables = _init(model, x)  # non-trivial BatchNorm statistics too
    maps = jax.jit(gradcam.grad_cam_maps, static_argnums=(0, 3))
    cam, logits = maps(model, variables, x, "layer4")
    _, inter = jax.jit(
        lambda v, x: model.apply(
            v,
            x,
            train=False,
            capture_intermediates=lambda mdl, name: mdl.name == "layer4",
            mutable=["intermediates"],
        )
    )(variables, x)
    feats = np.asarray(inter["intermediates"]["layer4"]["__call__"][0], np.float64)
    head = variables["params"]["linear"]
    want, want_logits = gap_linear_cam(
        feats, np.asarray(head["kernel"], np.float64), np.asarray(head["bias"], np.float64)
    )
    np.testing.assert_allclose(np.asarray(logits), want_logits, rtol=1e-5, atol=1e-5)
    peak = np.abs(want).max()
    assert peak > 0
    np.testing.assert_allclose(np.asarray(cam), want, atol=F32_CAM_REL * peak)
    # A given class instead of the prediction: the same identity with that class's column.
    cls = jnp.asarray([0, 3, 9])
    cam3, _ = maps(model, variables, x, "layer4", cls)
    want3, _ = gap_linear_cam(
        feats, np.asarray(head["kernel"], np.float64), np.asarray(head["bias"], np.float64), cls
    )
    np.testing.assert_allclose(np.asarray(cam3), want3, atol=F32_CAM_REL * np.abs(want3).max())


def test_upsampled_maps_are_normalised_to_the_input_size():
    model = ResNet10(num_classes=10, width=4)
    x = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
    variables = _init(model, x)
    cam, _ = jax.jit(gradcam.grad_cam, static_argnums=(0, 3))(model, variables, x, "layer4")
    cam = np.asarray(cam)
    assert cam.shape == (2, 16, 16)
    assert cam.min() >= 0.0
    for m in cam:  # each map's peak is 1, or the map is all 0 (ReLU killed everything)
        assert m.max() == pytest.approx(1.0, abs=1e-6) or m.max() == 0.0


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    """A 1-round SimpleCNN run on blobs through `train.main` (so final_model/ is the run's)."""
    out = tmp_path_factory.mktemp("cnn")
    ds = make_blob_dataset(n_train=400, n_test=60)
    mp = pytest.MonkeyPatch()
    mp.setattr("spmc_jax.data.load_dataset", lambda *a, **k: ds)
    args = [
        *("--dataset", "mnist", "--model", "simple_cnn", "--clients", "4", "--rounds", "1"),
        *("--local-epochs", "1", "--batch-size", "32", "--partition", "iid", "--gamma", "0.25"),
        *("--defense", "fedavg", "--quiet", "--out", str(out)),
    ]
    try:
        assert train.main(args) == 0
    finally:
        mp.undo()
    return out, ds


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_every_run_saves_its_final_model(cnn_run):
    out, _ = cnn_run
    flat, meta = load_final_model(out)
    plan = json.loads((out / "plan.json").read_text())["plan"]
    assert flat.shape == (plan["num_params"],) and np.isfinite(flat).all()
    assert meta["rounds_done"] == 1 and meta["config"]["model"] == "simple_cnn"


def test_gradcam_cli_writes_the_grid(cnn_run, tmp_path, capsys):
    out, ds = cnn_run
    png = tmp_path / "cam.png"
    loader = lambda *a, **k: ds
    argv = ["--run", str(out), "--out", str(png), "--images", str(N_IMAGES)]
    assert gradcam.main(argv, loader) == 0
    w, h = gradcam.figure_size(N_IMAGES, 1)
    assert _png_size(png) == (round(w * gradcam.DPI), round(h * gradcam.DPI))
    # Two runs: two more heat-map rows.
    png2 = tmp_path / "cam2.png"
    argv = ["--run", str(out), "--run", str(out), "--out", str(png2), "--images", str(N_IMAGES)]
    assert gradcam.main(argv, loader) == 0
    w, h = gradcam.figure_size(N_IMAGES, 2)
    assert _png_size(png2) == (round(w * gradcam.DPI), round(h * gradcam.DPI))
    assert "wrote" in capsys.readouterr().out


def test_gradcam_maps_of_the_run_change_with_the_trigger(cnn_run):
    out, ds = cnn_run
    flat, meta = load_final_model(out)
    cfg = gradcam.config_from_dict(meta["config"])
    r = gradcam.model_cams(cfg, flat, ds, n_images=N_IMAGES)
    assert r.cam_clean.shape == r.cam_triggered.shape == (N_IMAGES, 32, 32)
    assert (r.labels != r.target).all()  # target-class images are left out
    # The base trigger lights 12 pixels of channel 0 only.
    diff = np.abs(r.triggered - r.images).sum(-1) > 0
    assert 0 < diff.sum() <= N_IMAGES * 12


def test_gradcam_refuses_what_it_cannot_draw(tmp_path, capsys):
    save_final_model(tmp_path / "mlp", jnp.zeros(3), 1, Config(model="mlp").to_dict())
    argv = ["--run", str(tmp_path / "mlp"), "--out", str(tmp_path / "x.png")]
    ds = make_blob_dataset(n_train=20, n_test=20)
    assert gradcam.main(argv, lambda *a, **k: ds) == 2
    assert "has no conv layer" in capsys.readouterr().err
    argv = ["--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.png")]
    assert gradcam.main(argv, lambda *a, **k: ds) == 2
    assert "holds no final model" in capsys.readouterr().err
