"""`--protocol paper` end to end: the reference quirks reach the rule the engine builds, the
run records what the rule received, and SPMC's server-only ablation trains like the reference.

Each quirk test builds real `Simulation`s (paper and fair) and feeds their own aggregators
one client matrix: the paper rule must give exactly the aggregate of the rule built by hand
with the quirk options listed here from spmc_reference.md §4 (not read from PAPER_QUIRKS),
the fair rule exactly that of the rule with no options, and the two must differ on that
matrix (so a quirk that never reaches the rule fails). Equality is exact: the same jitted
math on the same inputs.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmc_jax.aggregators import RoundContext, get_aggregator
from spmc_jax.config import PAPER_QUIRKS, Config
from spmc_jax.engine import Simulation, _Proxy

# 6 clients, γ = 1/3: m = 2, so DnC removes ⌊0.5·2⌋ = 1 client and Bulyan's f = 2 differs from
# the reference's fixed count 1.
TINY = dict(
    clients=6, rounds=1, local_epochs=1, batch_size=16, gamma=0.34, eval_batch=150, model="mlp"
)

# The reference behaviours behind Table 2's baseline rows (spmc_reference.md §4).
REFERENCE_OPTIONS = {
    "sageflow": {"reference_bug": True},
    "bulyan": {"reference_fixed_f": True, "reference_base_client0": True, "momentum_buffers": True},
    "foolsgold": {"reference_first_coords": True, "reference_permutation_bug": True},
    "dnc": {"reference_permutation_bug": True},
    "rlr": {"reference_permutation_bug": True},
    "rfa": {"per_tensor": True},
    "rsa": {"clip": 3.0, "reference_sequential_clip": True, "reference_frozen_buffers": True},
}


PROTOCOLS = ("paper", "fair")
STATEFUL = ("bulyan", "foolsgold")  # server momentum, update history


def test_reference_options_cover_every_quirk():
    assert PAPER_QUIRKS == REFERENCE_OPTIONS


def _matrix(sim: Simulation, seed: int) -> tuple[jax.Array, RoundContext]:
    """Client models g + 0.05·N(0, 1) (one row with a larger step) and a round context."""
    rng = np.random.default_rng(seed)
    g = np.asarray(sim.init_flat)
    w = g + 0.05 * rng.normal(size=(sim.n, g.size))
    w[-1] += 0.1 * rng.normal(size=g.size)
    ctx = RoundContext(
        global_flat=jnp.asarray(g),
        round=jnp.asarray(0, jnp.int32),
        key=jax.random.key(seed),
        n_samples=jnp.asarray(np.asarray(sim.data.sizes), jnp.float32),
        valid=jnp.ones((sim.n,), bool),
        client_ids=jnp.arange(sim.n, dtype=jnp.int32),
    )
    return jnp.asarray(w, jnp.float32), ctx


def _aggregate_both(agg_a, agg_b, w, ctx, rounds):
    """`rounds` rounds of two rules on the same matrix (stateful rules: the state matters
    too), traced into one jitted program: one compile instead of two."""

    @jax.jit
    def step(states, ctx):
        (out_a, s_a, i_a), (out_b, s_b, i_b) = (
            agg.aggregate(w, st, ctx) for agg, st in zip((agg_a, agg_b), states, strict=True)
        )
        return (s_a, s_b), (out_a, i_a.client_weights), (out_b, i_b.client_weights)

    states = (agg_a.init(ctx.global_flat), agg_b.init(ctx.global_flat))
    outs = []
    for t in range(rounds):
        states, a, b = step(states, ctx._replace(round=jnp.asarray(t, jnp.int32)))
        outs.append((tuple(map(np.asarray, a)), tuple(map(np.asarray, b))))
    return outs


@pytest.mark.parametrize("name", sorted(REFERENCE_OPTIONS))
def test_paper_protocol_rule_is_the_quirked_rule(name, blobs):
    sims = {p: Simulation(Config(defense=name, protocol=p, **TINY), blobs) for p in PROTOCOLS}
    w, ctx = _matrix(sims["paper"], seed=3)
    rounds = 2 if name in STATEFUL else 1
    final = {}
    for protocol, sim in sims.items():
        opts = REFERENCE_OPTIONS[name] if protocol == "paper" else {}
        assert sim.defense_opts == opts
        env = dataclasses.replace(sim.agg_env, proxy=_Proxy(sim, sim.data))
        by_hand = get_aggregator(name, env, inputs_sanitized=True, **opts)
        outs = _aggregate_both(sim.aggregator(sim.data), by_hand, w, ctx, rounds)
        for (out, cw), (exp, exp_w) in outs:
            np.testing.assert_array_equal(out, exp)
            np.testing.assert_array_equal(cw, exp_w)
        final[protocol] = outs[-1][0][0]
    # The quirks change this aggregate: a paper run that silently ran the fair rule fails.
    assert not np.array_equal(final["paper"], final["fair"])


def test_explicit_defense_opt_wins_over_the_quirk(blobs):
    cfg = Config(defense="rsa", protocol="paper", defense_opts=(("clip", "inf"),), **TINY)
    sim = Simulation(cfg, blobs)
    assert sim.defense_opts["clip"] == math.inf  # coerced by the registry, not the string
    assert sim.defense_opts["reference_sequential_clip"] is True


def test_summary_records_the_options_the_rule_received(blobs, tmp_path, monkeypatch):
    from spmc_jax import train

    # The CLI's own path (execute -> Simulation -> summary.json) on the synthetic set.
    monkeypatch.setattr("spmc_jax.data.load_dataset", lambda *a, **k: blobs)
    args = [
        *("--dataset", "mnist", "--defense", "rsa", "--protocol", "paper"),
        *("--clients", "6", "--rounds", "1", "--local-epochs", "1", "--batch-size", "16"),
        *("--gamma", "0.34", "--model", "mlp", "--defense-opt", "alpha=0.1"),
        *("--out", str(tmp_path), "--quiet"),
    ]
    assert train.main(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    got = summary["defense_options_received"]
    assert got == {**REFERENCE_OPTIONS["rsa"], "alpha": 0.1}
    assert isinstance(got["alpha"], float)  # the coerced value, not the CLI string


def test_spmc_server_only_under_paper_trains_one_epoch(blobs):
    """`--no-projection --protocol paper`: the reference's SPMD server with its plain FedAvG
    client (1 local epoch, spmc_reference.md §1.4): the same round as 1 explicit epoch."""
    base = {**TINY, "rounds": 1}
    del base["local_epochs"]
    paper = Config(defense="spmc", protocol="paper", projection=False, **base)
    assert paper.epochs == 1
    assert Config(defense="spmc", protocol="paper", **base).epochs == 10
    one = Config(defense="spmc", protocol="fair", projection=False, local_epochs=1, **base)
    rounds = []
    for cfg in (paper, one):
        sim = Simulation(cfg, blobs)
        assert sim.plan.epochs == 1
        # One round of the real jitted loop (training + SPMC server), no evaluation.
        state, out = sim.run_rounds(sim.init_state(), sim.data, 1, jnp.asarray(0, jnp.int32))
        rounds.append((np.asarray(state.global_flat), np.asarray(out.loss)))
    # Same numbers as 1 explicit epoch (10 epochs would change the loss and the model).
    np.testing.assert_array_equal(rounds[0][0], rounds[1][0])
    np.testing.assert_array_equal(rounds[0][1], rounds[1][1])
    assert not np.array_equal(rounds[0][0], np.asarray(sim.init_flat))


def test_paper_foolsgold_reads_the_reference_first_coordinates(blobs):
    """SimpleCNN under --protocol paper: FoolsGold's weights depend only on the reference's
    first n parameter coordinates, conv1.weight[0, 0, 0:2, :] (spmc_reference.md §4), i.e.
    our HWIO kernel[0:2, 0:5, 0, 0] (n = 6 here: its first 6 entries)."""
    cfg = Config(defense="foolsgold", protocol="paper", **{**TINY, "model": "simple_cnn"})
    sim = Simulation(cfg, blobs)
    conv1 = next(x for x in sim.flat.layout if x.name == "['params']['conv1']['kernel']")
    kernel_idx = np.arange(conv1.start, conv1.stop).reshape(conv1.shape)
    first = np.asarray(sim.agg_env.reference_param_order[: sim.n])
    np.testing.assert_array_equal(first, kernel_idx[0:2, :, 0, 0].ravel()[: sim.n])
    w, ctx = _matrix(sim, seed=5)
    agg = sim.aggregator(sim.data)
    step = jax.jit(agg.aggregate)

    def weights(m):
        return np.asarray(step(m, agg.init(ctx.global_flat), ctx)[2].client_weights)

    base = weights(w)
    # Cosines are scale free, so the full-norm normalisation does not matter: redrawing every
    # other coordinate leaves the weights unchanged; moving one first coordinate changes them.
    rng = np.random.default_rng(0)
    others = np.setdiff1d(np.arange(sim.flat.dim), first)
    w2 = np.asarray(w).copy()
    w2[:, others] = np.asarray(ctx.global_flat)[others] + 0.05 * rng.normal(
        size=(sim.n, others.size)
    )
    np.testing.assert_allclose(weights(jnp.asarray(w2)), base, atol=1e-6)
    w3 = np.asarray(w).copy()
    w3[0, first] = np.asarray(w)[1, first]  # clients 0 and 1 now look alike there
    assert not np.allclose(weights(jnp.asarray(w3)), base, atol=1e-3)
