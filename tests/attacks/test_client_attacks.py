"""Training-time (client-hook) attacks: Neurotoxin's mask against its oracle, benign clients
untouched, and 2-round runs on blobs whose numbers they change."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmc_jax.attacks import REGISTRY, AttackEnv, get_attack, parse_attack, parse_client_attacks
from spmc_jax.attacks.neurotoxin import keep_mask
from spmc_jax.client import ClientHook, GradContext, ModelOps, ServerContext
from spmc_jax.config import Config
from spmc_jax.engine import run
from spmc_jax.flat import Flattener
from tests.client_runs import TINY
from tests.reference import client_hooks_oracle as oracle

CLIENT_ATTACKS = [n for n, s in REGISTRY.items() if s.kind == "client"]


def _toy_env():
    """A 2-tensor 'model' with a BatchNorm-like non-parameter leaf, for hook unit tests."""
    variables = {
        "params": {"a": jnp.zeros((3, 4)), "b": jnp.zeros((5,))},
        "batch_stats": {"m": jnp.zeros((2,))},
    }
    flat = Flattener.build(variables)
    env = AttackEnv(
        (32, 32, 3), (0.5,) * 3, (0.5,) * 3, param_mask=flat.param_mask, model=ModelOps(flat, None)
    )
    return env, flat


def _server_ctx(g):
    z = jnp.zeros((0, 32, 32, 3))
    return ServerContext(g, jnp.int32(1), jnp.asarray(True), jax.random.key(0), z, z[:, 0, 0, 0])


@pytest.mark.parametrize("name", CLIENT_ATTACKS)
def test_client_attacks_are_hooks_outside_parse_attack(name):
    env, _ = _toy_env()
    hook = get_attack(name, env)
    assert isinstance(hook, ClientHook) and hook.grad is not None
    assert parse_attack(f"base+{name}", env)[1] == []  # neither a data nor a model attack
    assert len(parse_client_attacks(f"base+{name}", env)) == 1


def test_neurotoxin_mask_matches_oracle():
    rng = np.random.RandomState(0)
    d, p = 60, 50
    pm = np.arange(d) < p
    prev, cur = rng.randn(d).astype(np.float32), rng.randn(d).astype(np.float32)
    for ratio in (0.02, 0.1, 0.5, 1.0):
        got = np.asarray(keep_mask(jnp.asarray(prev), jnp.asarray(cur), ratio, pm))
        np.testing.assert_array_equal(got[:p], oracle.neurotoxin_mask(prev[:p], cur[:p], ratio))
        np.testing.assert_array_equal(got[p:], 1.0)  # non-parameters are never masked
    # Round 0: no previous update, nothing masked.
    np.testing.assert_array_equal(
        np.asarray(keep_mask(jnp.asarray(cur), jnp.asarray(cur), 0.5, pm)), 1.0
    )


def test_neurotoxin_masks_only_attackers_in_the_window():
    env, flat = _toy_env()
    hook = get_attack("neurotoxin", env, ratio=0.25)
    rng = np.random.RandomState(1)
    g0 = jnp.asarray(rng.randn(flat.dim).astype(np.float32))
    g1 = jnp.asarray(rng.randn(flat.dim).astype(np.float32))
    state = hook.server(hook.init(g0), _server_ctx(g1))
    np.testing.assert_array_equal(np.asarray(state[0]), np.asarray(g1))
    grad = {"a": jnp.ones((3, 4)), "b": jnp.ones((5,))}
    params = flat.unravel(g1)["params"]

    def ctx(mal, on):
        return GradContext(
            params, params, jnp.asarray(mal), jnp.asarray(on), jax.random.key(0), state
        )

    out = hook.grad(grad, ctx(True, True))
    masked = np.concatenate([np.ravel(out["a"]), np.ravel(out["b"])])  # flat param order
    want = oracle.neurotoxin_mask(np.asarray(g0)[:17], np.asarray(g1)[:17], 0.25)
    np.testing.assert_array_equal(masked, want)
    assert want.sum() == 17 - 5  # ceil(0.25 * 17) coordinates left alone
    for mal, on in ((False, True), (True, False)):
        ctx = GradContext(
            params, params, jnp.asarray(mal), jnp.asarray(on), jax.random.key(0), state
        )
        out = hook.grad(grad, ctx)
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(grad), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_neurotoxin_run_changes_numbers_and_tracks_the_global_update(blobs):
    """2 rounds of base+neurotoxin: after the run the state holds g_1 and the mask of the
    update g_1 − g_0 (the oracle's), and the attackers' masked training changed the model."""
    cfg = Config(attack="base+neurotoxin", attack_opts=(("neurotoxin", "ratio", "0.3"),), **TINY)
    res = run(cfg, blobs)
    g0 = np.asarray(res.sim.init_flat)
    prev, mask = (np.asarray(a) for a in res.state.hooks[0])
    pm = res.sim.flat.param_mask
    np.testing.assert_array_equal(mask[pm], oracle.neurotoxin_mask(g0[pm], prev[pm], 0.3))
    plain = run(cfg.replace(attack="base", attack_opts=()), blobs)
    assert not np.array_equal(
        np.asarray(plain.state.global_flat), np.asarray(res.state.global_flat)
    )
