"""Issue 15 part A attacks against float64 NumPy oracles (tests/reference/attacks_a_oracle.py)
and 2-round runs through the real Simulation showing each one fired.

The registry-wide contracts (unflagged samples / benign rows unchanged, determinism, the
1-round CLI run) cover these attacks too: tests/attacks/test_{data,model}_attacks.py and
tests/test_attacks_e2e.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmc_jax.attacks import AttackEnv, get_attack
from spmc_jax.attacks.fang_krum import fang_krum_lambda
from spmc_jax.attacks.mimic import mimic_index
from tests.reference import attacks_a_oracle as oracle

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2615)
ENV = AttackEnv((32, 32, 3), MEAN, STD, num_malicious=3, n_clients=10)
# float32 round trip of an affine per-channel map on values of order 1-5.
F32_ATOL = 1e-5


def _batch(b=12, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, 32, 32, 3)).astype(np.float32)
    y = (np.arange(b) % 10).astype(np.int32)
    flags = np.arange(b) % 3 != 1
    return jnp.asarray(x), jnp.asarray(y), jnp.asarray(flags)


def _apply(attack, x, y, flags, rank=0, key=0):
    return jax.jit(attack.apply)(x, y, flags, jnp.int32(rank), jax.random.key(key))


# ---------------------------------------------------------------------------- triggers


@pytest.mark.parametrize(("opts", "origin"), [({}, (3, 23)), ({"row": 0, "col": 0}, (0, 0))])
def test_pattern_matches_backdoors101_oracle(opts, origin):
    attack = get_attack("pattern", ENV, **opts)
    x, y, flags = _batch()
    xo, yo = _apply(attack, x, y, flags)
    f = np.asarray(flags)
    want = oracle.stamp_cells(np.asarray(x), oracle.PATTERN_CELLS, *origin, MEAN, STD)
    np.testing.assert_allclose(np.asarray(xo)[f], want[f], atol=F32_ATOL)
    np.testing.assert_array_equal(np.asarray(xo)[~f], np.asarray(x)[~f])
    np.testing.assert_array_equal(np.asarray(yo)[f], 2)
    # Exactly the 9 pattern cells, on all 3 channels, changed.
    assert int(np.sum(np.asarray(xo)[f][0] != np.asarray(x)[f][0])) == 27
    xt, yt = attack.test(x, y)  # the backdoor test set: every image stamped
    np.testing.assert_allclose(np.asarray(xt), want, atol=F32_ATOL)
    np.testing.assert_array_equal(np.asarray(yt), 2)


@pytest.mark.parametrize(
    ("opts", "pix"),
    [({}, (31, 31)), ({"position": "5,7"}, (5, 7)), ({"position": "top_left"}, (0, 0))],
)
def test_pixel_single_pixel_oracle(opts, pix):
    attack = get_attack("pixel", ENV, target=4, **opts)
    x, y, flags = _batch()
    xo, yo = _apply(attack, x, y, flags)
    f = np.asarray(flags)
    want = oracle.stamp_cells(np.asarray(x), [(0, 0, 1.0)], *pix, MEAN, STD)
    np.testing.assert_allclose(np.asarray(xo)[f], want[f], atol=F32_ATOL)
    assert int(np.sum(np.asarray(xo)[f][0] != np.asarray(x)[f][0])) == 3
    np.testing.assert_array_equal(np.asarray(yo)[f], 4)
    xa, _ = _apply(get_attack("pixel", ENV, value=2.5, after_norm=True, **opts), x, y, flags)
    np.testing.assert_array_equal(np.asarray(xa)[f][:, pix[0], pix[1], :], 2.5)


def test_label_flip_targeted_oracle():
    attack = get_attack("label_flip_targeted", ENV, source=1, target=7)
    x, y, flags = _batch(b=30)
    xo, yo = _apply(attack, x, y, flags)
    np.testing.assert_array_equal(np.asarray(xo), np.asarray(x))
    want = oracle.label_flip_targeted(np.asarray(y), np.asarray(flags), 1, 7)
    np.testing.assert_array_equal(np.asarray(yo), want)
    assert (want != np.asarray(y)).sum() == 2  # the flagged ones among the three 1s
    default = get_attack("label_flip_targeted", ENV)
    _, yd = _apply(default, x, y, flags)
    np.testing.assert_array_equal(
        np.asarray(yd), oracle.label_flip_targeted(np.asarray(y), np.asarray(flags), 5, 3)
    )
    assert default.test is None and default.target is None


@pytest.mark.parametrize(
    ("trigger", "twin"), [("pattern", "pattern"), ("pixel", "pixel"), ("square", "badnets")]
)
def test_all2one_and_all2all_triggers(trigger, twin):
    x, y, flags = _batch()
    f = np.asarray(flags)
    xo, yo = _apply(get_attack("all2one", ENV, trigger=trigger, target=6), x, y, flags)
    xt, _ = _apply(get_attack(twin, ENV), x, y, flags)
    np.testing.assert_array_equal(np.asarray(xo), np.asarray(xt))  # same trigger image
    np.testing.assert_array_equal(np.asarray(yo)[f], 6)
    a2a = get_attack("all2all", ENV, trigger=trigger)
    xa, ya = _apply(a2a, x, y, flags)
    np.testing.assert_array_equal(np.asarray(xa), np.asarray(xt))
    np.testing.assert_array_equal(np.asarray(ya), oracle.all2all_labels(y, f, 10))
    _, yts = a2a.test(x, y)
    np.testing.assert_array_equal(np.asarray(yts), (np.asarray(y) + 1) % 10)
    assert a2a.target == -1  # no label equals it: R_excl_target excludes nothing


@pytest.mark.parametrize(
    ("name", "opts"),
    [
        ("pattern", {"row": 28}),
        ("pattern", {"col": 30}),
        ("pattern", {"target": 10}),
        ("pixel", {"position": "32,0"}),
        ("pixel", {"value": 3.0}),
        ("label_flip_targeted", {"source": 3, "target": 3}),
        ("label_flip_targeted", {"source": 10}),
        ("all2one", {"trigger": "star"}),
        ("all2all", {"trigger": "star"}),
        ("all2all", {"poison_rate": 1.5}),
        ("fang_krum", {"threshold": 0.0}),
        ("fang_trmean", {"b": 1.0}),
        ("fang_trmean", {"space": "grads"}),
        ("spmc_evade", {"level": "p90"}),
        ("spmc_evade", {"space": "grads"}),
        ("spmc_evade", {"boost": 0.0}),
        ("spmc_evade", {"steps": 0}),
    ],
)
def test_rejects_bad_options(name, opts):
    with pytest.raises(ValueError):
        get_attack(name, ENV, **opts)


def test_fang_krum_runs_outside_krums_condition():
    # m = 5 <= 2c + 1: the bound's m - 2c - 1 is clamped to 1; the attack still runs.
    env = AttackEnv((32, 32, 3), MEAN, STD, num_malicious=2, n_clients=5)
    rng = np.random.default_rng(0)
    W = jnp.asarray(rng.normal(size=(5, 12)), jnp.float32)
    mal = jnp.asarray([False, False, False, True, True])
    out = np.asarray(get_attack("fang_krum", env).apply(W, W[0], mal, jax.random.key(0)))
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[:3], np.asarray(W)[:3])
    np.testing.assert_array_equal(out[3], out[4])


# ------------------------------------------------------------------------ model attacks

N, M, D = 10, 3, 40
MAL = np.arange(N) >= N - M
BEN = ~MAL
MENV = AttackEnv((32, 32, 3), (0.5,) * 3, (0.25,) * 3, num_malicious=M, n_clients=N)


def _problem(seed=0, scale=0.1, offset=0.0, spread=0.5):
    rng = np.random.default_rng(seed)
    g = (offset + rng.normal(size=D)).astype(np.float32)
    common = rng.normal(size=D)
    U = scale * (common + spread * rng.normal(size=(N, D)))
    return jnp.asarray((g + U).astype(np.float32)), jnp.asarray(g)


def _run(attack, W, g, key=0):
    return np.asarray(jax.jit(attack.apply)(W, g, jnp.asarray(MAL), jax.random.key(key)))


@pytest.mark.parametrize(("seed", "spread"), [(0, 1.0), (1, 2.0), (2, 3.0), (0, 0.5)])
def test_fang_krum_lambda_matches_oracle_and_krum_picks_it(seed, spread):
    W, g = _problem(seed, spread=spread)
    U = np.asarray(W - g, np.float64)
    lam, _ = jax.jit(fang_krum_lambda, static_argnums=(3, 4))(
        W - g, jnp.asarray(MAL), jnp.asarray(BEN), M, 1e-5
    )
    want = oracle.fang_krum_lambda(U, BEN)
    # The halving sequence is lambda_0 / 2^k: float32 lambda_0 within 1e-5 relative, and
    # the same k unless Krum's decision flips at ~1e-6 relative distance differences.
    np.testing.assert_allclose(float(lam), want, rtol=1e-5)
    out = _run(get_attack("fang_krum", MENV), W, g)
    s = oracle.fang_direction(U, BEN)
    want_rows = np.broadcast_to(np.asarray(g) - want * s, out[MAL].shape)
    np.testing.assert_allclose(out[MAL], want_rows, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out[BEN], np.asarray(W)[BEN])
    if spread >= 1.0:  # heterogeneous benign updates: Krum picks the crafted model
        assert want >= 1e-5 and MAL[oracle.krum_select(out.astype(np.float64), M)]
    else:  # a tight benign cluster: lambda halves below the threshold (the paper's stop)
        assert want < 1e-5


@pytest.mark.parametrize("space", ["weights", "updates"])
def test_fang_trmean_draws_in_oracle_intervals(space):
    W, g = _problem(3, offset=0.3)
    out = _run(get_attack("fang_trmean", MENV, space=space), W, g, key=5)
    U = np.asarray(W - g, np.float64)
    s = oracle.fang_direction(U, BEN)
    base = np.asarray(W, np.float64) if space == "weights" else U
    lo, hi = oracle.fang_trmean_bounds(base, BEN, s, 2.0)
    got = out[MAL].astype(np.float64) - (0.0 if space == "weights" else np.asarray(g))
    tol = 1e-6  # float32 rounding of values of order 1
    lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)  # w/b lies above w when w < 0
    assert np.all(got >= lo - tol) and np.all(got <= hi + tol)
    # Beyond the benign range, against the direction of change.
    B = base[BEN]
    assert np.all(np.where(s > 0, got <= B.min(0) + tol, got >= B.max(0) - tol))
    assert not np.allclose(got[0], got[1])  # independent draws per attacker
    np.testing.assert_array_equal(out[BEN], np.asarray(W)[BEN])


def test_fang_trmean_pushes_trimmed_mean_against_direction():
    W, g = _problem(4)
    out = _run(get_attack("fang_trmean", MENV, space="updates"), W, g, key=1)
    U0 = np.asarray(W - g, np.float64)
    U1 = out.astype(np.float64) - np.asarray(g)
    s = oracle.fang_direction(U0, BEN)

    def trmean(X, k=M):
        return np.sort(X, axis=0)[k : len(X) - k].mean(axis=0)

    # Each coordinate of the trimmed mean moves against s (or stays, never with it).
    moved = s * (trmean(U1) - trmean(U0))
    assert np.all(moved <= 1e-7) and np.mean(moved < 0) > 0.9


@pytest.mark.parametrize("seed", [0, 5, 9])
def test_mimic_copies_oracle_client(seed):
    W, g = _problem(seed, spread=2.0)
    out = _run(get_attack("mimic", MENV), W, g)
    U = np.asarray(W - g, np.float64)
    i = oracle.mimic_index(U, BEN)
    assert int(jax.jit(mimic_index)(W - g, jnp.asarray(BEN))) == i
    for r in np.flatnonzero(MAL):
        np.testing.assert_array_equal(out[r], np.asarray(W)[i])  # bit-identical copy
    np.testing.assert_array_equal(out[BEN], np.asarray(W)[BEN])


def _backdoored(seed, offset):
    """Benign rows around a common model; each attacker row pushed along its own direction."""
    rng = np.random.default_rng(seed)
    g = offset + rng.normal(size=D)
    W = g + 0.1 * (rng.normal(size=D) + 0.5 * rng.normal(size=(N, D)))
    W[MAL] += 0.1 * rng.normal(size=(M, D))
    return jnp.asarray(W.astype(np.float32)), jnp.asarray(g.astype(np.float32))


@pytest.mark.parametrize(
    ("space", "level", "boost", "offset"),
    [
        ("updates", "max", 1.0, 0.0),
        ("updates", "median", 3.0, 0.0),
        ("weights", "min", 1.0, 1.0),
    ],
)
def test_spmc_evade_scale_matches_oracle(space, level, boost, offset):
    W, g = _backdoored(7, offset)
    W64, g64 = np.asarray(W, np.float64), np.asarray(g, np.float64)
    want = oracle.spmc_evade_scale(W64, g64, MAL, space, level, boost)
    assert 0.0 < want < boost  # the case is informative: a partial blend
    out = _run(get_attack("spmc_evade", MENV, space=space, level=level, boost=boost), W, g)
    mu = W64[BEN].mean(axis=0)
    dev = W64[MAL] - mu
    s = np.sum((out[MAL] - mu) * dev) / np.sum(dev * dev)  # the common scale applied
    # The scores are float32 (error <= 4e-7) and change by O(0.1) per unit of s here, so
    # the boundary moves by ~1e-5; 30 bisection steps resolve boost / 2^30.
    np.testing.assert_allclose(s, want, atol=1e-4 * boost)
    np.testing.assert_allclose(out[MAL], mu + s * dev, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[BEN], np.asarray(W)[BEN])
    # The attackers now score at the benign level (oracle scores, float32 slack).
    X = out.astype(np.float64) - (g64 if space == "updates" else 0.0)
    phi = oracle.loo_cos(X)
    stat = {"max": np.max, "mean": np.mean, "median": np.median, "min": np.min}[level]
    assert phi[MAL].min() >= stat(phi[BEN]) - 1e-5
    assert oracle.loo_cos(W64 - (g64 if space == "updates" else 0.0))[MAL].min() < stat(phi[BEN])


def test_spmc_evade_keeps_already_benign_level_attackers():
    W, g = _problem(2)  # attackers trained like everyone else: s = boost is feasible or close
    out = _run(get_attack("spmc_evade", MENV, level="min", space="updates"), W, g)
    W64 = np.asarray(W, np.float64)
    want = oracle.spmc_evade_scale(W64, np.asarray(g, np.float64), MAL, "updates", "min", 1.0)
    mu = W64[BEN].mean(axis=0)
    np.testing.assert_allclose(out[MAL], mu + want * (W64[MAL] - mu), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------- 2-round Simulation runs

RUN = dict(
    model="mlp",
    clients=4,
    gamma=0.25,  # one attacker, the last client
    rounds=2,
    local_epochs=1,
    batch_size=16,
    subsample=400,
    partition="iid",  # every client, the attacker too, holds every class
    eval_batch=150,
)


def _simulate(blobs, attack, defense="fedavg", opts=(), **over):
    from spmc_jax.config import Config
    from spmc_jax.engine import run

    cfg = Config(attack=attack, defense=defense, attack_opts=tuple(opts), **{**RUN, **over})
    res = run(cfg, blobs)
    assert all(h["nonfinite"] == 0 for h in res.history)
    return res


@pytest.fixture(scope="module")
def clean_run(blobs):
    return _simulate(blobs, "none")


@pytest.mark.parametrize(
    ("attack", "opts", "r_trigger"),
    [
        ("all2all", (), "attack"),
        ("label_flip_targeted", (("label_flip_targeted", "source", "1"),), "base (probe)"),
    ],
)
def test_data_attack_fires_in_a_run(blobs, clean_run, attack, opts, r_trigger):
    res = _simulate(blobs, attack, opts=opts)
    assert res.sim.r_trigger == r_trigger
    assert res.sim.data_attack is not None
    # Same seed, same sampling: only the attacker's poisoned batches differ.
    assert not np.array_equal(
        np.asarray(res.state.global_flat), np.asarray(clean_run.state.global_flat)
    )
    last = res.history[-1]
    assert 0.0 <= last["A"] <= 100.0 and 0.0 <= last["R"] <= 100.0
    if attack == "all2all":  # target -1: no test image is excluded
        assert last["R_excl_target"] == pytest.approx(last["R"])


def _weights(res):
    ids = [np.asarray(h["client_ids"]) for h in res.history]
    return [np.asarray(h["client_weights"]) for h in res.history], ids


def test_fang_krum_gets_the_attacker_selected(blobs):
    # Label-skewed clients: the benign updates spread enough for Krum to prefer g - lambda s
    # (with iid clients lambda halves below the threshold, the paper's stop).
    res = _simulate(blobs, "fang_krum", defense="krum", partition="dirichlet")
    mal = np.asarray(res.plan.malicious)
    weights, ids = _weights(res)
    # Krum puts all weight on one client: the attacker's crafted model, every round.
    for w, i in zip(weights, ids, strict=True):
        assert mal[i[np.argmax(w)]] and w.max() == pytest.approx(1.0)


def test_fang_trmean_moves_the_model(blobs, clean_run):
    res = _simulate(blobs, "fang_trmean")
    g0 = np.asarray(clean_run.state.global_flat)
    g1 = np.asarray(res.state.global_flat)
    # weights space, b = 2: the attacker's parameters sit up to 2x beyond the benign range,
    # i.e. O(|w|) away, much farther than 2 rounds of SGD moved the model.
    init = np.asarray(res.sim.init_flat)
    assert np.linalg.norm(g1 - g0) > np.linalg.norm(g0 - init)


def test_mimic_attacker_scores_like_its_benign_twin(blobs):
    res = _simulate(blobs, "mimic", defense="spmc")
    mal = np.asarray(res.plan.malicious)
    weights, ids = _weights(res)
    for w, i in zip(weights, ids, strict=True):
        att = w[mal[i]]
        ben = w[~mal[i]]
        # An identical row has an identical leave-one-out cosine, hence the same alpha.
        assert np.isclose(ben, att[0], rtol=1e-6, atol=0).sum() == 1


def test_spmc_evade_lifts_attacker_weight_to_benign_max(blobs):
    res = _simulate(blobs, "base+spmc_evade", defense="spmc")
    mal = np.asarray(res.plan.malicious)
    weights, ids = _weights(res)
    for w, i in zip(weights, ids, strict=True):
        # level "max": the attacker's score >= every benign score, so its alpha too (the
        # float32 score error, <= 4e-7, bounds the slack).
        assert w[mal[i]].min() >= w[~mal[i]].max() * (1 - 1e-6)


# ------------------------------------------------------------------------------ edge case


def test_edge_case_replaces_flagged_samples_with_held_out_source_images(real_dataset):
    cifar = real_dataset("cifar10")  # 32x32x3 source: no resize, an exact float64 oracle
    attack = get_attack("edge_case", ENV, source="cifar10", edge_class=1, n_train=20, n_test=7)
    tr = cifar.x_train[cifar.y_train == 1][:20]
    te = cifar.x_test[cifar.y_test == 1][:7]
    np.testing.assert_array_equal(attack.test_set.x, te)  # held out: the test split
    np.testing.assert_array_equal(attack.test_set.y, np.full(7, 2))
    want = oracle.normalize_uint8(tr, MEAN, STD)  # (20, 32, 32, 3)
    x, y, flags = _batch()
    f = np.asarray(flags)
    xo, yo = _apply(attack, x, y, flags, key=3)
    xo = np.asarray(xo, np.float64)
    for img in xo[f]:  # each flagged sample is one of the edge-case training images
        assert np.abs(want - img).reshape(20, -1).max(axis=1).min() < F32_ATOL
    np.testing.assert_array_equal(xo[~f], np.asarray(x)[~f])
    np.testing.assert_array_equal(np.asarray(yo)[f], 2)
    np.testing.assert_allclose(
        np.asarray(attack.test_set.transform(jnp.asarray(te)), np.float64),
        oracle.normalize_uint8(te, MEAN, STD),
        atol=F32_ATOL,
    )


def test_edge_case_source_choice_and_bad_options(real_dataset):
    from spmc_jax.attacks.edge_case import resolve_source

    assert resolve_source("auto", "mnist") == "fashion_mnist"
    assert resolve_source("auto", "fashion_mnist") == "mnist"
    assert resolve_source("auto", "cifar10") == "mnist"
    real_dataset("mnist")
    for opts in ({"source": "svhn"}, {"edge_class": 10}, {"n_train": 0}, {"target": -1}):
        with pytest.raises(ValueError):
            get_attack("edge_case", ENV, **opts)


def test_edge_case_run_measures_r_on_the_edge_set(blobs, clean_run, real_dataset):
    real_dataset("fashion_mnist")  # the source of an MNIST run ("auto")
    res = _simulate(blobs, "edge_case", opts=(("edge_case", "n_test", "200"),))
    sim = res.sim
    assert sim.r_trigger == "attack" and sim.backdoor_set is not None
    assert not np.array_equal(
        np.asarray(res.state.global_flat), np.asarray(clean_run.state.global_flat)
    )
    # R = 100 - % of the 200 held-out FashionMNIST sneakers predicted as the target.
    bset = sim.backdoor_set
    logits = sim.predict(res.state.global_flat, bset.transform(jnp.asarray(bset.x)))
    asr = 100.0 * np.mean(np.argmax(np.asarray(logits), -1) == 2)
    last = res.history[-1]
    assert last["R"] == pytest.approx(100.0 - asr, abs=1e-3)
    assert last["R_excl_target"] == last["R"]
    assert last["V"] == pytest.approx((last["A"] + last["R"]) / 2, abs=1e-3)


def test_attack_help_lists_the_new_attacks_with_their_papers():
    from spmc_jax.train import list_registry

    text = list_registry("attack")
    for name, paper in [
        ("fang_krum", "Fang et al."),
        ("mimic", "Karimireddy"),
        ("edge_case", "Wang et al."),
        ("pattern", "Bagdasaryan"),
        ("spmc_evade", "SPMC"),
    ]:
        lines = text.splitlines()
        i = next(k for k, line in enumerate(lines) if line.split()[:1] == [name])
        assert lines[i + 1].strip().startswith("paper:") and paper in lines[i + 1], name
