"""Client hooks: the extension point (identity hooks change nothing), FedProx and local DP
against float64 oracles, and 2-round Simulation runs whose numbers they change."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmc_jax import engine as engine_lib
from spmc_jax.attacks.base import AttackEnv
from spmc_jax.client import (
    ClientData,
    ClientHook,
    ClientTask,
    HookInputs,
    epoch_order,
    make_client_step,
    make_optimizer,
)
from spmc_jax.client_hooks.client_dp import client_dp, clip_and_noise
from spmc_jax.client_hooks.fedprox import fedprox, prox_gradient
from spmc_jax.config import Config
from spmc_jax.data.pipeline import make_train_transform
from spmc_jax.data.types import MEAN, STD
from spmc_jax.engine import Simulation, run
from spmc_jax.models import get_model
from tests.client_runs import TINY, plain_fedavg
from tests.reference import client_hooks_oracle as oracle


def _flat_global(cfg, ds):
    res = run(cfg, ds)
    return np.asarray(res.state.global_flat, np.float64), res


@pytest.fixture(scope="module")
def plain_run(blobs):
    """(initial model, global model after 2 plain FedAvg rounds), shared by the run tests."""
    return plain_fedavg(blobs)


# ----------------------------------------------------------------------- the extension point
def test_identity_hooks_leave_the_run_bit_identical(blobs, plain_run, monkeypatch):
    """A hook with a state, a server update, a gradient and a rows transform that all return
    their input must not move a single bit: the hook plumbing adds no randomness, no
    reordering and no extra rounding."""
    cfg = Config(**TINY)
    plain = plain_run[1]
    seen = {}

    def server(state, ctx):
        return state + 1  # counts rounds: the state does travel

    def grad(g, ctx):
        seen["grad"] = True
        return g

    def rows(W, ctx):
        seen["rows"] = True
        return W

    hook = ClientHook(
        "identity", init=lambda g: jnp.zeros((), jnp.int32), server=server, grad=grad, rows=rows
    )
    monkeypatch.setattr(engine_lib, "config_hooks", lambda cfg, env: [hook])
    hooked, res = _flat_global(cfg, blobs)
    np.testing.assert_array_equal(plain, hooked)
    assert seen == {"grad": True, "rows": True}
    assert int(res.state.hooks[0]) == cfg.rounds


# ------------------------------------------------------------------------------- FedProx
def test_prox_gradient_matches_oracle():
    rng = np.random.RandomState(0)
    g, w, w0 = (rng.randn(3, 5).astype(np.float32) for _ in range(3))
    out = prox_gradient({"a": jnp.asarray(g)}, {"a": jnp.asarray(w)}, {"a": jnp.asarray(w0)}, 0.3)
    # float32 arithmetic on O(1) values: a few 1e-8 absolute (cancellation near 0).
    np.testing.assert_allclose(
        np.asarray(out["a"]), oracle.prox_gradient(g, w, w0, 0.3), rtol=1e-6, atol=1e-7
    )


def _step_setup():
    rng = np.random.RandomState(0)
    n = 48
    data = ClientData(
        x=jnp.asarray(rng.randint(0, 255, (n, 28, 28, 1)).astype(np.uint8)),
        y=jnp.asarray(rng.randint(0, 10, n).astype(np.int32)),
        poison=jnp.zeros(n, bool),
    )
    model = get_model("mlp")
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    transform = make_train_transform("mnist", MEAN["mnist"], STD["mnist"], False)
    task = ClientTask(
        jnp.arange(n, dtype=jnp.int32),
        jnp.asarray(n, jnp.int32),
        jnp.asarray(False),
        jnp.asarray(0, jnp.int32),
        jax.random.key(1),
    )
    return data, model, variables, transform, task


def test_fedprox_step_adds_mu_times_distance_to_global():
    """One SGD step (lr 1, no momentum / decay) with FedProx: the new parameters differ from
    the plain step's by exactly −μ·(w − w_g), the oracle's proximal gradient term."""
    data, model, variables, transform, task = _step_setup()
    tx = make_optimizer(1.0, 0.0, 0.0)
    mu = 0.7
    glob = jax.tree.map(lambda v: v * 0.5 + 0.01, variables["params"])
    plain = make_client_step(model, transform, tx, batch_size=16)
    prox = make_client_step(model, transform, tx, batch_size=16, hooks=[fedprox(mu)])
    opt = tx.init(variables["params"])
    perm, k = epoch_order(task, jnp.asarray(0, jnp.int32))
    on = jnp.asarray(False)
    a = jax.jit(plain)(variables, opt, variables, data, task, on, perm, k, 0)
    b = jax.jit(prox)(
        variables, opt, variables, data, task, on, perm, k, 0, HookInputs(glob, ((),))
    )
    for pa, pb, w, w0 in zip(
        *(jax.tree.leaves(t) for t in (a.variables["params"], b.variables["params"])),
        jax.tree.leaves(variables["params"]),
        jax.tree.leaves(glob),
        strict=True,
    ):
        want = -(oracle.prox_gradient(0.0, np.asarray(w), np.asarray(w0), mu))
        # Differences of float32 parameters of size ~0.1: absolute 1e-6.
        np.testing.assert_allclose(np.asarray(pb) - np.asarray(pa), want, atol=1e-6)


def test_fedprox_run_pulls_clients_toward_the_global_model(blobs, plain_run):
    """2 rounds through `run`: a strong μ shrinks the global model's total movement (every
    client's drift is bounded by the proximal pull)."""
    g0, plain = plain_run
    prox, _ = _flat_global(Config(**TINY).replace(fedprox_mu=20.0), blobs)
    move_plain, move_prox = np.linalg.norm(plain - g0), np.linalg.norm(prox - g0)
    assert move_prox < 0.8 * move_plain, (move_prox, move_plain)


# ---------------------------------------------------------------------------- client DP
def test_clip_matches_oracle_and_leaves_other_rows():
    rng = np.random.RandomState(1)
    W = rng.randn(5, 40).astype(np.float32)
    g = rng.randn(40).astype(np.float32) * 0.1
    apply = np.array([True, True, False, True, False])
    out = np.asarray(
        clip_and_noise(
            jnp.asarray(W), jnp.asarray(g), jnp.asarray(apply), jax.random.key(0), 2.0, 0.0
        )
    )
    want = oracle.clip_update(W, g, 2.0)
    # float32 norm and product of O(1) values: 1e-5 relative.
    np.testing.assert_allclose(out[apply], want[apply], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out[~apply], W[~apply])
    assert np.all(np.linalg.norm(out[apply] - g, axis=1) <= 2.0 * (1 + 1e-5))


def test_dp_noise_statistics():
    """The added noise is N(0, (σC)²) per coordinate: with 200k draws the sample mean is
    within 5 standard errors of 0 and the sample std within 1% of σC."""
    n, d, clip, sigma = 4, 50_000, 0.5, 0.2
    W = jnp.zeros((n, d))
    g = jnp.zeros((d,))
    out = np.asarray(
        clip_and_noise(W, g, jnp.ones(n, bool), jax.random.key(3), clip, sigma), np.float64
    )
    std = sigma * clip
    assert abs(out.mean()) < 5 * std / np.sqrt(n * d)
    assert abs(out.std() / std - 1) < 0.01


def test_dp_hook_spares_attackers_and_batchnorm_columns():
    rng = np.random.RandomState(2)
    pm = np.array([True] * 30 + [False] * 10)
    env = AttackEnv((32, 32, 3), (0.5,) * 3, (0.5,) * 3, param_mask=pm)
    W = jnp.asarray(rng.randn(4, 40).astype(np.float32))
    g = jnp.zeros((40,))
    mal = jnp.array([False, False, True, True])
    from spmc_jax.client import RowsContext

    ctx = RowsContext(g, mal, jnp.asarray(True), jax.random.key(0), ())
    out = np.asarray(client_dp(env, clip=0.1, sigma=0.0).rows(W, ctx))
    np.testing.assert_array_equal(out[2:], np.asarray(W)[2:])  # attackers skip it
    np.testing.assert_array_equal(out[:, 30:], np.asarray(W)[:, 30:])  # BN statistics
    np.testing.assert_allclose(np.linalg.norm(out[:2, :30], axis=1), 0.1, rtol=1e-5)
    every = np.asarray(client_dp(env, clip=0.1, all_clients=True).rows(W, ctx))
    np.testing.assert_allclose(np.linalg.norm(every[:, :30], axis=1), 0.1, rtol=1e-5)


def test_client_dp_run_clips_and_noises_the_updates(blobs, plain_run):
    """2 FedAvg rounds, every client clipped to C = 1e-3 with noise σ = 1: the global model's
    movement is the mean of 4 clipped updates (norm <= C per round) plus the mean of 4
    N(0, (σC)²) noises per round, so over d coordinates its std is σC·√(2/4) up to the
    clipped part (norm <= 2C, i.e. ~2C/√d per coordinate) and sampling (~1/√d)."""
    g0, plain = plain_run
    clip, sigma = 1e-3, 1.0
    cfg = Config(**TINY).replace(client_dp_clip=clip, client_dp_sigma=sigma, client_dp_all=True)
    dp, _ = _flat_global(cfg, blobs)
    move = dp - g0
    d = move.size
    want = sigma * clip * np.sqrt(2 / 4)
    assert abs(move.std() / want - 1) < 0.02 + 4 / np.sqrt(d), (move.std(), want)
    assert np.linalg.norm(plain - g0) > 50 * clip  # without DP the model moves far more


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(fedprox_mu=-1.0), "fedprox-mu"),
        (dict(fedprox_mu=float("nan")), "fedprox-mu"),
        (dict(client_dp_clip=-0.1), "client-dp-clip"),
        (dict(client_dp_sigma=1.0), "client-dp-clip C > 0"),
        (dict(client_dp_clip=1.0, client_dp_sigma=-1.0), "client-dp-sigma"),
        (dict(attackers_projection="flip"), "follow, skip, invert"),
        (dict(attackers_projection="invert", attackers_skip_projection=True), "contradicts"),
        (dict(client_dp_clip=1.0, defense="fedavg", stream_aggregation=True), "stream"),
    ],
)
def test_bad_client_options_are_rejected(kw, match):
    with pytest.raises(ValueError, match=match):
        Config(**kw).validate()


def test_hook_state_checkpoints_and_resumes(blobs, tmp_path):
    """A run whose hook carries state (A3FL's trigger) resumes from a checkpoint with the
    uninterrupted run's numbers; resuming with the state reset does not (the state matters)."""
    from spmc_jax.checkpoint import Checkpointer

    cfg = Config(**{**TINY, "attack": "a3fl", "rounds": 3})
    sim = Simulation(cfg, blobs)
    straight = run(cfg, blobs, sim=sim)
    with Checkpointer(tmp_path / "ck") as ck:

        def save(state, done):
            if done == 2:
                ck.save(state, done, cfg.to_dict())

        run(cfg.replace(rounds=2), blobs, sim=sim, on_checkpoint=save)
    with Checkpointer(tmp_path / "ck") as ck:
        state, _ = ck.restore(sim.init_state())
    resumed = run(cfg, blobs, sim=sim, state=state, start_round=2, history=straight.history[:2])
    np.testing.assert_array_equal(
        np.asarray(resumed.state.hooks[0][0]), np.asarray(straight.state.hooks[0][0])
    )
    np.testing.assert_array_equal(
        np.asarray(resumed.state.global_flat), np.asarray(straight.state.global_flat)
    )
    assert resumed.history[-1]["R"] == straight.history[-1]["R"]
    broken = state._replace(hooks=sim.init_state().hooks)
    bad = run(cfg, blobs, sim=sim, state=broken, start_round=2)
    assert not np.array_equal(
        np.asarray(bad.state.hooks[0][0]), np.asarray(straight.state.hooks[0][0])
    )


def test_cli_flags_reach_the_config_and_the_hooks(blobs):
    """The CLI's client options land in Config and build the hooks the run uses."""
    from spmc_jax.train import build_parser, config_from_args

    args = build_parser().parse_args(
        [
            *("--fedprox-mu", "0.01", "--client-dp-clip", "2", "--client-dp-sigma", "0.5"),
            *("--client-dp-all", "--attackers-projection", "invert", "--model", "mlp"),
            *("--attack", "base+neurotoxin", "--clients", "4", "--subsample", "400"),
            *("--partition", "iid", "--batch-size", "16"),
        ]
    )
    cfg = config_from_args(args).validate()
    assert (cfg.fedprox_mu, cfg.client_dp_clip, cfg.client_dp_sigma) == (0.01, 2.0, 0.5)
    assert cfg.client_dp_all and cfg.attackers_projection_mode == "invert"
    sim = Simulation(cfg, blobs)
    assert [h.name for h in sim.hooks] == ["neurotoxin", "fedprox", "client_dp"]
    old = config_from_args(build_parser().parse_args(["--attackers-skip-projection"]))
    assert old.attackers_projection_mode == "skip"
