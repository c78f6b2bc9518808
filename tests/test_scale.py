"""Scale: partial participation touches only the sampled rows; memory planning and chunks;
the cross-device (shared-shard) partition."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from spmc_jax import engine
from spmc_jax.config import Config
from spmc_jax.engine import Simulation, choose_client_chunk, estimate_memory, make_plan

TINY = dict(rounds=1, local_epochs=1, batch_size=16, gamma=0.25, eval_batch=150)


def test_partial_participation_updates_only_sampled_teachers(blobs):
    cfg = Config(defense="spmc", clients=8, clients_per_round=3, **TINY)
    sim = Simulation(cfg, blobs)
    state = sim.init_state()
    assert state.teachers.shape == (8, sim.flat.dim)  # kept for all N registered clients
    new, out = sim.run_rounds(state, sim.data, 1, jnp.asarray(0, jnp.int32))
    ids = np.asarray(out.client_ids[0])
    assert ids.shape == (3,) and len(set(ids.tolist())) == 3
    old_t, new_t = np.asarray(state.teachers), np.asarray(new.teachers)
    changed = np.flatnonzero(np.any(old_t != new_t, axis=1))
    # Exactly the sampled rows moved; every other client's persistent state is untouched.
    np.testing.assert_array_equal(changed, np.sort(ids))
    assert out.loss.shape == (1, 3)


def test_auto_chunk_picks_the_largest_fitting_chunk():
    cfg = Config(defense="fedavg", clients=100)
    dim, act, data = 10_000, 5_000, 1_000
    full = estimate_memory(cfg, dim, act, data, 100)["total"]
    assert choose_client_chunk(cfg, dim, act, data, budget=2 * full) is None  # all fit: vmap
    budget = estimate_memory(cfg, dim, act, data, 37)["total"]
    assert choose_client_chunk(cfg, dim, act, data, budget) == 37
    with pytest.raises(ValueError, match="--client-chunk 37 would fit"):
        choose_client_chunk(cfg.replace(client_chunk=60), dim, act, data, budget)
    with pytest.raises(ValueError, match="even --client-chunk 1"):
        choose_client_chunk(cfg, dim, act, data, budget=1.0)


def test_plan_records_auto_chunk_and_chunked_run_matches(blobs, monkeypatch):
    cfg = Config(defense="fedavg", clients=4, **TINY)
    full = make_plan(cfg, blobs)
    assert full.client_chunk is None and full.memory["fits"] == 1.0
    # Pretend the device only holds a run with 2 clients in flight.
    budget = full.memory["total"] - full.memory["local_training"] + 2.5 * full.memory["per_client"]
    monkeypatch.setattr(engine, "device_memory_bytes", lambda: budget / engine.MEMORY_FRACTION)
    plan = make_plan(cfg, blobs)
    assert plan.client_chunk == 2
    a = engine.run(cfg, blobs).history  # planned again inside: chunk 2
    monkeypatch.undo()
    b = engine.run(cfg, blobs).history
    # lax.map over chunks vs one vmap: same per-client programs, float32-equal losses.
    np.testing.assert_allclose(a[0]["loss"], b[0]["loss"], rtol=1e-5)


def test_many_clients_get_overlapping_shards(blobs):
    # 1200 images, pool 1080: 200 clients × min_size 10 > 1080, no disjoint split exists.
    cfg = Config(defense="fedavg", clients=200, clients_per_round=10, **TINY)
    plan = make_plan(cfg, blobs)
    assert plan.shared_shards
    p = plan.partition
    assert p.indices.shape == (200, 16) and (p.sizes == 16).all() and p.mask.all()
    assert p.indices.max() < plan.client_pool  # never the proxy set
    np.testing.assert_array_equal(plan.label_hist.sum(1), 16)
    labels = blobs.y_train[p.indices]
    for i in range(200):
        np.testing.assert_array_equal(np.bincount(labels[i], minlength=10), plan.label_hist[i])
    again = make_plan(cfg, blobs)
    np.testing.assert_array_equal(again.partition.indices, p.indices)  # seeded
    # Dirichlet (β = 0.5) mixes are skewed: far fewer classes per client than IID.
    iid = make_plan(cfg.replace(partition="iid"), blobs)
    assert (plan.label_hist > 0).sum(1).mean() < (iid.label_hist > 0).sum(1).mean()
