"""Training-time (client-hook) attacks: Neurotoxin's mask against its oracle, benign clients
untouched, and 2-round runs on blobs whose numbers they change."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spmc_jax.attacks import REGISTRY, AttackEnv, get_attack, parse_attack, parse_client_attacks
from spmc_jax.attacks import a3fl as a3fl_mod
from spmc_jax.attacks.neurotoxin import keep_mask
from spmc_jax.client import ClientHook, GradContext, ModelOps, ServerContext
from spmc_jax.config import Config
from spmc_jax.engine import run
from spmc_jax.flat import Flattener
from tests.client_runs import TINY, plain_fedavg
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


def test_neurotoxin_and_alter_min_run_change_numbers_and_track_the_global_update(blobs):
    """2 rounds of base+neurotoxin+alter_min (one run for both, to save CI time): after the
    run neurotoxin's state holds g_1 and the oracle's mask of the update g_1 − g_0, alter_min's
    holds δ̂ = g_1 − g_0, and the attackers' training changed the model."""
    cfg = Config(
        **{**TINY, "attack": "base+neurotoxin+alter_min"},
        attack_opts=(("neurotoxin", "ratio", "0.3"),),
    )
    res = run(cfg, blobs)
    assert [h.name for h in res.sim.hooks] == ["neurotoxin", "alter_min"]
    g0 = np.asarray(res.sim.init_flat)
    prev, mask = (np.asarray(a) for a in res.state.hooks[0])
    pm = res.sim.flat.param_mask
    np.testing.assert_array_equal(mask[pm], oracle.neurotoxin_mask(g0[pm], prev[pm], 0.3))
    prev_a, est = (np.asarray(a) for a in res.state.hooks[1])
    np.testing.assert_array_equal(prev_a, prev)
    np.testing.assert_array_equal(est, prev - g0)  # the same float32 subtraction
    assert np.any(est != 0)
    assert not np.array_equal(plain_fedavg(blobs)[1], np.asarray(res.state.global_flat))


# ---------------------------------------------------------------------------------- A3FL
def _linear_env(seed=0, shape=(32, 32, 3)):
    """A linear softmax 'model' on `shape` inputs, for the trigger-search oracles."""
    rng = np.random.RandomState(seed)
    d = int(np.prod(shape))
    w = jnp.asarray(rng.randn(d, 10).astype(np.float32) * 0.05)
    b = jnp.asarray(rng.randn(10).astype(np.float32) * 0.1)
    variables = {"params": {"b": b, "w": w}}
    flat = Flattener.build(variables)

    def logits(v, x):
        return x.reshape(x.shape[0], -1) @ v["params"]["w"] + v["params"]["b"]

    mean, std = ((0.5, 0.4, 0.3), (0.25, 0.2, 0.3)) if shape[-1] == 3 else ((0.13,), (0.31,))
    env = AttackEnv(shape, mean, std, num_classes=10, model=ModelOps(flat, logits))
    x = jnp.asarray(rng.randn(16, *shape).astype(np.float32))
    y = jnp.asarray(rng.randint(0, 10, 16).astype(np.int32))
    return env, flat.ravel(variables), variables, x, y


def _search_4x4(hook, env, g, x, y):
    """One jitted trigger search from the hook's initial state: (state0, ctx, δ, λ, the 4x4
    top-left mask, and the normalised pixel range lo, hi)."""
    s0 = hook.init(g)
    ctx = ServerContext(g, jnp.int32(0), jnp.asarray(True), jax.random.key(0), x, y)
    got, lam = jax.jit(hook.server)(s0, ctx)
    mask = np.zeros((32, 32, 3), bool)
    mask[:4, :4] = True
    lo = (0 - np.array(env.mean)) / np.array(env.std)
    hi = (1 - np.array(env.mean)) / np.array(env.std)
    return s0, ctx, np.asarray(got), lam, mask, lo, hi


def _oracle_search(x, y, p0, variables, mask, lo, hi, steps, **adv):
    """The float64 oracle's search toward label 2 with α = 0.1 (no adversarial model unless
    `adv` gives adv_steps, adv_lr, lam0, every, rule)."""
    adv = {"adv_steps": 0, "adv_lr": 0.0, "lam0": 0.0, "every": steps, "rule": "fixed", **adv}
    w, b = (np.asarray(variables["params"][k], np.float64) for k in ("w", "b"))
    args = (np.asarray(x), np.asarray(y), mask, np.asarray(p0), w, b, 2, 0.1, steps, lo, hi)
    return oracle.a3fl_linear_adaptive_trigger(*args, **adv)


def test_a3fl_trigger_search_matches_oracle():
    env, g, variables, x, y = _linear_env()
    attack = get_attack("a3fl", env, steps=4, alpha=0.1, adv_steps=0, size=4)
    hook = attack.hook
    s0, ctx, got, lam, mask, lo, hi = _search_4x4(hook, env, g, x, y)
    p0 = s0[0]
    want, smallest, _ = _oracle_search(x, y, s0[0], variables, mask, lo, hi, steps=4)
    assert smallest > 1e-6  # every sign well defined in float32
    # Steps of exactly ±0.1 and clips: float32 rounding only (1e-6).
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert not np.allclose(got, np.asarray(p0))
    np.testing.assert_array_equal(got[~mask], 0.0)  # nothing outside the patch
    # Outside the attack window the trigger is kept.
    assert float(lam) == 0.0  # no adversarial model, no weight
    off = jax.jit(hook.server)(s0, ctx._replace(attack_on=jnp.asarray(False)))
    np.testing.assert_array_equal(np.asarray(off[0]), np.asarray(p0))


def test_a3fl_adversarial_model_changes_the_search_and_stays_in_range():
    env, g, _, x, y = _linear_env(1)
    ctx = ServerContext(g, jnp.int32(0), jnp.asarray(True), jax.random.key(0), x, y)
    plain = get_attack("a3fl", env, steps=3, adv_steps=0).hook
    adv = get_attack("a3fl", env, steps=3, adv_steps=3, adv_lr=5.0).hook
    a = np.asarray(plain.server(plain.init(g), ctx)[0])
    b = np.asarray(adv.server(adv.init(g), ctx)[0])
    assert not np.array_equal(a, b)
    lo = (0 - np.array(env.mean)) / np.array(env.std)
    hi = (1 - np.array(env.mean)) / np.array(env.std)
    assert np.all(b >= lo - 1e-6) and np.all(b <= hi + 1e-6)


def test_a3fl_similarity_weight_matches_oracle():
    """λ = λ₀·mean over kernels of cos(θ'_l, θ_g,l) on hand-built params (a conv and a dense
    kernel, biases and a norm scale that take no part), against the float64 oracle."""
    rng = np.random.RandomState(4)
    shapes = {"conv": {"kernel": (3, 3, 2, 4), "bias": (4,)}, "bn": {"scale": (4,)}}
    shapes["dense"] = {"kernel": (8, 3), "bias": (3,)}
    glob = jax.tree.map(
        lambda s: rng.randn(*s).astype(np.float32), shapes, is_leaf=lambda s: isinstance(s, tuple)
    )
    adv = jax.tree.map(lambda a: a + rng.randn(*a.shape).astype(np.float32), glob)
    lam0 = 0.7
    got = float(a3fl_mod.adversarial_weight(adv, glob, lam0, "similarity"))
    leaves_a, leaves_g = jax.tree.leaves(adv), jax.tree.leaves(glob)
    want = lam0 * oracle.kernel_cosine(leaves_a, leaves_g)
    # Two float32 dot products of <= 72 terms: 1e-6 relative.
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert 0.1 < want / lam0 < 0.95  # the perturbation really moved the weight off 1
    # Hand-checked: identical kernels give λ₀, a flipped conv kernel gives mean(−1, 1) = 0.
    assert float(a3fl_mod.adversarial_weight(glob, glob, lam0, "similarity")) == pytest.approx(
        lam0, rel=1e-6
    )
    flipped = {**glob, "conv": {**glob["conv"], "kernel": -glob["conv"]["kernel"]}}
    assert float(a3fl_mod.adversarial_weight(flipped, glob, lam0, "similarity")) == pytest.approx(
        0.0, abs=1e-6
    )
    assert float(a3fl_mod.adversarial_weight(adv, glob, lam0, "fixed")) == pytest.approx(lam0)
    with pytest.raises(ValueError, match="no kernel"):
        a3fl_mod.kernel_cosine({"b": jnp.ones(3)}, {"b": jnp.ones(3)})


@pytest.mark.parametrize("rule", ["similarity", "fixed"])
def test_a3fl_adaptive_search_matches_oracle(rule):
    """The whole search with the adversarial model (re-crafted every 2 of 4 steps) and its
    weight rule against the float64 oracle on a linear model."""
    env, g, variables, x, y = _linear_env(5)
    kw = dict(steps=4, alpha=0.1, adv_steps=2, adv_lr=0.5, adv_weight=3.0, adv_every=2)
    hook = get_attack("a3fl", env, size=4, weight_rule=rule, **kw).hook
    s0, _, got, lam, mask, lo, hi = _search_4x4(hook, env, g, x, y)
    p0 = s0[0]
    adv = dict(adv_steps=2, adv_lr=0.5, lam0=3.0, every=2, rule=rule)
    want, smallest, lams = _oracle_search(x, y, p0, variables, mask, lo, hi, steps=4, **adv)
    assert smallest > 1e-3  # every sign well defined in float32
    assert len(lams) == 2
    # The state keeps the last block's λ (float32 cosines: 1e-5 relative).
    np.testing.assert_allclose(float(lam), lams[-1], rtol=1e-5)
    if rule == "similarity":
        assert all(2.0 < lam < 2.5 for lam in lams)  # the unlearning moved W: sim ≈ 0.71
    # Steps of exactly ±0.1 and clips: float32 rounding only (1e-6).
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert not np.allclose(got, np.asarray(p0))


def test_a3fl_weight_rule_reaches_the_search():
    """The similarity rule and the fixed rule give different triggers once θ' has moved."""
    env, g, _, x, y = _linear_env(5)
    ctx = ServerContext(g, jnp.int32(0), jnp.asarray(True), jax.random.key(0), x, y)
    kw = dict(steps=3, adv_steps=3, adv_lr=2.0, adv_weight=3.0)
    a = get_attack("a3fl", env, weight_rule="similarity", **kw).hook
    b = get_attack("a3fl", env, weight_rule="fixed", **kw).hook
    assert not np.array_equal(
        np.asarray(a.server(a.init(g), ctx)[0]), np.asarray(b.server(b.init(g), ctx)[0])
    )
    with pytest.raises(ValueError, match="weight_rule"):
        get_attack("a3fl", env, weight_rule="cosine")
    with pytest.raises(ValueError, match="adv_every"):
        get_attack("a3fl", env, adv_every=-1)
    # A model without a kernel has no similarity to weigh by: refused before any compute.
    variables = {"params": {"b": jnp.zeros(10)}}
    no_kernel = AttackEnv(
        env.image_shape,
        env.mean,
        env.std,
        num_classes=10,
        model=ModelOps(Flattener.build(variables), lambda v, x: v["params"]["b"][None]),
    )
    with pytest.raises(ValueError, match="needs a model with a kernel"):
        get_attack("a3fl", no_kernel)
    get_attack("a3fl", no_kernel, weight_rule="fixed")


def test_a3fl_stamps_only_flagged_samples_with_the_state():
    env, _, _, x, y = _linear_env()
    attack = get_attack("a3fl", env, size=3)
    pattern = jnp.full((32, 32, 3), 7.0)
    flags = jnp.arange(16) % 2 == 0
    xo, yo = attack.apply(x, y, flags, 0, jax.random.key(0), (pattern, jnp.float32(0)))
    xo, yo = np.asarray(xo), np.asarray(yo)
    np.testing.assert_array_equal(xo[1::2], np.asarray(x)[1::2])
    np.testing.assert_array_equal(yo[1::2], np.asarray(y)[1::2])
    assert np.all(xo[::2, :3, :3] == 7.0) and np.all(yo[::2] == 2)
    np.testing.assert_array_equal(xo[::2, 3:], np.asarray(x)[::2, 3:])
    xt, yt = attack.test(x, y, (pattern, jnp.float32(0)))
    assert np.all(np.asarray(xt)[:, :3, :3] == 7.0) and np.all(np.asarray(yt) == 2)


def test_a3fl_run_optimises_the_trigger_and_evaluates_it(blobs):
    """2 rounds of a3fl through `run`: the trigger state moved off its white-patch start,
    stayed inside the patch, and R is measured with it (a finite number differing from the
    static-trigger run's)."""
    cfg = Config(**{**TINY, "attack": "a3fl"})
    res = run(cfg, blobs)
    sim = res.sim
    pattern = np.asarray(res.state.hooks[0][0])
    start = np.asarray(sim.data_attack.hook.init(sim.init_flat)[0])
    assert not np.array_equal(pattern, start)
    np.testing.assert_array_equal(pattern[5:], 0.0)
    assert sim.r_trigger == "attack"
    assert res.history[-1]["R"] is not None
    assert not np.array_equal(plain_fedavg(blobs)[1], np.asarray(res.state.global_flat))


def test_a3fl_weight_rule_option_reaches_the_run(blobs):
    """`--attack-opt a3fl.weight_rule=...` reaches a 2-round run: the λ its last trigger
    search used is λ₀ = 3 with `fixed`, and λ₀·sim(θ', θ_g) < λ₀ with `similarity` once θ'
    is strongly unlearned (adv_lr 5)."""
    opts = (("a3fl", "adv_lr", "5"), ("a3fl", "adv_weight", "3"))
    lams = {}
    for rule in ("similarity", "fixed"):
        cfg = Config(
            **{**TINY, "attack": "a3fl"}, attack_opts=(*opts, ("a3fl", "weight_rule", rule))
        )
        lams[rule] = float(run(cfg, blobs).state.hooks[0][1])
    assert lams["fixed"] == 3.0
    assert 0.0 < lams["similarity"] < 2.99


# ----------------------------------------------------------------------------------- IBA
def test_iba_conv_trigger_matches_oracle_and_is_bounded():
    env, _, _, x, y = _linear_env(2)
    attack = get_attack("iba", env, eps=0.1, generator="conv", width=4)
    gen = attack.hook.init(None)
    flags = jnp.arange(16) % 2 == 0
    xo, yo = jax.jit(attack.apply)(x, y, flags, 0, jax.random.key(0), gen)
    xo, x_np = np.asarray(xo, np.float64), np.asarray(x, np.float64)
    want = oracle.iba_trigger(jax.tree.map(np.asarray, gen), x_np, 0.1, np.array(env.std))
    # float32 convolutions of O(1) values over 9·C terms: 1e-5 absolute after tanh.
    np.testing.assert_allclose(xo[::2] - x_np[::2], want[::2], atol=1e-5)
    np.testing.assert_array_equal(xo[1::2], x_np[1::2])
    np.testing.assert_array_equal(np.asarray(yo)[1::2], np.asarray(y)[1::2])
    assert np.all(np.asarray(yo)[::2] == 2)
    # |T(x)| <= eps in pixel units (times std back from normalised units).
    assert np.all(np.abs((xo - x_np) * np.array(env.std)) <= 0.1 + 1e-6)


@pytest.mark.parametrize(
    "shape, depth",
    [((28, 28, 1), 3), ((32, 32, 3), 1)],  # 28 → 14 → 7 → 3: odd sizes floor, resize back
)
def test_iba_unet_matches_oracle_and_is_bounded(shape, depth):
    """The U-Net generator's trigger against the float64 oracle, for 1- and 3-channel
    images: same shape as the input, ‖T‖∞ ≤ ε in pixels, only flagged samples touched."""
    env, _, _, x, y = _linear_env(2, shape)
    eps = 0.1
    attack = get_attack("iba", env, eps=eps, width=4, depth=depth)
    gen = attack.hook.init(None)
    widths = {k: v["kernel"].shape[-1] for k, v in gen.items()}
    assert widths["bottleneck_0"] == 4 * 2**depth and widths["out"] == shape[-1]
    # The up blocks read [up-sampled, skip]: width·2^(i+1) + width·2^i input channels.
    assert gen["up0_0"]["kernel"].shape[2] == 4 * 2 + 4
    flags = jnp.arange(16) % 2 == 0
    xo, yo = jax.jit(attack.apply)(x, y, flags, 0, jax.random.key(0), gen)
    assert xo.shape == x.shape
    xo, x_np = np.asarray(xo, np.float64), np.asarray(x, np.float64)
    std = np.array(env.std)
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), gen)
    want = eps * np.tanh(oracle.unet_generator(params, x_np, depth)) / std
    # float32 convolutions through 6-8 layers of O(0.1) activations: ~1e-7 relative, 2e-7
    # absolute after ε·tanh/std; the trigger itself varies by ~1e-3 across pixels.
    np.testing.assert_allclose(xo[::2] - x_np[::2], want[::2], rtol=0, atol=2e-7 / min(std))
    assert np.std(want[::2]) > 2e-4  # a trigger that varies, not a constant
    np.testing.assert_array_equal(xo[1::2], x_np[1::2])
    assert np.all(np.asarray(yo)[::2] == 2)
    np.testing.assert_array_equal(np.asarray(yo)[1::2], np.asarray(y)[1::2])
    assert np.all(np.abs((xo - x_np) * std) <= eps * (1 + 1e-6))
    xt, yt = jax.jit(attack.test)(x, y, gen)
    assert np.all(np.abs((np.asarray(xt, np.float64) - x_np) * std) <= eps * (1 + 1e-6))
    assert np.all(np.asarray(yt) == 2)


def test_iba_bad_generator_options_are_rejected():
    env, *_ = _linear_env(0, (28, 28, 1))
    with pytest.raises(ValueError, match="generator='gan'"):
        get_attack("iba", env, generator="gan")
    with pytest.raises(ValueError, match="depth=5"):
        get_attack("iba", env, depth=5)  # 28 / 2^5 < 1
    with pytest.raises(ValueError, match="width=0"):
        get_attack("iba", env, width=0)


@pytest.mark.parametrize("generator", ["unet", "conv"])
def test_iba_generator_step_lowers_the_target_loss(generator, blobs):
    """A few generator steps against a fixed model lower the backdoor (target-label) loss, on
    blobs' 28x28x1 images and a linear model."""
    env, g, variables, _, y = _linear_env(3, (28, 28, 1))
    pixels = blobs.x_train[:32].astype(np.float32) / 255.0
    x = jnp.asarray((pixels - env.mean[0]) / env.std[0])
    y = jnp.asarray(blobs.y_train[:32].astype(np.int32))
    opts = dict(generator=generator, gen_steps=3, gen_lr=0.5, width=4, depth=1)
    attack = get_attack("iba", env, **opts)
    hook = attack.hook
    gen0 = hook.init(g)
    ctx = ServerContext(g, jnp.int32(0), jnp.asarray(True), jax.random.key(0), x, y)
    gen1 = jax.jit(hook.server)(gen0, ctx)

    @jax.jit
    def target_loss(gen):
        xt, _ = attack.test(x, y, gen)
        logits = env.model.logits(variables, xt)
        return -jnp.mean(jax.nn.log_softmax(logits)[:, 2])

    assert float(target_loss(gen1)) < float(target_loss(gen0))
    off = jax.jit(hook.server)(gen0, ctx._replace(attack_on=jnp.asarray(False)))
    for a, b in zip(jax.tree.leaves(off), jax.tree.leaves(gen0), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_iba_run_trains_the_generator(blobs):
    cfg = Config(
        **{**TINY, "attack": "iba"},
        attack_opts=(("iba", "gen_steps", "2"), ("iba", "width", "2"), ("iba", "depth", "1")),
    )
    res = run(cfg, blobs)
    gen0 = res.sim.data_attack.hook.init(None)
    assert "bottleneck_0" in gen0  # the default generator is the U-Net
    moved = [
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(res.state.hooks[0]), jax.tree.leaves(gen0), strict=True)
    ]
    assert all(moved)
    assert res.history[-1]["R"] is not None and res.sim.r_trigger == "attack"
    assert not np.array_equal(plain_fedavg(blobs)[1], np.asarray(res.state.global_flat))


# ------------------------------------------------------------------------------ alter_min
def test_alter_min_joint_matches_oracle():
    env, flat = _toy_env()
    env = AttackEnv(
        env.image_shape,
        env.mean,
        env.std,
        num_malicious=1,
        n_clients=4,
        param_mask=env.param_mask,
        model=env.model,
    )
    hook = get_attack("alter_min", env, rho=0.3, mode="joint")
    rng = np.random.RandomState(5)
    g0, g1 = (jnp.asarray(rng.randn(flat.dim).astype(np.float32)) for _ in range(2))
    state = hook.server(hook.init(g0), _server_ctx(g1))
    est = np.asarray(g1, np.float64) - np.asarray(g0)
    np.testing.assert_allclose(np.asarray(state[1]), est, atol=1e-6)
    # Rows: boosting by n/m = 4 on the 17 parameter columns of the malicious rows only.
    W = jnp.asarray(rng.randn(4, flat.dim).astype(np.float32))
    mal = np.array([False, True, False, True])
    from spmc_jax.client import RowsContext

    ctx = RowsContext(g1, jnp.asarray(mal), jnp.asarray(True), jax.random.key(0), state)
    out = np.asarray(hook.rows(W, ctx))
    want = oracle.alter_min_rows(np.asarray(W)[:, :17], np.asarray(g1)[:17], est[:17], mal, 4.0)
    # float32 products of O(1) values boosted x4: 1e-5 absolute.
    np.testing.assert_allclose(out[:, :17], want, atol=1e-5)
    np.testing.assert_array_equal(out[:, 17:], np.asarray(W)[:, 17:])  # BN-like columns
    np.testing.assert_array_equal(out[~mal], np.asarray(W)[~mal])
    off = hook.rows(W, ctx._replace(attack_on=jnp.asarray(False)))
    np.testing.assert_array_equal(np.asarray(off), np.asarray(W))
    # Gradient: + 2ρ(w − w_g − δ̂) for an attacker in the window, untouched otherwise.
    params = flat.unravel(g1 + 0.5)["params"]
    gparams = flat.unravel(g1)["params"]
    grad = {"a": jnp.ones((3, 4)), "b": jnp.ones((5,))}
    for mal_c, on, expect in ((True, True, True), (False, True, False), (True, False, False)):
        gc = GradContext(
            params, gparams, jnp.asarray(mal_c), jnp.asarray(on), jax.random.key(0), state
        )
        got = hook.grad(grad, gc)
        e = flat.unravel(jnp.asarray(est, jnp.float32))["params"]
        for k in ("a", "b"):
            want_k = (
                oracle.alter_min_grad(
                    1.0, np.asarray(params[k]), np.asarray(gparams[k]), np.asarray(e[k]), 0.3
                )
                if expect
                else np.ones_like(np.asarray(grad[k]))
            )
            np.testing.assert_allclose(np.asarray(got[k]), want_k, atol=1e-5)


class _Linear(nn.Module):
    """logits = flatten(x) @ K + b (the oracle's linear softmax model)."""

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(3, name="out")(x.reshape(x.shape[0], -1))


def test_alter_min_alternating_local_training_matches_oracle():
    """The attacker's local training alternates: step 0 of each cycle of 1 + k steps is a
    λ-boosted step on its poisoned samples only, steps 1..k are stealth steps on its clean
    samples + 2ρ(w − w_0 − δ̂); no final boosting. Checked step for step against the float64
    oracle on a linear softmax model (12 inputs), 2 epochs of 5 batches of 4 (cycles restart
    each epoch), k = 2; a benign client's training is plain SGD. Tolerance: 10 float32 SGD
    steps on O(1) values: ATOL 1e-5."""
    from spmc_jax.attacks.base import DataAttack
    from spmc_jax.client import ClientData, ClientTask, collect_hooks, epoch_order, make_local_train

    rng = np.random.RandomState(3)
    n, bsz, target, lr, rho, k = 20, 4, 2, 0.5, 0.2, 2
    x = rng.randint(0, 256, (n, 2, 2, 3)).astype(np.uint8)
    y = rng.randint(0, 3, n).astype(np.int32)
    poison = rng.rand(n) < 0.4
    model = _Linear()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 2, 2, 3)))
    flat = Flattener.build(variables)
    env = AttackEnv(
        (2, 2, 3), (0.5,) * 3, (0.5,) * 3, num_malicious=1, n_clients=4,
        param_mask=flat.param_mask, model=ModelOps(flat, None),
    )  # fmt: skip
    hook = get_attack("alter_min", env, rho=rho, stealth_steps=k)
    assert hook.rows is None and hook.sample_weights is not None
    g0 = flat.ravel(variables)
    g_prev = jnp.asarray(rng.randn(flat.dim).astype(np.float32) * 0.1)
    state = hook.server(hook.init(g_prev), _server_ctx(g0))
    est = flat.unravel(state[1])["params"]["out"]

    def flip(xb, yb, flags, rank, key):
        return xb, jnp.where(flags, target, yb)

    attack = DataAttack(poison_rate=0.4, apply=flip, test=None, target=target)
    hooks = collect_hooks(attack, [hook])

    def transform(key, xb):
        return xb.astype(jnp.float32) / 255.0 - 0.5

    local = make_local_train(
        model, transform, optax.sgd(lr), batch_size=bsz, steps_per_epoch=n // bsz,
        epochs=2, data_attack=attack, hooks=hooks,
    )  # fmt: skip
    train = jax.jit(local)
    data = ClientData(jnp.asarray(x), jnp.asarray(y), jnp.asarray(poison))
    for malicious in (True, False):
        task = ClientTask(
            idx=jnp.arange(n, dtype=jnp.int32), size=jnp.int32(n), malicious=jnp.asarray(malicious),
            rank=jnp.int32(0), key=jax.random.key(9),
        )  # fmt: skip
        out = train(variables, variables, data, task, jnp.asarray(True), (state,))
        batches = []
        for e in range(2):
            perm = np.asarray(epoch_order(task, jnp.int32(e))[0])
            for s_ in range(n // bsz):
                sel = perm[s_ * bsz : (s_ + 1) * bsz]
                flags = poison[sel] & malicious
                xb = x[sel].reshape(bsz, -1) / 255.0 - 0.5
                batches.append((xb, np.where(flags, target, y[sel]), flags, s_))
        p0 = variables["params"]["out"]
        want_k, want_b = oracle.alter_min_alternating_linear(
            np.asarray(p0["kernel"]), np.asarray(p0["bias"]), batches, lr, 4.0, rho,
            np.asarray(est["kernel"], np.float64), np.asarray(est["bias"], np.float64), k,
            malicious,
        )  # fmt: skip
        got = out.variables["params"]["out"]
        np.testing.assert_allclose(np.asarray(got["kernel"]), want_k, atol=1e-5)
        np.testing.assert_allclose(np.asarray(got["bias"]), want_b, atol=1e-5)
        if malicious:  # not plain training on the poisoned batches: the alternation ran
            plain = oracle.alter_min_alternating_linear(
                np.asarray(p0["kernel"]), np.asarray(p0["bias"]), batches, lr, 4.0, rho,
                np.asarray(est["kernel"], np.float64), np.asarray(est["bias"], np.float64),
                k, False,
            )  # fmt: skip
            assert np.abs(want_k - plain[0]).max() > 1e-2


def test_alter_min_mode_reaches_the_run(blobs):
    """2-round runs of base+alter_min: the alternating default (no row transform) and
    mode=joint (the final boosting) both change the model away from plain FedAvg under the
    same data attack, and differently from each other."""
    plain = plain_fedavg(blobs)[1]
    out = {}
    for mode in ("alternating", "joint"):
        cfg = Config(
            **{**TINY, "attack": "base+alter_min"}, attack_opts=(("alter_min", "mode", mode),)
        )
        res = run(cfg, blobs)
        assert (res.sim.hooks[0].rows is None) == (mode == "alternating")
        out[mode] = np.asarray(res.state.global_flat, np.float64)
        assert np.isfinite(out[mode]).all() and np.abs(out[mode] - plain).max() > 1e-4
    assert np.abs(out["alternating"] - out["joint"]).max() > 1e-4


@pytest.mark.parametrize(
    ("opts", "match"),
    [({"mode": "mixed"}, "mode='mixed'"), ({"stealth_steps": 0}, "stealth_steps=0")],
)
def test_alter_min_rejects_bad_options(opts, match):
    env, _ = _toy_env()
    with pytest.raises(ValueError, match=match):
        get_attack("alter_min", env, **opts)
