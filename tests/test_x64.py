"""Float64 end to end: under `jax_enable_x64` every rule, SPMC's projection and a local SPMC
training step run in float64, so the float64 NumPy oracles check the real code to ~1e-12
instead of float32 rounding.

Each test enables x64 only inside its body (`jax.enable_x64`), so the rest of the suite stays
float32. Tolerance: 1e-10 absolute on O(1) values (float64 rounding over ≤ 40-term sums and
a few Weiszfeld/logit steps is ~1e-14; a float32 step anywhere would show as ~1e-7).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmc_jax.aggregators import REGISTRY, get_aggregator
from spmc_jax.aggregators.base import AggregatorEnv, RoundContext
from spmc_jax.flat import LeafInfo
from tests.aggregators.conftest import FakeProxy
from tests.reference import (
    bulyan_oracle,
    foolsgold_oracle,
    rfa_oracle,
    rlr_oracle,
    rsa_oracle,
    spmc_oracle,
)

TOL = 1e-10
N, D, N_STATS = 5, 30, 4
PARAM_MASK = np.arange(D) < D - N_STATS
# Four "tensors" (three parameter tensors, one statistics tensor) for layer-wise rules.
# Output layer "a": a 4x4 kernel and its 4 biases (deepsight reads them).
LAYOUT = (
    LeafInfo("['params']['a']['bias']", 0, 4, (4,), True),
    LeafInfo("['params']['a']['kernel']", 4, 20, (4, 4), True),
    LeafInfo("['params']['b']['kernel']", 20, D - N_STATS, (D - N_STATS - 20,), True),
    LeafInfo("['batch_stats']['a']['mean']", D - N_STATS, D, (N_STATS,), False),
)


def _env(**kw):
    base = dict(
        n_clients=N,
        num_malicious=1,
        lr=0.01,
        rounds=3,
        param_mask=PARAM_MASK,
        proxy=FakeProxy(),
        layout=LAYOUT,
        output_layer="a",
    )
    return AggregatorEnv(**{**base, **kw})


def _inputs(seed):
    rng = np.random.default_rng(seed)
    g = rng.normal(size=D)
    w = g + 0.1 * rng.normal(size=(N, D))
    sizes = rng.integers(20, 400, size=N).astype(np.float64)
    ctx = RoundContext(
        global_flat=jnp.asarray(g),
        round=jnp.asarray(0, jnp.int32),
        key=jax.random.key(seed),
        n_samples=jnp.asarray(sizes),
        valid=jnp.ones((N,), bool),
        client_ids=jnp.arange(N, dtype=jnp.int32),
    )
    return g, w, sizes, ctx


def _run(name, w, ctx, rounds=1, env=None, **opts):
    agg = get_aggregator(name, env or _env(), **opts)
    state = agg.init(ctx.global_flat)
    step = jax.jit(agg.aggregate)
    for t in range(rounds):
        out, state, info = step(jnp.asarray(w), state, ctx._replace(round=jnp.asarray(t)))
    return out, state, info


@pytest.mark.parametrize("name", [n for n, _ in REGISTRY.items()])
def test_every_rule_runs_in_float64(name):
    with jax.enable_x64(True):
        _, w, _, ctx = _inputs(0)
        assert ctx.global_flat.dtype == jnp.float64
        out, state, info = _run(name, w, ctx)
        assert out.dtype == jnp.float64 and out.shape == (D,)
        assert np.all(np.isfinite(np.asarray(out)))
        for leaf in jax.tree.leaves(state):  # float state (momentum, history) stays float64
            if jnp.issubdtype(leaf.dtype, jnp.floating):
                assert leaf.dtype == jnp.float64, (name, leaf.dtype)
        assert info.client_weights.shape == (N,)


@pytest.mark.parametrize("per_tensor", [False, True])
def test_rfa_float64_matches_oracle(per_tensor):
    with jax.enable_x64(True):
        g, w, sizes, ctx = _inputs(1)
        out, _, _ = _run("rfa", w, ctx, per_tensor=per_tensor, maxiter=10)
    if per_tensor:  # the oracle run on each tensor's slice separately
        exp = np.concatenate(
            [
                rfa_oracle.rfa(w[:, a.start : a.stop], g[a.start : a.stop], [1] * N, sizes, 10)[0]
                for a in LAYOUT
            ]
        )
    else:
        exp = rfa_oracle.rfa(w, g, [1] * N, sizes, 10)[0]
    np.testing.assert_allclose(np.asarray(out), exp, atol=TOL, rtol=0)


def test_foolsgold_float64_matches_oracle_on_reference_coordinates():
    order = np.arange(D - N_STATS)[::-1].copy()  # a reference order that is not ours
    env = _env(reference_param_order=order)
    oracle = foolsgold_oracle.FoolsGold(PARAM_MASK)
    with jax.enable_x64(True):
        g, w, _, ctx = _inputs(2)
        agg = get_aggregator("foolsgold", env, reference_first_coords=True)
        state = agg.init(ctx.global_flat)
        for t in range(2):  # the history accumulates in float64
            w_t = w + 0.05 * np.random.default_rng(t).normal(size=w.shape)
            out, state, info = jax.jit(agg.aggregate)(jnp.asarray(w_t), state, ctx)
            exp, exp_w = oracle.round(w_t, g, [True] * N, np.arange(N), coords=order[:N])
            np.testing.assert_allclose(np.asarray(info.client_weights), exp_w, atol=1e-6)
            np.testing.assert_allclose(np.asarray(out), exp, atol=TOL, rtol=0)
        assert state.history.dtype == jnp.float64


def test_rsa_rlr_bulyan_float64_match_oracles():
    with jax.enable_x64(True):
        g, w, sizes, ctx = _inputs(3)
        rsa_out, _, _ = _run("rsa", w, ctx, clip=2.0, reference_sequential_clip=True)
        rlr_out, _, _ = _run("rlr", w, ctx, threshold=3.0)
        bul_out, _, _ = _run("bulyan", w, ctx, num_malicious=1)
    order = np.asarray(jax.random.permutation(ctx.key, N))
    exp = rsa_oracle.rsa(w, g, [True] * N, PARAM_MASK, clip=2.0, sequential=True, order=order)
    np.testing.assert_allclose(np.asarray(rsa_out), exp[0], atol=TOL, rtol=0)
    exp = rlr_oracle.rlr(w, g, [True] * N, sizes, PARAM_MASK, threshold=3.0)
    np.testing.assert_allclose(np.asarray(rlr_out), exp[0], atol=TOL, rtol=0)
    exp = bulyan_oracle.bulyan(w, g, [True] * N, 1, np.zeros(D), PARAM_MASK)
    np.testing.assert_allclose(np.asarray(bul_out), exp[0], atol=TOL, rtol=0)


def test_projection_float64_matches_oracle():
    from spmc_jax.spmc import project

    rng = np.random.default_rng(4)
    gd = [rng.normal(size=(3, 4)), rng.normal(size=(5,)), rng.normal(size=(2, 2))]
    gg = [-gd[0] + 0.3 * rng.normal(size=(3, 4)), rng.normal(size=(5,)), gd[2] + 0.1]
    with jax.enable_x64(True):
        out = project([jnp.asarray(a) for a in gd], [jnp.asarray(a) for a in gg], 1.0)
        assert all(o.dtype == jnp.float64 for o in out)
    exp, count = spmc_oracle.project(gd, gg, 1.0)
    assert count >= 1  # the first tensor conflicts
    for a, b in zip(out, exp, strict=True):
        np.testing.assert_allclose(np.asarray(a), b, atol=1e-13, rtol=0)


def _mlp_np(p, x):
    h = np.maximum(x @ p["hidden"]["kernel"] + p["hidden"]["bias"], 0.0)
    return h, h @ p["out"]["kernel"] + p["out"]["bias"]


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _mlp_grads(p, x, dlogits):
    """Backprop of Σ dlogits·logits through the 2-layer MLP (float64)."""
    h, _ = _mlp_np(p, x)
    dh = dlogits @ p["out"]["kernel"].T * (h > 0)
    return {
        "hidden": {"bias": dh.sum(0), "kernel": x.T @ dh},
        "out": {"bias": dlogits.sum(0), "kernel": h.T @ dlogits},
    }


def test_spmc_local_step_float64_matches_oracle():
    """One SPMC local step (1 batch, 1 epoch) under x64 against a NumPy float64 step: data
    and guidance gradients by hand, per-tensor projection (spmc_oracle), PyTorch SGD's
    first step w − lr·(G + wd·w)."""
    from spmc_jax.client import (
        ClientData,
        ClientTask,
        SpmcClientOptions,
        make_local_train,
        make_optimizer,
    )
    from spmc_jax.models.mlp import MLP

    b, lr, wd = 8, 0.1, 1e-3
    rng = np.random.default_rng(5)
    x_u8 = rng.integers(0, 255, (b, 4, 4, 1)).astype(np.uint8)
    y = rng.integers(0, 10, b).astype(np.int32)
    model = MLP(hidden=6)

    def transform(key, x):  # deterministic, so the oracle sees the same inputs
        return x.astype(jnp.float64) / 255.0 - 0.5

    with jax.enable_x64(True):
        init = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))
        student = jax.tree.map(lambda v: v.astype(jnp.float64), init)
        teacher = jax.tree.map(lambda v: (v * 1.7 + 0.05).astype(jnp.float64), init)
        fn = make_local_train(
            model,
            transform,
            make_optimizer(lr, 0.9, wd),
            batch_size=b,
            steps_per_epoch=1,
            epochs=1,
            spmc=SpmcClientOptions(1.0, False),
        )
        data = ClientData(jnp.asarray(x_u8), jnp.asarray(y), jnp.zeros(b, bool))
        task = ClientTask(
            jnp.arange(b, dtype=jnp.int32),
            jnp.asarray(b, jnp.int32),
            jnp.asarray(False),
            jnp.asarray(0, jnp.int32),
            jax.random.key(1),
        )
        res = jax.jit(fn)(student, teacher, data, task, jnp.asarray(False))
        assert res.loss.dtype == jnp.float64
        got = jax.tree.map(np.asarray, res.variables["params"])
    p = jax.tree.map(np.asarray, student["params"])
    t = jax.tree.map(np.asarray, teacher["params"])
    x = x_u8.reshape(b, -1).astype(np.float64) / 255.0 - 0.5
    _, logits = _mlp_np(p, x)
    probs = _softmax(logits)
    onehot = np.eye(10)[y]
    g_data = _mlp_grads(p, x, (probs - onehot) / b)
    g_guide = _mlp_grads(p, x, (probs - _softmax(_mlp_np(t, x)[1])) / b)
    paths = [("hidden", "bias"), ("hidden", "kernel"), ("out", "bias"), ("out", "kernel")]
    proj, count = spmc_oracle.project(
        [g_data[a][k] for a, k in paths], [g_guide[a][k] for a, k in paths], 1.0
    )
    assert float(res.projected) == count
    loss = -np.mean(np.log(probs[np.arange(b), y]))
    np.testing.assert_allclose(float(res.loss), loss, atol=TOL, rtol=0)
    for (a, k), g in zip(paths, proj, strict=True):
        want = p[a][k] - lr * (g + wd * p[a][k])
        np.testing.assert_allclose(got[a][k], want, atol=TOL, rtol=0)
