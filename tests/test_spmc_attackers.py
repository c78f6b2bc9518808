"""SPMC-aware attackers (`--attackers-projection follow|skip|invert`): the inverted projection
against its float64 oracle, step-level identities, and what it does to SPMC on blobs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmc_jax.client import (
    ClientData,
    ClientTask,
    SpmcClientOptions,
    epoch_order,
    make_client_step,
    make_optimizer,
)
from spmc_jax.config import Config
from spmc_jax.data.pipeline import make_train_transform
from spmc_jax.data.types import MEAN, STD
from spmc_jax.engine import run
from spmc_jax.models import get_model
from spmc_jax.spmc import project
from tests.client_runs import TINY
from tests.reference import client_hooks_oracle as oracle


def test_inverted_projection_matches_oracle():
    rng = np.random.RandomState(0)
    for trial in range(20):
        gd = rng.randn(6, 5).astype(np.float32)
        gg = rng.randn(6, 5).astype(np.float32)
        out = np.asarray(
            project({"t": jnp.asarray(gd)}, {"t": jnp.asarray(gg)}, jnp.float32(-0.8))["t"]
        )
        # float32 inner products of 30 O(1) terms: 1e-5 relative.
        want = oracle.spmc_invert(gd, gg, 0.8).reshape(6, 5)
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5, err_msg=str(trial))


def test_attacker_modes_map_to_lambda():
    assert SpmcClientOptions(0.7).attacker_lam() == 0.7
    assert SpmcClientOptions(0.7, attackers="skip").attacker_lam() == 0.0
    assert SpmcClientOptions(0.7, attackers_skip=True).attacker_lam() == 0.0  # the old flag
    assert SpmcClientOptions(0.7, attackers="invert").attacker_lam() == -0.7
    with pytest.raises(ValueError, match="follow, skip, invert"):
        SpmcClientOptions(0.7, attackers="flip").attacker_lam()
    assert Config(attackers_skip_projection=True).attackers_projection_mode == "skip"


def test_step_invert_is_data_gradient_plus_the_removed_component():
    """One SGD step (lr 1, no momentum or decay), teacher ≠ student, same batch: the step
    moves by −G with G_follow = G_d − P (a benign client), G_invert = G_d + P (an attacker
    under 'invert') and G_d the plain step's, so Δ_invert + Δ_follow = 2·Δ_plain per tensor."""
    rng = np.random.RandomState(0)
    n = 32
    data = ClientData(
        x=jnp.asarray(rng.randint(0, 255, (n, 28, 28, 1)).astype(np.uint8)),
        y=jnp.asarray(rng.randint(0, 10, n).astype(np.int32)),
        poison=jnp.zeros(n, bool),
    )
    model = get_model("mlp")
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    teacher = jax.tree.map(lambda v: v * 1.3, variables)
    transform = make_train_transform("mnist", MEAN["mnist"], STD["mnist"], False)
    tx = make_optimizer(1.0, 0.0, 0.0)
    opt = tx.init(variables["params"])
    mal = jnp.array([True, False])
    task = ClientTask(
        jnp.tile(jnp.arange(n, dtype=jnp.int32), (2, 1)),
        jnp.full((2,), n, jnp.int32),
        mal,
        jnp.zeros((2,), jnp.int32),
        jnp.stack([jax.random.key(2)] * 2),
    )
    perm, k = jax.vmap(epoch_order, (0, None))(task, jnp.asarray(0, jnp.int32))
    old = jax.tree.leaves(variables["params"])

    def deltas(spmc):
        step = make_client_step(model, transform, tx, batch_size=16, spmc=spmc)

        def one(t, p, kk):
            return step(variables, opt, teacher, data, t, jnp.asarray(True), p, kk, 0)

        out = jax.jit(jax.vmap(one))(task, perm, k)
        new = jax.tree.leaves(out.variables["params"])
        d = [np.asarray(a, np.float64) - np.asarray(b)[None] for a, b in zip(new, old, strict=True)]
        return d, np.asarray(out.projected)

    spmc, proj = deltas(SpmcClientOptions(1.0, attackers="invert"))
    plain, _ = deltas(None)
    assert proj[0] > 0 and proj[0] == proj[1]  # both see the same conflicts
    changed = 0
    for s_, p_ in zip(spmc, plain, strict=True):
        invert, follow = s_[0], s_[1]
        # Differences of float32 weights of size ~0.1-1: 1e-5 absolute.
        np.testing.assert_allclose(invert + follow, 2 * p_[0], atol=1e-5)
        np.testing.assert_array_equal(p_[0], p_[1])  # same data, same plain step
        changed += not np.allclose(invert, follow)
    assert changed > 0


def test_inverting_the_projection_defeats_spmc_on_blobs(blobs):
    """2 SPMC rounds, 2 of 4 clients attack with every sample poisoned. Following the
    projection, SPMC keeps the backdoor mostly out (measured: A 88.3, R 77.3); attackers
    that invert it implant it fully (A 8.0, R 0.0; skipping it gives A 17.3, R 3.3), while
    SPMC's server weights barely notice (attackers' weight 0.49972 vs 0.50002)."""
    cfg = Config(
        **{**TINY, "defense": "spmc", "gamma": 0.5},
        attack_opts=(("base", "poison_rate", "1.0"),),
    )
    follow = run(cfg, blobs).history[-1]
    invert = run(cfg.replace(attackers_projection="invert"), blobs).history[-1]
    assert follow["R"] > 50.0 and invert["R"] < 20.0, (follow, invert)
    assert invert["A"] < follow["A"]
    assert invert["attacker_weight"] == pytest.approx(follow["attacker_weight"], abs=0.01)
