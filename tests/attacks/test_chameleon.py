"""Chameleon (Dai & Li, ICML 2023): its contrastive loss against a float64 oracle and a
hand-checked case, the two-stage local step (what each stage differentiates, freezes and
restarts), attackers-only in a real Simulation, option checks and a 2-round CLI run."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmc_jax.attacks import AttackEnv, get_attack
from spmc_jax.attacks.chameleon import chameleon_supcon, contrastive_steps
from spmc_jax.client import (
    ClientData,
    ClientTask,
    HookInputs,
    ModelOps,
    collect_hooks,
    epoch_order,
    make_client_step,
    make_optimizer,
)
from spmc_jax.config import Config
from spmc_jax.engine import Simulation
from spmc_jax.flat import Flattener
from spmc_jax.models import get_model
from tests.client_runs import TINY
from tests.reference import chameleon_oracle as oracle

# float32 loss of O(1-10) from logits up to 1/τ ≈ 14: relative 2e-5.
LOSS_RTOL = 2e-5
# One compiled loss for every batch shape below (τ, ω, κ and the target traced).
_loss = jax.jit(chameleon_supcon)


# ------------------------------------------------------------------------ the loss, oracle
def _peer_batch(seed=0):
    """9 samples, target 2: two poisoned images (originally 5 and 7) and one poisoned image
    of the target class itself, two facilitators (clean 2), two obstructors of the first
    poisoned image (clean 5), one of the second (clean 7), one loner (clean 9)."""
    rng = np.random.RandomState(seed)
    feats = rng.randn(9, 4).astype(np.float32)
    y_clean = np.array([5, 7, 2, 2, 2, 5, 5, 7, 9], np.int32)
    poisoned = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0], bool)
    y = np.where(poisoned, 2, y_clean).astype(np.int32)
    return feats, y, y_clean, poisoned


@pytest.mark.parametrize(
    ("tau", "omega", "kappa"), [(0.07, 6.0, 1.0), (0.5, 1.0, 1.0), (0.2, 2.0, 3.0), (1.0, 1.0, 0.3)]
)
def test_contrastive_loss_matches_oracle(tau, omega, kappa):
    feats, y, yc, pois = _peer_batch()
    got = float(
        _loss(
            jnp.asarray(feats),
            jnp.asarray(y),
            jnp.asarray(yc),
            jnp.asarray(pois),
            2,
            tau,
            omega,
            kappa,
        )
    )
    want = oracle.chameleon_supcon(feats, y, yc, pois, 2, tau, omega, kappa)
    np.testing.assert_allclose(got, want, rtol=LOSS_RTOL)


def test_contrastive_loss_hand_checked():
    """Orthogonal unit features, τ = 1, labels (2, 2, 7): anchors 0 and 1 have one positive
    (similarity 0) among two others of similarity 0: ℓ = −log(1/2) = log 2 each, weighted ω
    (label 2 is the target); anchor 2 has no positive: ℓ = 0. L = 2ω·log 2 / 3. κ plays no
    part (no poisoned image), the feature scale none (normalised)."""
    feats = jnp.asarray(np.eye(3, 5, dtype=np.float32) * np.array([[3.0], [0.5], [2.0]]))
    y = jnp.asarray([2, 2, 7], jnp.int32)
    none = jnp.zeros(3, bool)
    for omega, kappa in ((1.0, 1.0), (6.0, 1.0), (6.0, 4.0)):
        got = float(_loss(feats, y, y, none, 2, 1.0, omega, kappa))
        np.testing.assert_allclose(got, 2 * omega * math.log(2) / 3, rtol=1e-6)
    # Scaling the obstructor similarities changes the loss only where obstructors exist.
    feats, y, yc, pois = (jnp.asarray(a) for a in _peer_batch(1))
    plain = float(_loss(feats, y, yc, pois, 2, 0.2, 1.0, 1.0))
    assert float(_loss(feats, y, yc, pois, 2, 0.2, 1.0, 3.0)) != plain
    clean = jnp.zeros_like(pois)
    np.testing.assert_array_equal(
        float(_loss(feats, yc, yc, clean, 2, 0.2, 1.0, 3.0)),
        float(_loss(feats, yc, yc, clean, 2, 0.2, 1.0, 1.0)),
    )


def test_contrastive_loss_gradient_is_finite_on_a_zero_feature_row():
    """A sample whose features are all 0 (a dead ReLU layer) must not turn the attacker's
    gradient into NaN (the engine would then drop the client's model)."""
    feats, y, yc, pois = (jnp.asarray(a) for a in _peer_batch(2))
    feats = feats.at[3].set(0.0)
    g = jax.jit(jax.grad(chameleon_supcon))(feats, y, yc, pois, 2, 0.07, 6.0, 2.0)
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0
    np.testing.assert_allclose(
        float(_loss(feats, y, yc, pois, 2, 0.07, 6.0, 2.0)),
        oracle.chameleon_supcon(np.asarray(feats), y, yc, pois, 2, 0.07, 6.0, 2.0),
        rtol=LOSS_RTOL,
    )


def test_contrastive_stage_length():
    steps = jnp.asarray([1, 2, 3, 4, 8, 13])
    np.testing.assert_array_equal(np.asarray(contrastive_steps(steps, 0.75)), [1, 1, 2, 3, 6, 9])
    np.testing.assert_array_equal(np.asarray(contrastive_steps(steps, 0.01)), [1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(np.asarray(contrastive_steps(steps, 0.99)), [1, 1, 2, 3, 7, 12])


# --------------------------------------------------------------------- the two-stage step
LR, MOM, WD, B = 0.05, 0.9, 5e-4, 16


def _setup():
    """MLP on 48 deterministic 32x32x3 images, every sample flagged for poisoning (the data
    attack acts only on an attacker in the window), the chameleon hook and a plain step."""
    rng = np.random.RandomState(0)
    n = 48
    data = ClientData(
        x=jnp.asarray(rng.randint(0, 255, (n, 32, 32, 3)).astype(np.uint8)),
        y=jnp.asarray(rng.randint(0, 10, n).astype(np.int32)),
        poison=jnp.asarray(rng.rand(n) < 0.5),
    )
    model = get_model("mlp")
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    flat = Flattener.build(variables)
    env = AttackEnv(
        (32, 32, 3),
        (0.5,) * 3,
        (0.25,) * 3,
        param_mask=flat.param_mask,
        model=ModelOps(flat, None),
        output_layer="out",
    )
    attack = get_attack("chameleon", env, temperature=0.5, fac_scale=2.0, obstructor_scale=2.0)

    def transform(key, x):  # deterministic, so the test can rebuild the batch
        return (x.astype(jnp.float32) / 255.0 - 0.5) / 0.25

    tx = make_optimizer(LR, MOM, WD)
    cham = jax.jit(
        make_client_step(
            model, transform, tx, batch_size=B, data_attack=attack, hooks=collect_hooks(attack)
        )
    )
    plain = jax.jit(
        make_client_step(model, transform, tx, batch_size=B, data_attack=get_attack("base", env))
    )
    return data, model, variables, transform, tx, attack, cham, plain


def _task(mal):
    return ClientTask(
        jnp.arange(48, dtype=jnp.int32),
        jnp.asarray(48, jnp.int32),
        jnp.asarray(mal),
        jnp.asarray(0, jnp.int32),
        jax.random.key(1),
    )


def _split(params):
    """(encoder leaves, head leaves) of MLP parameters as float64 arrays."""
    enc = [np.asarray(a, np.float64) for a in jax.tree.leaves(params["hidden"])]
    head = [np.asarray(a, np.float64) for a in jax.tree.leaves(params["out"])]
    return enc, head


@pytest.fixture(scope="module")
def step_setup():
    return _setup()


def test_stage_one_is_the_contrastive_gradient_on_the_encoder_only(step_setup):
    """An attacker's first step of the round (3 batches × 2 epochs: n₁ = 4 contrastive
    steps): the encoder moves by −lr·(∇L + wd·w) with L the contrastive loss of the poisoned
    batch (rebuilt here: the base trigger, labels 2), the head does not move at all."""
    data, model, variables, transform, tx, attack, cham, _ = step_setup
    task = _task(True)
    perm, k = epoch_order(task, jnp.asarray(0, jnp.int32))
    on = jnp.asarray(True)
    hi = HookInputs(variables["params"], ((),), jnp.int32(0), 2)
    out = cham(variables, tx.init(variables["params"]), variables, data, task, on, perm, k, 0, hi)
    # The batch the step saw: its first B samples in the epoch order, poisoned where flagged.
    sel = np.asarray(perm)[:B]
    yc = data.y[sel]
    flags = data.poison[sel]
    _, k_att = jax.random.split(jax.random.fold_in(k, 0))
    xp, yp = jax.jit(attack.apply)(transform(None, data.x[sel]), yc, flags, 0, k_att)
    assert np.any(np.asarray(flags)) and np.all(np.asarray(yp)[np.asarray(flags)] == 2)

    @jax.jit
    def grad(p, xp, yp, yc, flags):
        def loss(p):
            f = model.apply({"params": p}, xp, train=True, penultimate=True)
            return chameleon_supcon(f, yp, yc, flags, 2, 0.5, 2.0, 2.0)

        return jax.grad(loss)(p)

    g = grad(variables["params"], xp, yp, yc, flags)
    enc0, head0 = _split(variables["params"])
    enc1, head1 = _split(out.variables["params"])
    genc, _ = _split(g)
    for a, b in zip(head0, head1, strict=True):
        np.testing.assert_array_equal(a, b)
    for w0, w1, gl in zip(enc0, enc1, genc, strict=True):
        # float32 parameters of O(0.1), updates of O(lr·|g|): absolute 1e-6.
        np.testing.assert_allclose(w1 - w0, -LR * (gl + WD * w0), atol=1e-6)
    assert max(np.abs(gl).max() for gl in genc) > 1e-3  # the loss does move the encoder


def test_stage_two_restarts_the_optimiser_and_trains_the_head_only(step_setup):
    """Step n₁ = 4 (epoch 1, batch 1) starts the classifier stage: with a stale momentum
    buffer the head takes exactly the plain cross-entropy step of a fresh optimiser and the
    encoder stays put; the next step (5) keeps the momentum, as the plain step does."""
    data, _, variables, _, tx, _, cham, plain = step_setup
    task = _task(True)
    on = jnp.asarray(True)
    perm, k = epoch_order(task, jnp.asarray(1, jnp.int32))
    stale = jax.tree.map(lambda a: a + 0.3, tx.init(variables["params"]))
    hi = HookInputs(variables["params"], ((),), jnp.int32(1), 2)
    got = cham(variables, stale, variables, data, task, on, perm, k, 1, hi)
    fresh = plain(variables, tx.init(variables["params"]), variables, data, task, on, perm, k, 1)
    enc0, _ = _split(variables["params"])
    enc1, head1 = _split(got.variables["params"])
    _, head_want = _split(fresh.variables["params"])
    for a, b in zip(enc0, enc1, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(head1, head_want, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(np.any(a != b) for a, b in zip(head1, _split(variables["params"])[1], strict=True))
    # Step 5: no restart, the stale momentum is used (as by the plain step).
    got5 = cham(variables, stale, variables, data, task, on, perm, k, 2, hi)
    want5 = plain(variables, stale, variables, data, task, on, perm, k, 2)
    for a, b in zip(
        _split(got5.variables["params"])[1], _split(want5.variables["params"])[1], strict=True
    ):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(float(got.loss), float(fresh.loss))  # the reported CE


@pytest.mark.parametrize(("mal", "on"), [(False, True), (True, False)])
def test_benign_clients_and_rounds_outside_the_window_take_the_plain_step(step_setup, mal, on):
    data, _, variables, _, tx, _, cham, plain = step_setup
    task = _task(mal)
    perm, k = epoch_order(task, jnp.asarray(0, jnp.int32))
    opt = tx.init(variables["params"])
    hi = HookInputs(variables["params"], ((),), jnp.int32(0), 2)
    a = cham(variables, opt, variables, data, task, jnp.asarray(on), perm, k, 0, hi)
    b = plain(variables, opt, variables, data, task, jnp.asarray(on), perm, k, 0)
    for x, y in zip(jax.tree.leaves(a.variables), jax.tree.leaves(b.variables), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------- a real Simulation round
def test_simulation_changes_the_attackers_rows_only(blobs):
    """Round 1 of a real Simulation on blobs, `chameleon` against `base` (the same trigger,
    target, poison draw and keys): the benign clients' trained rows are bit-identical, the
    attacker's differs in both the encoder and the classifier layer."""
    rows = {}
    for attack in ("base", "chameleon"):
        sim = Simulation(Config(**{**TINY, "attack": attack}), blobs)
        state = sim.init_state()
        assert sim.data is not None
        ids = jnp.arange(sim.n, dtype=jnp.int32)
        keys = jax.random.split(jax.random.key(3), sim.N)
        train = jax.jit(sim._train_clients)
        W, _, _ = train(state, sim.data, ids, keys, jnp.asarray(True))
        rows[attack] = np.asarray(W)
        mal = np.asarray(sim.data.malicious)[np.asarray(ids)]
        names = sim.flat.names
        sizes = [int(np.prod(s)) for s in sim.flat.shapes]
    assert mal.sum() == 1
    np.testing.assert_array_equal(rows["base"][~mal], rows["chameleon"][~mal])
    offsets = np.cumsum([0, *sizes])
    for name in ("['params']['hidden']['kernel']", "['params']['out']['kernel']"):
        i = names.index(name)
        cols = slice(offsets[i], offsets[i + 1])
        assert np.abs(rows["base"][mal, cols] - rows["chameleon"][mal, cols]).max() > 1e-4


# -------------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({"trigger": "edge_case"}, "trigger"),
        ({"temperature": 0.0}, "temperature"),
        ({"fac_scale": float("nan")}, "fac_scale"),
        ({"obstructor_scale": -1.0}, "obstructor_scale"),
        ({"contrastive_fraction": 1.0}, "contrastive_fraction"),
        ({"target": 12}, "target"),
    ],
)
def test_bad_options_are_rejected_before_the_run(opts, match):
    items = tuple(("chameleon", k, str(v)) for k, v in opts.items())
    with pytest.raises(ValueError, match=match):
        Config(**{**TINY, "attack": "chameleon"}, attack_opts=items).validate()


def test_needs_the_model_and_its_classifier_layer():
    variables = {"params": {"a": jnp.zeros((3,)), "out": {"kernel": jnp.zeros((3, 2))}}}
    flat = Flattener.build(variables)
    base = dict(image_shape=(32, 32, 3), mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(ValueError, match=r"AttackEnv\.model"):
        get_attack("chameleon", AttackEnv(**base, output_layer="out"))
    for layer in ("", "cls"):
        with pytest.raises(ValueError, match="classifier layer"):
            get_attack(
                "chameleon", AttackEnv(**base, model=ModelOps(flat, None), output_layer=layer)
            )
    attack = get_attack(
        "chameleon", AttackEnv(**base, model=ModelOps(flat, None), output_layer="out")
    )
    assert attack.hook is not None and attack.hook.objective is not None and attack.target == 2


@pytest.mark.parametrize("trigger", ["base", "badnets", "pixel", "pattern", "blended", "dba"])
def test_every_trigger_builds_and_stamps_like_its_data_attack(trigger):
    env = AttackEnv(
        (32, 32, 3),
        (0.5,) * 3,
        (0.25,) * 3,
        num_malicious=2,
        model=ModelOps(Flattener.build({"params": {"out": {"b": jnp.zeros(2)}}}), None),
        output_layer="out",
    )
    cham = get_attack("chameleon", env, trigger=trigger, target=4, poison_rate=0.5)
    plain = get_attack(trigger, env, target=4, poison_rate=0.5)
    x = jnp.asarray(np.random.RandomState(0).randn(4, 32, 32, 3).astype(np.float32))
    y = jnp.arange(4, dtype=jnp.int32)
    flags = jnp.asarray([True, False, True, False])
    k = jax.random.key(0)
    for a, b in zip(cham.apply(x, y, flags, 1, k, ()), plain.apply(x, y, flags, 1, k), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert plain.test is not None
    for a, b in zip(cham.test(x, y, ()), plain.test(x, y), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert cham.poison_rate == 0.5 and cham.target == 4


# ------------------------------------------------------------------------------- the CLI
def test_cli_two_rounds(tmp_path, blobs, monkeypatch):
    """`--attack chameleon+pgd` with trigger and weight options through the CLI (on blobs,
    MNIST-shaped): 2 rounds logged, R measured on the attack's own trigger."""
    from spmc_jax.train import main

    monkeypatch.setattr("spmc_jax.data.load_dataset", lambda *a, **k: blobs)
    args = [
        *("--dataset", "mnist", "--model", "mlp", "--subsample", "400", "--clients", "4"),
        *("--rounds", "2", "--local-epochs", "1", "--batch-size", "16", "--gamma", "0.25"),
        *("--attack", "chameleon+pgd", "--attack-opt", "chameleon.trigger=pattern"),
        *("--attack-opt", "chameleon.fac_scale=2", "--partition", "iid", "--quiet"),
        *("--eval-batch", "300", "--out", str(tmp_path)),
    ]
    assert main(args) == 0
    rows = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(0.0 <= r["R"] <= 100.0 and r["nonfinite"] == 0 for r in rows)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["r_trigger"] == "attack"
    assert ["chameleon", "trigger", "pattern"] in summary["config"]["attack_opts"]


def test_attack_help_lists_chameleon_with_its_paper_and_options():
    from spmc_jax.train import list_registry

    lines = list_registry("attack").splitlines()
    i = next(k for k, line in enumerate(lines) if line.split()[:1] == ["chameleon"])
    assert "Dai & Li" in lines[i + 1] and "ICML 2023" in lines[i + 1]
    assert "trigger='base'" in lines[i + 2] and "contrastive_fraction=0.75" in lines[i + 2]
    heading = max(k for k, line in enumerate(lines[:i]) if not line.startswith(" "))
    assert "own training objective" in lines[heading]
