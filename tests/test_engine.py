"""The engine end to end on a small synthetic set: learning, determinism, SPMC wiring, guards."""

from __future__ import annotations

import numpy as np
import pytest

from spmc_jax.config import Config
from spmc_jax.engine import Simulation, make_plan, run

TINY = dict(clients=4, rounds=2, local_epochs=1, batch_size=16, gamma=0.25, eval_batch=150)


def _history(cfg, ds):
    return run(cfg, ds).history


def test_fedavg_learns_above_chance(blobs):
    cfg = Config(defense="fedavg", **{**TINY, "rounds": 3, "local_epochs": 2})
    hist = _history(cfg, blobs)
    assert len(hist) == 3
    assert hist[-1]["A"] > 40.0  # chance is 10 %
    w = np.asarray(hist[-1]["client_weights"])
    np.testing.assert_allclose(w, 0.25, rtol=1e-6)
    # The last ⌊4·0.25⌋ = 1 client is the attacker (reference convention).
    assert hist[-1]["attacker_weight"] == pytest.approx(0.25, rel=1e-6)


def test_same_seed_same_numbers(blobs):
    cfg = Config(defense="spmc", model="mlp", **TINY)
    a = _history(cfg, blobs)
    b = _history(cfg, blobs)
    for ra, rb in zip(a, b, strict=True):
        for key in ("A", "R", "R_excl_target", "V", "client_weights", "loss"):
            assert ra[key] == rb[key]
    c = _history(cfg.replace(seed=1), blobs)
    assert any(ra["loss"] != rc["loss"] for ra, rc in zip(a, c, strict=True))


def test_spmc_round_reports_alpha_and_projects(blobs):
    cfg = Config(defense="spmc", **TINY)
    res = run(cfg, blobs)
    h = res.history[-1]
    w = np.asarray(h["client_weights"])
    assert w.shape == (4,) and np.isclose(w.sum(), 1.0, atol=1e-5) and (w > 0).all()
    # Round 0: teacher = student at the first step; later steps and round 1 project tensors.
    assert max(res.history[1]["projected"]) > 0
    for key in ("A", "R", "R_excl_target", "V"):
        assert h[key] is not None and 0.0 <= h[key] <= 100.0


def test_ablations_run(blobs):
    for kw in (
        {"projection": False},
        {"server_weighting": False},
        {"attackers_skip_projection": True},
    ):
        hist = _history(Config(defense="spmc", model="mlp", **{**TINY, "rounds": 1}, **kw), blobs)
        assert hist[0]["A"] is not None
    cfg = Config(defense="spmc", model="mlp", server_weighting=False, **{**TINY, "rounds": 1})
    hist = _history(cfg, blobs)
    np.testing.assert_allclose(hist[0]["client_weights"], 0.25, rtol=1e-6)


def test_partial_participation_samples_m_of_n(blobs):
    cfg = Config(defense="fedavg", **{**TINY, "clients": 6, "clients_per_round": 3})
    hist = _history(cfg, blobs)
    for h in hist:
        ids = h["client_ids"]
        assert len(ids) == 3 and len(set(ids)) == 3 and all(0 <= i < 6 for i in ids)


def test_chunked_client_axis_equals_vmapped(blobs):
    base = Config(defense="fedavg", **{**TINY, "rounds": 1})
    a = _history(base.replace(client_chunk=4), blobs)  # all 4 vmapped at once
    b = _history(base.replace(client_chunk=3), blobs)  # lax.map over chunks (4 = 3 + 1 pad)
    c = _history(base, blobs)  # CPU default: one client at a time
    assert a[0]["A"] == pytest.approx(c[0]["A"], abs=1e-6)
    np.testing.assert_allclose(a[0]["loss"], c[0]["loss"], rtol=1e-5)
    assert a[0]["A"] == pytest.approx(b[0]["A"], abs=1e-6)
    np.testing.assert_allclose(a[0]["loss"], b[0]["loss"], rtol=1e-5)


def _counted_round(cfg, ds):
    """One round of the real Simulation with every local step counted as it runs (one
    count per client and step, including the steps a vmapped chunk computes for clients
    already done). Returns (global_flat, count, the clients' steps per epoch)."""
    import jax
    import jax.numpy as jnp

    from spmc_jax.client import local_train_from_step

    sim = Simulation(cfg, ds)
    calls = []

    def counted(*args, **kw):
        out = sim.client_step(*args, **kw)
        # A batched operand: under vmap the callback runs once per client (lane).
        jax.debug.callback(lambda loss: calls.append(np.size(loss)), out.loss)
        return out

    sim.local_train = local_train_from_step(
        counted,
        sim._tx,
        batch_size=cfg.batch_size,
        steps_per_epoch=sim.plan.steps_per_epoch,
        epochs=sim.plan.epochs,
    )
    state, _ = sim.run_rounds(sim.init_state(), sim.data, 1, jnp.asarray(0))
    jax.effects_barrier()
    steps = np.asarray(sim.plan.partition.sizes) // cfg.batch_size
    return np.asarray(state.global_flat), sum(calls), steps


def _chunk_cost(steps, chunk):
    """Client-steps computed when chunks of `chunk` clients (in the given order, the last
    one smaller) each run their largest client's count."""
    return sum(len(c) * max(c) for c in (steps[i : i + chunk] for i in range(0, len(steps), chunk)))


@pytest.mark.parametrize("stream", [False, True])
def test_vmapped_chunks_group_clients_by_steps_and_run_only_their_steps(blobs, monkeypatch, stream):
    from spmc_jax import engine

    # 5 unequal clients (Dirichlet) in chunks of 2: two chunks and a remainder of one.
    cfg = Config(
        defense="fedavg", model="mlp", client_chunk=2, stream_aggregation=stream,
        **{**TINY, "rounds": 1, "clients": 5},
    )  # fmt: skip
    g_one, n_one, steps = _counted_round(cfg.replace(client_chunk=1), blobs)
    assert n_one == steps.sum()  # one client at a time: exactly each client's own steps
    by_steps = _chunk_cost(sorted(steps.tolist()), 2)
    by_id = _chunk_cost(steps.tolist(), 2)
    assert by_steps < by_id < 5 * steps.max()  # the split makes the three rules differ
    g_sorted, n_sorted, _ = _counted_round(cfg, blobs)
    assert n_sorted == by_steps
    monkeypatch.setattr(engine, "SORT_CHUNKS_BY_STEPS", False)
    g_id, n_id, _ = _counted_round(cfg, blobs)
    assert n_id == by_id
    # Which clients share a chunk changes no client's training, only the float32 order of
    # vmapped arithmetic (and, streamed, of the running sum).
    np.testing.assert_allclose(g_sorted, g_id, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_sorted, g_one, rtol=1e-5, atol=1e-6)


def _local_with_fold_flags(cfg, ds, clients, fold, monkeypatch):
    """Each of `clients`' jitted local training in the real Simulation (one compile), with
    the stem's fold decision (`layers._in_every_lane`'s output) recorded each time it runs.
    Returns {client: (final flat weights, its decisions, its local steps)}."""
    import jax
    import jax.numpy as jnp

    from spmc_jax.client import ClientTask
    from spmc_jax.engine import first_block
    from spmc_jax.models import layers

    monkeypatch.setattr(layers, "FOLD_EQUAL_CHANNELS", fold)
    sim = Simulation(cfg, ds)
    assert sim.conv_impl == "patches"
    state, data = sim.init_state(), sim.data
    v = sim.flat.unravel(state.global_flat)
    decided: list[bool] = []
    every_lane = layers._in_every_lane

    def recorded(flag):
        out = every_lane(flag)
        jax.debug.callback(lambda f: decided.append(bool(f)), out)
        return out

    monkeypatch.setattr(layers, "_in_every_lane", recorded)
    local = jax.jit(sim.local_train)
    res = {}
    for c in clients:
        task = ClientTask(
            data.idx[c], data.sizes[c], data.malicious[c], data.rank[c], jax.random.key(1)
        )
        out = local(v, v, first_block(data.train), task, jnp.asarray(True))
        w = np.asarray(sim.flat.ravel(out.variables))
        jax.effects_barrier()
        res[c] = (w, decided.copy(), int(data.sizes[c]) // cfg.batch_size * sim.plan.epochs)
        decided.clear()
    monkeypatch.setattr(layers, "_in_every_lane", every_lane)
    return res


@pytest.mark.parametrize("defense,forwards", [("fedavg", 1), ("spmc", 2)])
def test_grayscale_batches_fold_the_stem_and_poisoned_batches_do_not(
    blobs, monkeypatch, defense, forwards
):
    """MNIST-kind data (grayscale, replicated to 3 channels) through the real Simulation: each
    clean batch's stem convolution takes the one-channel fold, each poisoned batch (the base
    trigger writes channel 0 only; poison rate 1 so every batch has it) the full one. The
    fold moves a benign client's weights by float32 order only; the attacker's are bit for
    bit those without the fold. SPMC runs the stem twice per step (student and teacher)."""
    cfg = Config(
        defense=defense, attack_opts=(("base", "poison_rate", "1.0"),), **{**TINY, "rounds": 1}
    )
    benign, attacker = 0, 3  # the last ⌊4·0.25⌋ = 1 client attacks
    on = _local_with_fold_flags(cfg, blobs, (benign, attacker), True, monkeypatch)
    off = _local_with_fold_flags(cfg, blobs, (benign, attacker), False, monkeypatch)
    (w_on, decided, steps), (w_off, undecided, _) = on[benign], off[benign]
    assert steps > 0 and decided == [True] * (forwards * steps)
    assert undecided == []  # switched off: no decision is made
    assert not np.array_equal(w_on, w_off)
    # float32 summation order over `steps` SGD steps of a small CNN: ~1e-7 per step.
    np.testing.assert_allclose(w_on, w_off, rtol=1e-5, atol=1e-6)
    (w_on, decided, steps), (w_off, _, _) = on[attacker], off[attacker]
    assert steps > 0 and decided == [False] * (forwards * steps)
    np.testing.assert_array_equal(w_on, w_off)


def test_nonfinite_client_never_poisons_the_global_model(blobs):
    import jax.numpy as jnp

    from spmc_jax.attacks.base import ModelAttack

    cfg = Config(defense="fedavg", attack="none", **{**TINY, "rounds": 1})
    sim = Simulation(cfg, blobs)
    nan_attack = ModelAttack(apply=lambda W, g, mal, key: jnp.where(mal[:, None], jnp.nan, W))
    sim.model_attacks = [nan_attack]
    state = sim.init_state()
    state, out = sim.run_rounds(state, sim.data, 1, jnp.asarray(0))
    assert bool(jnp.all(jnp.isfinite(state.global_flat)))
    assert out.nonfinite[0].tolist() == [False, False, False, True]  # the attacker (last id)
    assert float(out.client_weights[0][-1]) == 0.0  # the attacker (last id) got no weight


def test_plan_rejects_clients_without_a_full_batch(blobs):
    with pytest.raises(ValueError, match="batch-size"):
        make_plan(Config(clients=4, batch_size=512), blobs)


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"gamma": 1.0}, "gamma"),
        ({"clients": 1}, "clients"),
        ({"dataset": "svhn"}, "accepted: mnist"),
        ({"defense": "nope"}, "accepted:"),
        ({"attack": "nope"}, "accepted:"),
        ({"defense_opts": (("bogus", "1"),)}, "no option 'bogus'"),
    ],
)
def test_config_validation_names_the_bad_value(kw, msg):
    with pytest.raises(ValueError, match=msg):
        Config(**kw).validate()


def test_bfloat16_compute_runs_with_float32_state(blobs):
    cfg = Config(defense="spmc", model="mlp", **{**TINY, "rounds": 1})
    r32 = run(cfg, blobs)
    r16 = run(cfg.replace(compute_dtype="bfloat16"), blobs)
    g32, g16 = np.asarray(r32.state.global_flat), np.asarray(r16.state.global_flat)
    assert g16.dtype == np.float32 and np.isfinite(g16).all()
    # One round of bf16 arithmetic (relative rounding 2^-9 per op) moves the weights by a
    # small fraction of the round's own update, not by anything comparable to it.
    upd = np.abs(g32 - np.asarray(r32.sim.init_flat)).max()
    assert np.abs(g16 - g32).max() < 0.25 * upd
    assert r16.history[0]["A"] == pytest.approx(r32.history[0]["A"], abs=10.0)


@pytest.mark.parametrize("defense", ["sageflow", "finetuning", "fltrust"])
def test_proxy_rules_run_through_the_engine(blobs, defense):
    """Rules that need the server's proxy data build at init_state too (SageFlow refuses to
    build without it) and produce a trained, finite model."""
    opts = (("public_epochs", "1"),) if defense == "fltrust" else ()
    cfg = Config(defense=defense, model="mlp", defense_opts=opts, **{**TINY, "rounds": 1})
    h = _history(cfg, blobs)[-1]
    w = np.asarray(h["client_weights"])
    assert w.shape == (4,) and np.isfinite(w).all()
    assert h["A"] is not None and h["A"] > 10.0
