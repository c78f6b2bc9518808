"""The tiny 2-round FedAvg run that client-hook tests compare against, computed once per
session (tests/test_client_hooks.py, tests/attacks/test_client_attacks.py)."""

from __future__ import annotations

from typing import Any

import numpy as np

from spmc_jax.config import Config
from spmc_jax.data.types import Dataset
from spmc_jax.engine import run

# mlp, 4 clients (1 attacker), 2 rounds, 1 local epoch on a 400-image IID slice of blobs.
TINY: dict[str, Any] = dict(
    clients=4,
    rounds=2,
    local_epochs=1,
    batch_size=16,
    gamma=0.25,
    eval_batch=300,
    model="mlp",
    subsample=400,
    partition="iid",
    defense="fedavg",
)
_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def plain_fedavg(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(initial model, global model after the 2 rounds) of `Config(**TINY)` (attack base),
    float64."""
    if id(ds) not in _CACHE:
        res = run(Config(**TINY), ds)
        assert res.sim.hooks == ()  # no client option switched on: no hook at all
        _CACHE[id(ds)] = (
            np.asarray(res.sim.init_flat, np.float64),
            np.asarray(res.state.global_flat, np.float64),
        )
    return _CACHE[id(ds)]
