"""A, R, R_excl_target and V against hand counts; last-5 means."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from spmc_jax.metrics import last_k_means, make_evaluator


def test_metrics_against_hand_counts():
    # "Images" carry their label in pixel [0,0,0] and a trigger flag in pixel [0,1,0].
    y = np.array([0, 1, 2, 2, 3, 4, 5, 6], np.int32)
    x = np.zeros((8, 2, 2, 1), np.float32)
    x[:, 0, 0, 0] = y
    # The "model" predicts the label, except images 1 and 4 are wrong on the clean set;
    # on triggered images it predicts the target 2 for images 0, 2, 5.
    clean_pred = y.copy()
    clean_pred[[1, 4]] = 9
    trig_pred = y.copy()
    trig_pred[[0, 2, 5]] = 2

    def predict(flat, xb):
        i = xb[:, 1, 1, 0].astype(jnp.int32)  # sample index stored in pixel [1,1,0]
        trig = xb[:, 0, 1, 0] > 0
        p = jnp.where(trig, jnp.asarray(trig_pred)[i], jnp.asarray(clean_pred)[i])
        return jnp.eye(10)[p]

    x[:, 1, 1, 0] = np.arange(8)

    def trigger(xb, yb):
        return xb.at[:, 0, 1, 0].set(1.0), jnp.full_like(yb, 2)

    ev = make_evaluator(predict, lambda xb: xb, trigger, target=2, batch=3)  # 3 ∤ 8: padding path
    out = {k: float(v) for k, v in ev(jnp.zeros(1), jnp.asarray(x), jnp.asarray(y)).items()}
    a = 100 * 6 / 8
    # Triggered hits: images 0, 2, 5 (→2) and image 3 (true class 2, predicted 2): 4 of 8.
    r = 100 - 100 * 4 / 8
    # Excluding the two class-2 images: hits 0 and 5 out of 6.
    r_excl = 100 - 100 * 2 / 6
    assert out["A"] == pytest.approx(a)
    assert out["R"] == pytest.approx(r)
    assert out["R_excl_target"] == pytest.approx(r_excl)
    assert out["V"] == pytest.approx((a + r) / 2)


def test_last_k_means_uses_last_five_evaluated_rounds():
    hist = [
        {"round": i, "A": float(i), "R": 2.0 * i, "R_excl_target": None, "V": 1.5 * i}
        for i in range(8)
    ]
    hist.append({"round": 8, "A": None, "R": None, "R_excl_target": None, "V": None})
    out = last_k_means(hist)
    assert out["A"] == pytest.approx(np.mean([3, 4, 5, 6, 7]))
    assert out["R"] == pytest.approx(2 * np.mean([3, 4, 5, 6, 7]))
    assert out["R_excl_target"] is None
    assert out["rounds_averaged"] == [3, 4, 5, 6, 7]
