"""BackdoorIndicator against its float64 oracle (tests/reference/indicator_oracle.py) on the
FakeProxy's linear-softmax model (first 15 coordinates), all of whose coordinates are
parameters here. Tolerance: 30 float32 gradient steps of size 0.05 on O(1) logits; errors
grow at most linearly: ATOL 1e-4. Flags must match exactly.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmc_jax.aggregators import get_aggregator
from spmc_jax.aggregators.indicator import (
    IndicatorState,
    balanced_labels,
    indicator_set,
    ood_images,
    ood_model_inputs,
    resolve_ood,
)
from spmc_jax.config import Config
from spmc_jax.data.types import MEAN, STD
from spmc_jax.engine import run
from tests.reference import indicator_oracle

from .conftest import FakeProxy, make_ctx, make_env

D = 24
F, C = FakeProxy.N_FEATURES, FakeProxy.N_CLASSES
OPTS = dict(n_samples=24, threshold=0.9, plant_steps=30, plant_lr=0.05, mu=0.1)


def test_indicator_set_scrambles_pixels_and_balances_labels():
    x = jnp.arange(2 * 3 * 4 * 2, dtype=jnp.float32).reshape(2 * 3, 4, 2)  # 6 "images"
    x_o, lab = indicator_set(x, 5, 3, seed=0)
    assert x_o.shape == (5, 4, 2)
    for j in range(5):  # every sample keeps its own pixel values, in another order
        assert sorted(np.asarray(x_o[j]).ravel()) == sorted(np.asarray(x[j]).ravel())
        assert not np.array_equal(np.asarray(x_o[j]), np.asarray(x[j]))
    assert sorted(np.bincount(np.asarray(lab), minlength=3)) == [1, 2, 2]


@pytest.mark.parametrize("planted", [True, False])
def test_indicator_matches_oracle(planted):
    n = 6
    rng = np.random.default_rng(1)
    g = rng.normal(size=D).astype(np.float32) * 0.3
    w = (g + 0.1 * rng.normal(size=(n, D))).astype(np.float32)
    w[4, F * C + 2] += 50.0  # predicts class 2 everywhere: indicator accuracy 1 on class 2
    valid = np.ones(n, bool)
    env = make_env(n, D, param_mask=np.ones(D, bool))
    agg = get_aggregator("indicator", env, **OPTS)
    ctx = make_ctx(g, n, valid=valid)
    out, state, info = jax.jit(agg.aggregate)(
        jnp.asarray(w), IndicatorState(planted=jnp.asarray(planted)), ctx
    )
    x_o, lab = indicator_set(env.proxy.x, OPTS["n_samples"], C, seed=0)
    exp, kept, ia = indicator_oracle.indicator_round(
        g, w, np.asarray(x_o), np.asarray(lab), F, C, planted, OPTS["threshold"],
        OPTS["plant_steps"], OPTS["plant_lr"], OPTS["mu"],
    )  # fmt: skip
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(info.client_weights)), kept)
    np.testing.assert_allclose(np.asarray(out), exp, atol=1e-4)
    assert bool(state.planted)
    assert ia[4] == 1.0 and (4 not in kept) == planted
    # Planting fitted the indicator task: its cross-entropy fell from the plain average's.
    avg = g + np.mean(w[kept].astype(np.float64) - g, axis=0)

    def ce(v):
        z = np.asarray(x_o) @ v[: F * C].reshape(F, C) + v[F * C : F * C + C]
        z = z - z.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        return -np.mean(logp[np.arange(len(z)), np.asarray(lab)])

    assert ce(np.asarray(out, np.float64)) < ce(avg) - 0.05


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({"n_samples": 1}, "n_samples=1"),
        ({"threshold": 0.0}, "threshold=0.0"),
        ({"plant_steps": 0}, "plant_steps=0"),
    ],
)
def test_indicator_rejects_bad_options(opts, match):
    with pytest.raises(ValueError, match=match):
        get_aggregator("indicator", make_env(10, D), **opts)


# ------------------------------------------------------------- OOD data: another dataset
@pytest.mark.parametrize(
    ("run_ds", "other"),
    [("mnist", "fashion_mnist"), ("fashion_mnist", "mnist"), ("cifar10", "fashion_mnist")],
)
def test_indicator_ood_images_are_the_other_datasets(run_ds, other, real_dataset):
    """ood=auto takes M distinct train images of the other dataset (compared with the
    dataset loaded independently), shown to the model through the run's transform: 32x32,
    3 equal channels, the run's normalisation. The transform's mean brightness is checked
    against the raw images' (a bilinear resize keeps it: 0.02 of the [0, 1] range)."""
    assert resolve_ood("auto", run_ds) == other
    src = real_dataset(other)
    raw, idx, kind = ood_images(other, None, 40, 3)
    assert kind == other and len(np.unique(idx)) == 40
    np.testing.assert_array_equal(raw, src.x_train[idx])
    env = dataclasses.replace(
        make_env(6, D), dataset=run_ds, mean=tuple(MEAN[run_ds]), std=tuple(STD[run_ds])
    )
    x = np.asarray(ood_model_inputs(env, other, 40, 3), np.float64)
    assert x.shape == (40, 32, 32, 3)
    pix = x * np.asarray(STD[run_ds]) + np.asarray(MEAN[run_ds])  # back to [0, 1]
    np.testing.assert_allclose(pix[..., 1], pix[..., 0], atol=1e-5)
    np.testing.assert_allclose(pix[..., 2], pix[..., 0], atol=1e-5)
    np.testing.assert_allclose(
        pix[..., 0].mean(axis=(1, 2)), raw.reshape(40, -1).mean(axis=1) / 255.0, atol=0.02
    )


def test_indicator_ood_option_resolution_and_bad_name():
    assert resolve_ood("scramble", "mnist") == "scramble"
    assert resolve_ood("mnist", "mnist") == "mnist"
    assert resolve_ood("auto", "") == "scramble"  # an env without a dataset (unit tests)
    with pytest.raises(ValueError, match=r"ood='svhn'; accepted: auto, mnist"):
        get_aggregator("indicator", make_env(6, D), ood="svhn")


def test_indicator_run_plants_the_fashion_mnist_task(blobs, real_dataset):
    """A real 1-round MNIST-config run (blobs data): the global model the run produced
    carries the indicator task on exactly the FashionMNIST images ood=auto draws (seed 0):
    it predicts their balanced labels far above chance, and not those of another draw."""
    real_dataset("fashion_mnist")
    m = 30
    opts = {"n_samples": str(m), "plant_steps": "60", "plant_lr": "0.1"}
    cfg = Config(
        defense="indicator", defense_opts=tuple(opts.items()), model="mlp", clients=4,
        rounds=1, local_epochs=1, batch_size=16, gamma=0.25, eval_batch=150, subsample=400,
    )  # fmt: skip
    res = run(cfg, blobs)
    env = res.sim.agg_env
    assert env.dataset == "mnist"
    lab = balanced_labels(m, 10, np.random.default_rng(0))

    def acc(seed):
        x = ood_model_inputs(env, "fashion_mnist", m, seed)
        pred = np.argmax(np.asarray(res.sim.predict(res.state.global_flat, x)), axis=1)
        return np.mean(pred == lab)

    fit, other = acc(0), acc(1)
    assert fit >= 0.6  # chance: 0.1
    assert other <= 0.35


def test_indicator_missing_ood_dataset_is_a_clear_error(monkeypatch):
    from spmc_jax.data import sources

    monkeypatch.setattr(sources, "locate", lambda *a, **k: None)
    ood_images.cache_clear()
    env = dataclasses.replace(
        make_env(6, D), dataset="mnist", mean=tuple(MEAN["mnist"]), std=tuple(STD["mnist"])
    )
    want = r"indicator needs its OOD dataset 'fashion_mnist' locally .*--defense-opt ood=\.\.\."
    with pytest.raises(ValueError, match=want):
        get_aggregator("indicator", env, n_samples=7)
    ood_images.cache_clear()
