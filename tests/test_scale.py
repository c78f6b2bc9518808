"""Scale: partial participation touches only the sampled rows; memory planning and chunks;
the cross-device (shared-shard) partition."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from spmc_jax import engine
from spmc_jax.config import Config
from spmc_jax.engine import (
    Simulation,
    choose_client_chunk,
    estimate_memory,
    fit_advice,
    make_plan,
)

TINY = dict(rounds=1, local_epochs=1, batch_size=16, gamma=0.25, eval_batch=150)


def test_partial_participation_updates_only_sampled_teachers(blobs):
    cfg = Config(defense="spmc", clients=8, clients_per_round=3, spmc_teachers="all", **TINY)
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


def test_last_round_teachers_keep_m_rows_and_fall_back_to_the_global_model(blobs):
    cfg = Config(defense="spmc", clients=8, clients_per_round=3, **TINY)
    assert cfg.spmc_teachers == "last_round"
    sim = Simulation(cfg, blobs)
    state = sim.init_state()
    assert state.teachers.shape == (3, sim.flat.dim)  # O(m·d), not O(N·d)
    # Round 0: nobody has a teacher yet → the initial (global) model for everyone.
    got = np.asarray(sim._lookup_teachers(state, jnp.arange(3, dtype=jnp.int32)))
    np.testing.assert_array_equal(got, np.broadcast_to(np.asarray(state.global_flat), got.shape))
    new, out = sim.run_rounds(state, sim.data, 1, jnp.asarray(0, jnp.int32))
    ids = np.asarray(out.client_ids[0])
    np.testing.assert_array_equal(np.asarray(new.teacher_ids), ids)
    # Next round: last round's participants get their marginal models, the rest the global.
    probe = np.arange(8, dtype=np.int32)
    got = np.asarray(sim._lookup_teachers(new, jnp.asarray(probe)))
    for i in probe:
        hit = np.flatnonzero(ids == i)
        want = np.asarray(new.teachers)[hit[0]] if hit.size else np.asarray(new.global_flat)
        np.testing.assert_array_equal(got[i], want)


def test_teacher_modes_agree_under_full_participation(blobs):
    cfg = Config(defense="spmc", clients=4, **{**TINY, "rounds": 2})
    runs = []
    for mode in ("last_round", "all"):
        sim = Simulation(cfg.replace(spmc_teachers=mode), blobs)
        state, _ = sim.run_rounds(sim.init_state(), sim.data, 2, jnp.asarray(0, jnp.int32))
        runs.append(np.asarray(state.global_flat))
    # Same rows, same arithmetic: identical, not merely close.
    np.testing.assert_array_equal(runs[0], runs[1])


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


def test_fit_advice_names_what_would_fit():
    cfg = Config(defense="fedavg", clients=1000)
    dim, act, data = 100_000, 5_000, 1_000
    # Room for ~300 rows of the round matrices, far from 1000 participants.
    budget = estimate_memory(cfg.replace(clients_per_round=300), dim, act, data, 1)["total"]
    with pytest.raises(ValueError, match="even --client-chunk 1") as err:
        choose_client_chunk(cfg, dim, act, data, budget)
    msg = str(err.value)
    assert "--stream-aggregation" in msg  # FedAvg: streaming needs no (m, d) matrix
    m = int(msg.split("--clients-per-round to ")[1].split()[0])
    assert m == 300  # the largest m that fits: m fits, m + 1 does not

    def need(m: int) -> float:
        return estimate_memory(cfg.replace(clients_per_round=m), dim, act, data, 1)["total"]

    assert need(m) <= budget < need(m + 1)
    # SPMC with teachers for all N: the O(m·d) teacher option is suggested, streaming is not.
    spmc = Config(defense="spmc", clients=1000, clients_per_round=100, spmc_teachers="all")
    budget = estimate_memory(spmc.replace(spmc_teachers="last_round"), dim, act, data, 1)["total"]
    advice = fit_advice(spmc, dim, act, data, budget)
    assert "--spmc-teachers last_round" in advice and "--stream-aggregation" not in advice


def test_cpu_prefers_one_client_at_a_time_unless_told(blobs):
    cfg = Config(defense="fedavg", clients=4, **TINY)
    assert make_plan(cfg, blobs).client_chunk == 1  # this suite runs on one CPU device
    assert make_plan(cfg.replace(client_chunk=4), blobs).client_chunk == 4  # = vmap all


def test_plan_records_auto_chunk_and_chunked_run_matches(blobs, monkeypatch):
    cfg = Config(defense="fedavg", clients=4, **TINY)
    # Accelerator behaviour: no preferred chunk, vmap everything that fits.
    monkeypatch.setattr(engine, "preferred_client_chunk", lambda cfg: None)
    full = make_plan(cfg, blobs)
    assert full.client_chunk is None and full.memory["fits"] == 1.0
    # Pretend the device only holds a run with 2 clients in flight.
    budget = full.memory["total"] - full.memory["local_training"] + 2.5 * full.memory["per_client"]
    monkeypatch.setattr(engine, "device_memory_bytes", lambda: budget / engine.MEMORY_FRACTION)
    plan = make_plan(cfg, blobs)
    assert plan.client_chunk == 2
    a = engine.run(cfg, blobs).history  # planned again inside: chunk 2
    monkeypatch.undo()
    b = engine.run(cfg.replace(client_chunk=4), blobs).history  # one vmap over all 4
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


@pytest.mark.parametrize("defense", ["fedavg", "fedavg_weighted"])
def test_streaming_aggregation_equals_the_client_matrix_path(blobs, defense):
    # 5 clients in chunks of 2: two full chunks and a remainder of one.
    cfg = Config(defense=defense, model="mlp", clients=5, client_chunk=2, **TINY)
    a = engine.run(cfg, blobs)
    b = engine.run(cfg.replace(stream_aggregation=True), blobs)
    ga, gb = np.asarray(a.state.global_flat), np.asarray(b.state.global_flat)
    # Same rows, same weights; only the float32 order of the weighted sum differs.
    np.testing.assert_allclose(gb, ga, rtol=1e-5, atol=1e-6 * np.abs(ga).max())
    np.testing.assert_allclose(
        b.history[0]["client_weights"], a.history[0]["client_weights"], rtol=1e-6
    )
    np.testing.assert_allclose(b.history[0]["loss"], a.history[0]["loss"], rtol=1e-6)
    plan_a, plan_b = make_plan(cfg, blobs), make_plan(cfg.replace(stream_aggregation=True), blobs)
    assert plan_b.memory["client_matrices"] < plan_a.memory["client_matrices"]


def test_streaming_drops_nonfinite_clients_and_keeps_the_global_model(blobs):
    # lr 1e30 overflows every client's weights: nobody may enter the sum.
    cfg = Config(defense="fedavg", model="mlp", clients=4, lr=1e30, stream_aggregation=True, **TINY)
    res = engine.run(cfg, blobs)
    np.testing.assert_array_equal(np.asarray(res.state.global_flat), np.asarray(res.sim.init_flat))
    assert res.history[0]["nonfinite"] == 4 and sum(res.history[0]["client_weights"]) == 0


def test_streaming_rejects_nonlinear_rules_and_model_attacks(blobs):
    with pytest.raises(ValueError, match=r"not one \(accepted: fedavg, fedavg_weighted\)"):
        Config(defense="spmc", stream_aggregation=True).validate()
    cfg = Config(defense="fedavg", model="mlp", attack="sign_flip", stream_aggregation=True, **TINY)
    with pytest.raises(ValueError, match="cannot run model attacks"):
        Simulation(cfg, blobs)
