"""3DFed (`three_dfed`): the crafted rows, indicator reading and tuning against the float64
oracle on hand-built matrices, the hook's round trip (record -> read, FedAvg accepts, a
rule keeping one benign model rejects, server noise reads as weak DP), the curvature and
constrained-loss gradient, and a 2-round CLI run under Krum whose indicator feedback
changes the next round (a decoy)."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spmc_jax.engine as engine
from spmc_jax.attacks import AttackEnv, get_attack
from spmc_jax.attacks import three_dfed as td
from spmc_jax.client import GradContext, ModelOps, RowsContext, ServerContext
from spmc_jax.flat import Flattener
from spmc_jax.train import main
from tests.reference import three_dfed_oracle as oracle

C = 4  # classes of the toy model
OPTS = dict(
    weight_scale=5.0,
    group_size=2,
    noise_steps=5,
    noise_lr=0.1,
    noise_momentum=0.9,
    lagrange_step=0.1,
    num_candidate=2,
    indicator_boost=1e5,
    indicator_floor=1e-3,
    decoy_shift=10.0,
)


def _toy(n=6, m=3):
    """Body kernel (5, 3) -> classifier (3, C) + bias, plus a BatchNorm-like leaf."""
    variables = {
        "params": {
            "body": {"kernel": jnp.zeros((5, 3))},
            "out": {"kernel": jnp.zeros((3, C)), "bias": jnp.zeros((C,))},
        },
        "batch_stats": {"m": jnp.zeros((2,))},
    }
    flat = Flattener.build(variables)

    def logits(v, x):
        h = jax.nn.relu(x.reshape(x.shape[0], -1)[:, :5] @ v["params"]["body"]["kernel"])
        return h @ v["params"]["out"]["kernel"] + v["params"]["out"]["bias"]

    env = AttackEnv(
        (2, 2, 3),
        (0.5,) * 3,
        (0.5,) * 3,
        num_classes=C,
        num_malicious=m,
        n_clients=n,
        param_mask=flat.param_mask,
        model=ModelOps(flat, logits),
    )
    return env, flat


def _inputs(seed, n, d):
    rng = np.random.RandomState(seed)
    g = rng.randn(d).astype(np.float32)
    W = (g + 0.1 * rng.randn(n, d)).astype(np.float32)
    return rng, g, W


def test_classifier_head_finds_the_output_layer():
    _env, flat = _toy()
    p = flat.num_params
    head = td.classifier_head(flat, C, p)
    (ker,) = [x for x in flat.layout if x.name == "['params']['out']['kernel']"]
    (bias,) = [x for x in flat.layout if x.name == "['params']['out']['bias']"]
    # neuron c: kernel column c (row-major (3, C)) and bias c
    for c in range(C):
        want = [ker.start + i * C + c for i in range(3)] + [bias.start + c]
        assert head.entries[c].tolist() == want
    assert head.mask.sum() == 3 * C + C and head.mask.size == p


@pytest.mark.parametrize(
    ("malicious", "k", "alpha"),
    [
        ([0, 0, 0, 1, 1, 1], 0, [0.3, 0.7, 0.5]),  # 3 backdoor slots, groups {0,1},{2}
        ([0, 1, 0, 1, 0, 1], 1, [0.9, 0.2, 0.5]),  # 2 backdoor + 1 decoy
        ([1, 0, 1, 0, 1, 1], 9, [0.5, 0.5, 0.5]),  # k clamped to m - 1 = 3 decoys
    ],
)
def test_craft_matches_oracle(malicious, k, alpha):
    _env, flat = _toy()
    p, d, n = flat.num_params, flat.dim, 6
    head = td.classifier_head(flat, C, p)
    rng, g, W = _inputs(3, n, d)
    W[0, 2] = 0.0  # indicator floor: an attacker row equal to g somewhere is harmless
    curv = np.abs(rng.randn(p)).astype(np.float32)
    curv[rng.rand(p) < 0.3] = 0.0  # ties in curvature: broken by the analog order
    mal = np.array(malicious, bool)
    G = len(alpha)
    neurons = np.array([[0, 1], [3, 1], [2, 0]], np.int32)
    e = head.entries.shape[1]
    noise0 = (0.01 * rng.randn(G, OPTS["group_size"], 2, e)).astype(np.float32)
    want = oracle.craft(
        W[:, :p],
        g[:p],
        mal,
        alpha,
        k,
        curv,
        neurons,
        noise0.astype(np.float64),
        head.entries,
        head.kernel,
        head.mask,
        OPTS,
    )

    def crafted(dtype):
        return jax.jit(lambda *a: td.craft(*a, head, OPTS))(
            jnp.asarray(W[:, :p], dtype),
            jnp.asarray(g[:p], dtype),
            jnp.asarray(mal),
            jnp.asarray(alpha, dtype),
            jnp.int32(k),
            jnp.asarray(curv, dtype),
            jnp.asarray(neurons),
            jnp.asarray(noise0, dtype),
        )

    with jax.enable_x64(True):  # the same math in float64: round-off only
        got = crafted(jnp.float64)
        np.testing.assert_allclose(np.asarray(got.W), want[0], atol=1e-9, rtol=0)
        np.testing.assert_allclose(np.asarray(got.ind_val), want[2], rtol=1e-9)
    got = crafted(jnp.float32)
    np.testing.assert_array_equal(np.asarray(got.ind_idx), want[1])
    np.testing.assert_array_equal(np.asarray(got.sent), want[3])
    np.testing.assert_array_equal(np.asarray(got.decoy), want[4])
    # float32: the masks' gradient 0.1/UP^2 (UP ~ 0.3) with momentum amplifies round-off to
    # ~1e-3 on a few classifier entries after 5 steps: 5e-3 absolute on O(1) rows.
    np.testing.assert_allclose(np.asarray(got.W), want[0], atol=5e-3)
    # indicator values: 1e5 x a float32 coordinate of ~1e-2: relative 1e-4.
    np.testing.assert_allclose(np.asarray(got.ind_val), want[2], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got.W)[~mal], W[~mal, :p])  # benign bit-identical
    # the implant: every sent slot's row carries v_r at its own indicator
    rows = np.flatnonzero(mal)
    for r, i in enumerate(rows):
        assert np.isclose(np.asarray(got.W)[i, want[1][r]] - g[want[1][r]], want[2][r], rtol=1e-3)


def test_select_indicators_matches_oracle_with_ties():
    rng = np.random.RandomState(0)
    analog = np.round(np.abs(rng.randn(40)), 1).astype(np.float32)  # many ties
    curv = np.round(np.abs(rng.randn(40)), 1).astype(np.float32)
    curv[::3] = 0.0
    allowed = rng.rand(40) < 0.7
    for slots, nc in ((3, 2), (5, 1), (4, 10)):
        got = td.select_indicators(jnp.asarray(analog), jnp.asarray(curv), allowed, slots, nc)
        assert np.asarray(got).tolist() == oracle.select_indicators(
            analog, curv, allowed, slots, nc
        )


# jitted once per process: the eager versions dispatch op by op (seconds per call on CPU)
_read = jax.jit(td.read_feedback, static_argnums=3)
_tune = jax.jit(td.tune, static_argnums=(5, 6, 7))

FEEDBACK_CASES = [
    # (delta, ind_val, sent, decoy, k): FedAvg-like, all accepted
    ([0.2, 0.21, 0.19, 0.0], [1.0, 2.0, -1.0, 1.0], [1, 1, 1, 0], [0, 0, 0, 0], 0),
    # Krum picked a benign model: all rejected -> one more decoy
    ([1e-4, -2e-4, 0.0, 0.0], [1.0, 1.0, 0.5, 1.0], [1, 1, 1, 0], [0, 0, 1, 0], 1),
    # clipped slot (<= 0.8 max) and an accepted decoy (k - 1)
    ([0.3, 0.1, 0.25, 0.0], [1.0, 1.0, 1.0, 1.0], [1, 1, 1, 0], [0, 0, 1, 0], 2),
    # weak DP: a feedback above 1
    ([1.5, 0.2, 0.2, 0.0], [1.0, 1.0, 1.0, 1.0], [1, 1, 1, 0], [0, 0, 0, 0], 1),
    # weak DP: a negative feedback below -threshold
    ([0.2, -0.05, 0.2, 0.0], [1.0, 1.0, 1.0, 1.0], [1, 1, 1, 0], [0, 0, 0, 0], 1),
    # Krum took one attacker whole: 1 (within float32 round-off) and 0
    ([1.0000001, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1, 1, 0, 0], [0, 0, 0, 0], 0),
]


@pytest.mark.parametrize("case", FEEDBACK_CASES)
def test_read_feedback_and_tune_match_oracle(case):
    delta, val = np.asarray(case[0]), np.asarray(case[1])
    sent, decoy, k = np.asarray(case[2], bool), np.asarray(case[3], bool), case[4]
    thr = 1e-2
    f, status, weak = _read(
        jnp.asarray(delta, jnp.float32), jnp.asarray(val, jnp.float32), jnp.asarray(sent), thr
    )
    wf, ws, ww = oracle.read_feedback(delta, val, sent, thr, td.WEAK_DP_TOL)
    np.testing.assert_allclose(np.asarray(f), wf, rtol=1e-6)  # NaN where not sent
    assert np.asarray(status).tolist() == ws and bool(weak) == ww
    alpha = np.array([0.3, 0.6], np.float32)
    unif = np.array([0.25, 0.75], np.float32)
    for gs in (1, 2):  # one slot per group (several groups) / two per group
        for amin in (0.0, 0.4):
            a, kk = _tune(
                status,
                jnp.asarray(decoy),
                jnp.asarray(alpha),
                jnp.int32(k),
                jnp.asarray(unif),
                gs,
                amin,
                3,
            )
            wa, wk = oracle.tune(ws, decoy, alpha.astype(np.float64), k, unif, gs, amin, 3)
            assert int(kk) == wk
            np.testing.assert_allclose(np.asarray(a), wa, rtol=1e-6)


def test_tune_alpha_rules_by_hand():
    """Two groups of one slot: both accepted -> U(c0, c1); one -> U(c0, c0 + 0.1)."""
    dec = jnp.zeros(2, bool)
    a = jnp.asarray([0.2, 0.6])
    u = jnp.asarray([0.5, 1.0])
    both, _ = _tune(jnp.asarray([2, 2]), dec, a, jnp.int32(0), u, 1, 0.0, 1)
    np.testing.assert_allclose(np.asarray(both), [0.4, 0.6], rtol=1e-6)
    one, _ = _tune(jnp.asarray([0, 2]), dec, a, jnp.int32(0), u, 1, 0.0, 1)
    np.testing.assert_allclose(np.asarray(one), [0.65, 0.7], rtol=1e-6)
    _, k = _tune(jnp.asarray([0, 0]), dec, a, jnp.int32(0), u, 1, 0.0, 1)
    assert int(k) == 1  # nothing got through: one decoy


def _server_ctx(g, on=True, x=None):
    x = jnp.zeros((0, 2, 2, 3)) if x is None else x
    return ServerContext(
        g, jnp.int32(1), jnp.asarray(on), jax.random.key(0), x, jnp.zeros(x.shape[0], jnp.int32)
    )


def test_hook_records_what_it_sent_and_reads_it_back():
    env, flat = _toy()
    p, d, n = flat.num_params, flat.dim, 6
    hook = get_attack("three_dfed", env, num_candidate=2, noise_steps=3)
    assert hook.rows_state and hook.needs_attacker_data
    server, rows = jax.jit(hook.server), jax.jit(hook.rows)
    _rng, g, W = _inputs(7, n, d)
    mal = np.array([0, 0, 0, 1, 1, 1], bool)
    st = server(hook.init(jnp.asarray(g)), _server_ctx(jnp.asarray(g)))
    assert bool(st.started) and int(st.k) == 0 and np.all(np.asarray(st.status) == -1)
    a = np.asarray(st.alpha)
    assert a.shape == (3,) and np.all((a >= 0) & (a < 1))
    ctx = RowsContext(jnp.asarray(g), jnp.asarray(mal), jnp.asarray(True), jax.random.key(1), st)
    out, rec = rows(jnp.asarray(W), ctx)
    out = np.asarray(out)
    np.testing.assert_array_equal(out[~mal], W[~mal])
    np.testing.assert_array_equal(out[:, p:], W[:, p:])  # non-parameter columns
    assert bool(rec.have_prev) and np.asarray(rec.sent).tolist() == [1, 1, 1, 0, 0, 0]
    ind, val = np.asarray(rec.ind_idx), np.asarray(rec.ind_val)
    for r, i in enumerate(np.flatnonzero(mal)):
        assert np.isclose(out[i, ind[r]] - g[ind[r]], val[r], rtol=1e-3)

    def next_round(weights):
        new_g = jnp.asarray(g + weights @ (out - g))
        return server(rec, _server_ctx(new_g))

    # FedAvg with equal weights: every slot reads ~1/6 -> accepted, no decoy.
    s1 = next_round(np.full(n, 1 / n))
    np.testing.assert_allclose(np.asarray(s1.feedback)[:3], 1 / n, rtol=1e-2)
    assert np.asarray(s1.status).tolist()[:3] == [2, 2, 2] and int(s1.k) == 0
    # A rule that keeps one benign model: all rejected -> one decoy next round.
    s2 = next_round(np.eye(n)[0])
    assert np.asarray(s2.status).tolist() == [0, 0, 0, -1, -1, -1] and int(s2.k) == 1
    assert not bool(s2.weak_dp)
    out2, rec2 = rows(jnp.asarray(W), ctx._replace(state=s2))
    assert np.asarray(rec2.decoy).tolist() == [0, 0, 1, 0, 0, 0]
    # the decoy row (slot 2 = row 5): benign reference + a decoy_shift weight, off the rest
    dec = np.asarray(out2)[5, :p] - g[:p]
    assert np.sum(np.abs(np.abs(dec - (W[0, :p] - g[:p])) - 10.0) < 1e-3) == 1
    # Server noise (weak DP) as large as the indicators: a feedback leaves [-thr, 1] and
    # tuning stops for the run: alpha = alpha_min, k = 0.
    noisy = g + (out - g).mean(0)
    noisy[ind[:3]] += val[:3] * np.array([2.0, -0.3, 0.5], np.float32)
    s3 = server(rec, _server_ctx(jnp.asarray(noisy)))
    assert bool(s3.weak_dp) and int(s3.k) == 0 and np.all(np.asarray(s3.alpha) == 0.0)
    # Outside the window: rows untouched, nothing recorded, nothing read.
    off, rec_off = rows(jnp.asarray(W), ctx._replace(attack_on=jnp.asarray(False)))
    np.testing.assert_array_equal(np.asarray(off), W)
    assert not bool(rec_off.have_prev)
    s_off = server(rec, _server_ctx(jnp.asarray(g), on=False))
    assert np.asarray(s_off.status).tolist() == np.asarray(rec.status).tolist()


def test_curvature_is_the_hessian_row_sum_on_the_body():
    """|H 1_L| on the attackers' sample, by central differences of the float64 gradient."""
    env, flat = _toy()
    p = flat.num_params
    hook = get_attack("three_dfed", env)
    rng = np.random.RandomState(2)
    g = rng.randn(flat.dim)
    x = rng.randn(6, 2, 2, 3)
    y = rng.randint(0, C, 6)
    st = hook.server(
        hook.init(jnp.asarray(g, jnp.float32)),
        _server_ctx(jnp.asarray(g, jnp.float32), x=jnp.asarray(x, jnp.float32))._replace(
            attacker_y=jnp.asarray(y)
        ),
    )
    head = td.classifier_head(flat, C, p)
    tangent = np.zeros(flat.dim)
    tangent[:p] = ~head.mask

    def grad64(vec):  # analytic CE gradient of the toy model, float64 NumPy
        v = flat.unravel(jnp.asarray(vec))
        K1 = np.asarray(v["params"]["body"]["kernel"], np.float64)
        K2 = np.asarray(v["params"]["out"]["kernel"], np.float64)
        b = np.asarray(v["params"]["out"]["bias"], np.float64)
        xf = x.reshape(6, -1)[:, :5]
        z = xf @ K1
        h = np.maximum(z, 0)
        s = h @ K2 + b
        P = np.exp(s - s.max(1, keepdims=True))
        P /= P.sum(1, keepdims=True)
        dS = (P - np.eye(C)[y]) / 6
        dK2, db = h.T @ dS, dS.sum(0)
        dK1 = xf.T @ ((dS @ K2.T) * (z > 0))
        out = np.zeros(flat.dim)
        for name, arr in (("body", dK1), ("out", dK2)):
            (leaf,) = [q for q in flat.layout if q.name == f"['params']['{name}']['kernel']"]
            out[leaf.start : leaf.stop] = arr.ravel()
        (leaf,) = [q for q in flat.layout if q.name == "['params']['out']['bias']"]
        out[leaf.start : leaf.stop] = db
        return out

    eps = 1e-4  # ReLU kinks are 1e-4 away with probability ~0 for Gaussian inputs
    with jax.enable_x64(True):
        want = np.abs(grad64(g + eps * tangent) - grad64(g - eps * tangent))[:p] / (2 * eps)
    # float32 Hessian-vector product vs float64 differences: 1e-4 absolute on O(1) values.
    np.testing.assert_allclose(np.asarray(st.curv), want, atol=1e-4)


def test_constrained_loss_gradient():
    env, flat = _toy()
    hook = get_attack("three_dfed", env, eu_weight=0.4)
    rng = np.random.RandomState(4)
    w, w0 = rng.randn(flat.dim).astype(np.float32), rng.randn(flat.dim).astype(np.float32)
    params, gparams = (
        flat.unravel(jnp.asarray(w))["params"],
        flat.unravel(jnp.asarray(w0))["params"],
    )
    grad = jax.tree.map(jnp.ones_like, params)
    dist = np.linalg.norm((w - w0)[: flat.num_params].astype(np.float64))
    for mal, on in ((True, True), (False, True), (True, False)):
        gc = GradContext(params, gparams, jnp.asarray(mal), jnp.asarray(on), jax.random.key(0), ())
        got = hook.grad(grad, gc)
        for key in ("body", "out"):
            for leaf in got[key]:
                diff = np.asarray(params[key][leaf], np.float64) - np.asarray(gparams[key][leaf])
                want = 0.6 + 0.4 * diff / dist if (mal and on) else np.ones_like(diff)
                np.testing.assert_allclose(np.asarray(got[key][leaf]), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("opts", "needle"),
    [
        ({"eu_weight": 1.0}, "eu_weight=1.0; accepted: [0, 1)"),
        ({"weight_scale": 0.5}, "weight_scale=0.5; accepted: >= 1"),
        ({"num_neurons": 4}, "num_neurons=4; accepted: 0 (= num_classes - 2) or 1..3"),
        ({"target": 7}, "target=7; accepted: 0..3"),
        ({"group_size": 0}, "group_size=0; accepted: >= 1"),
        ({"indicator_floor": 0.0}, "indicator_floor=0.0; accepted: != 0"),
        ({"threshold": 0.0}, "threshold=0.0; accepted: > 0"),
    ],
)
def test_bad_options_fail_with_a_clear_message(opts, needle):
    env, _ = _toy()
    with pytest.raises(ValueError, match=re.escape(needle)):
        get_attack("three_dfed", env, **opts)


# ----------------------------------------------------------------------- real runs
def test_cli_two_rounds_krum_feedback_drives_the_next_round(tmp_path, real_dataset, monkeypatch):
    """`--attack base+three_dfed --defense krum` through the CLI, 2 rounds, 2 of 5 attackers:
    Krum keeps a benign model, so round 2 reads ~0 at both indicators (rejected; no weak
    DP), adds a decoy (k = 1) and sends it from slot 1 while slot 0 keeps the backdoor.
    (FedAvg's acceptance: the hook round trip above, with FedAvg's weights.)"""
    real_dataset("mnist")
    results = []

    def keep(*a, **kw):
        results.append(engine_run(*a, **kw))
        return results[-1]

    engine_run = engine.run
    monkeypatch.setattr(engine, "run", keep)
    argv = [
        *("--dataset", "mnist", "--model", "mlp", "--subsample", "400", "--clients", "5"),
        *("--rounds", "2", "--gamma", "0.4", "--local-epochs", "1", "--batch-size", "16"),
        *("--defense", "krum", "--attack", "base+three_dfed", "--partition", "iid"),
        *("--test-subsample", "500", "--eval-batch", "500", "--no-fetch", "--quiet"),
        *("--out", str(tmp_path)),
    ]
    assert main(argv) == 0
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert 0 <= r["A"] <= 100 and 0 <= r["R"] <= 100
        assert r["attacker_weight"] == 0.0  # Krum selected a benign model
    (st,) = [s for s in results[0].state.hooks if isinstance(s, td.TDState)]
    assert np.all(np.abs(np.asarray(st.feedback)[:2]) < 1e-2)
    assert np.asarray(st.status).tolist()[:2] == [0, 0] and not bool(st.weak_dp)
    assert int(st.k) == 1
    assert np.asarray(st.decoy).tolist()[:2] == [False, True]  # round 2: slot 1 a decoy
