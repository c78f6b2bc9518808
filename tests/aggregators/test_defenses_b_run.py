"""The defenses of issue #15 part B run 2 rounds of a real `Simulation` (MLP on the blobs
set, 4 clients, 1 attacker, 1 local epoch) and report weights that follow their rule.

Per rule, `CHECKS` tests the round's client weights against what the rule must give on
4 clients (e.g. bucketing's median of 2 bucket means is their mean: 1/4 each).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from spmc_jax.config import Config
from spmc_jax.engine import run

TINY = dict(
    model="mlp", clients=4, rounds=2, local_epochs=1, batch_size=16, gamma=0.25,
    eval_batch=150, subsample=400,
)  # fmt: skip


def _bucketing(w: np.ndarray) -> None:
    np.testing.assert_allclose(w, 0.25, atol=1e-6)  # median of 2 = mean of 2 bucket means


def _selection(w: np.ndarray) -> None:
    kept = w > 0
    assert kept.any()
    np.testing.assert_allclose(w[kept], 1.0 / kept.sum(), atol=1e-6)


def _softmax_trust(w: np.ndarray) -> None:
    assert (w > 0).all()  # a softmax over the 4 valid clients


def _layer_shares(w: np.ndarray) -> None:
    assert (w >= 0).all()  # coordinate-weighted per-layer shares (sum checked above)


CHECKS: dict[str, tuple[dict[str, str], Callable[[np.ndarray], None]]] = {
    "bucketing": ({}, _bucketing),
    "signguard": ({}, _selection),
    "flare": ({"aux_samples": "16"}, _softmax_trust),
    "lasa": ({}, _layer_shares),
    "fldetector": ({}, _selection),
    "indicator": ({"n_samples": "16", "plant_steps": "5"}, _selection),
}


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_defense_runs_two_rounds(name, blobs):
    opts, check = CHECKS[name]
    cfg = Config(defense=name, defense_opts=tuple(opts.items()), **TINY)
    hist = run(cfg, blobs).history
    assert len(hist) == 2
    for h in hist:
        w = np.asarray(h["client_weights"], np.float64)
        assert w.shape == (4,) and np.isfinite(w).all()
        assert w.sum() == pytest.approx(1.0, abs=1e-5)
        check(w)
        assert 0.0 <= h["A"] <= 100.0 and np.isfinite(h["loss"]).all()
    assert hist[-1]["A"] > 30.0  # learned beyond chance (10 %) in 2 rounds
