"""Table 2 baseline defenses against float64 NumPy oracles (tests/reference/<rule>_oracle.py).

Every rule is built through `get_aggregator` (NaN sanitisation included) and called under
`jax.jit` with a `RoundContext`. Inputs are random client models g + SPREAD·N(0, 1) with
n ∈ {3, 10} clients and D = 40 coordinates, the last N_STATS of which pose as BatchNorm
statistics (param_mask False). One "invalid" variant flags a row via ctx.valid (its value
is left as g, as the engine does for non-finite rows).

Tolerances: float32 vs float64 on O(1) values with sums over ≤ 10 rows and ≤ 40
coordinates: ~1e-6 rounding; ATOL = 2e-5 leaves room for RFA's iterations and FoolsGold's
logit (derivative 1/(a(1 − a)) ≤ ~10 at the weights seen) without hiding an O(1/n) error.
Selection outcomes (which clients DnC/Bulyan keep) must match exactly.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmc_jax.aggregators import get_aggregator
from spmc_jax.aggregators.base import AggregatorEnv, RoundContext
from spmc_jax.aggregators.dnc import dnc_subsample
from tests.reference import (
    bulyan_oracle,
    crfl_oracle,
    dnc_oracle,
    finetuning_oracle,
    foolsgold_oracle,
    rfa_oracle,
    rlr_oracle,
    rsa_oracle,
    sageflow_oracle,
)

D = 40
N_STATS = 5
PARAM_MASK = np.arange(D) < D - N_STATS
SPREAD = 0.1
ATOL = 2e-5  # see module docstring
RTOL = 1e-5


# ----------------------------------------------------------------------------- helpers


class LinearProxy:
    """A jittable `ProxyOps`: linear softmax classifier on a tiny fixed proxy set.

    The model is flat[:F*C] as an (F, C) matrix and flat[F*C : F*C + C] as the bias;
    other coordinates are ignored. `train` = `epochs` × STEPS full-batch gradient steps
    (deterministic; the key is accepted and unused).
    """

    F, C, P, STEPS, LR = 4, 3, 24, 5, 0.5

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(self.P, self.F))
        self.x_np = x
        self.y_np = np.argmax(x @ rng.normal(size=(self.F, self.C)), axis=1)
        self.x = jnp.asarray(x, jnp.float32)
        self.y = jnp.asarray(self.y_np, jnp.int32)

    def _logp(self, flat):
        k = self.F * self.C
        logits = self.x @ flat[:k].reshape(self.F, self.C) + flat[k : k + self.C]
        return jax.nn.log_softmax(logits)

    def _loss(self, flat):
        return -jnp.mean(jnp.take_along_axis(self._logp(flat), self.y[:, None], axis=1))

    def loss_entropy(self, flat):
        logp = self._logp(flat)
        return self._loss(flat), -jnp.mean(jnp.sum(jnp.exp(logp) * logp, axis=1))

    def train(self, flat, key, epochs):
        del key
        grad = jax.grad(self._loss)
        return jax.lax.fori_loop(
            0, int(epochs) * self.STEPS, lambda _, w: w - self.LR * grad(w), flat
        )

    def loss_entropy_np(self, flat):
        return sageflow_oracle.linear_softmax_loss_entropy(flat, self.x_np, self.y_np, self.C)


PROXY = LinearProxy()


@functools.cache  # one env object per configuration, so `_build` can reuse compilations
def _env(n, *, m=0, proxy=True, total=None, rounds=5) -> AggregatorEnv:
    """Env with the test proxy (ignored by non-proxy rules; shared so builds are reused)."""
    return AggregatorEnv(
        n_clients=n,
        num_malicious=m,
        lr=0.01,
        rounds=rounds,
        param_mask=PARAM_MASK,
        total_clients=total,
        proxy=PROXY if proxy else None,
    )


def _data(n, seed, spread=SPREAD, scale=1.0):
    rng = np.random.default_rng(seed)
    g = (scale * rng.normal(size=D)).astype(np.float32)
    w = (g + spread * rng.normal(size=(n, D))).astype(np.float32)
    sizes = rng.integers(20, 400, size=n).astype(np.float32)
    return g, w, sizes


def _valid(n, invalid):
    v = np.ones(n, bool)
    if invalid:
        v[1] = False
    return v


def _ctx(g, n, *, seed=0, t=0, valid=None, sizes=None, ids=None) -> RoundContext:
    return RoundContext(
        global_flat=jnp.asarray(g, jnp.float32),
        round=jnp.asarray(t, jnp.int32),
        key=jax.random.key(seed),
        n_samples=jnp.asarray(np.full(n, 100.0) if sizes is None else sizes, jnp.float32),
        valid=jnp.asarray(np.ones(n, bool) if valid is None else valid),
        client_ids=jnp.asarray(np.arange(n) if ids is None else ids, jnp.int32),
    )


def _neutralise(w, g, valid):
    """What the engine hands over for invalid rows: the global model (a zero update)."""
    return np.where(valid[:, None], w, g[None, :]).astype(np.float32)


_BUILT: dict = {}


def _build(name, env, **opts):
    """get_aggregator + jax.jit, cached per (rule, env, options) to compile each once."""
    key = (name, id(env), tuple(sorted(opts.items())))
    if key not in _BUILT:
        agg = get_aggregator(name, env, **opts)
        _BUILT[key] = (agg.init, jax.jit(agg.aggregate))
    return _BUILT[key]


def _run(name, env, w, ctx, state=None, **opts):
    init, aggregate = _build(name, env, **opts)
    state = init(ctx.global_flat) if state is None else state
    out, state, info = aggregate(jnp.asarray(w), state, ctx)
    weights = np.asarray(info.client_weights)
    assert out.shape == (w.shape[1],) and out.dtype == jnp.float32
    assert weights.shape == (w.shape[0],) and weights.dtype == np.float32
    return np.asarray(out), state, weights


def _close(actual, expected, atol=ATOL):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), atol=atol, rtol=RTOL)


# ----------------------------------------------------------------------------- DnC


@pytest.mark.parametrize(
    ("n", "invalid", "m", "filter_frac", "sub_dim", "num_iters", "normalize"),
    [
        (3, False, 1, 1.0, 10000, 1, True),
        (10, False, 3, 0.5, 10000, 1, True),
        (10, True, 4, 1.0, 16, 2, False),
    ],
)
def test_dnc_matches_oracle(n, invalid, m, filter_frac, sub_dim, num_iters, normalize):
    g, w, sizes = _data(n, 11)
    valid = _valid(n, invalid)
    w = _neutralise(w, g, valid)
    ctx = _ctx(g, n, seed=3, valid=valid, sizes=sizes)
    opts = dict(sub_dim=sub_dim, num_iters=num_iters, filter_frac=filter_frac, normalize=normalize)
    out, _, weights = _run("dnc", _env(n, m=m), w, ctx, **opts)
    coords = np.asarray(dnc_subsample(ctx.key, D, sub_dim, num_iters))
    exp, exp_w = dnc_oracle.dnc(w, g, valid, coords, m, filter_frac, normalize)
    np.testing.assert_allclose(weights, exp_w, atol=1e-6)  # same kept set
    _close(out, exp)
    n_removed = int(np.sum(valid)) - int(np.sum(weights > 0))
    assert n_removed >= int(filter_frac * m)  # each iteration removes ⌊c·m⌋ (intersection)


def test_dnc_subsample_draws_distinct_coordinates():
    idx = np.asarray(dnc_subsample(jax.random.key(0), 1000, 50, 3))
    assert idx.shape == (3, 50)
    for row in idx:
        assert len(set(row.tolist())) == 50 and row.min() >= 0 and row.max() < 1000
    assert not np.array_equal(idx[0], idx[1])


def test_dnc_num_malicious_override_and_reference_permutation():
    n = 10
    g, w, _ = _data(n, 12)
    w[7:] += 3.0  # three clear outliers in one direction
    ctx = _ctx(g, n, seed=5)
    _, _, weights = _run("dnc", _env(n, m=0), w, ctx, num_malicious=3, filter_frac=1.0)
    np.testing.assert_array_equal(weights[7:], 0.0)
    np.testing.assert_allclose(weights[:7], 1 / 7, atol=1e-6)
    _, _, wbug = _run(
        "dnc",
        _env(n, m=0),
        w,
        ctx,
        num_malicious=3,
        filter_frac=1.0,
        reference_permutation_bug=True,
    )
    # Same number kept, but the kept set is the permuted one (not the 7 benign clients here).
    perm = np.asarray(jax.random.permutation(jax.random.split(ctx.key, 2)[1], n))
    np.testing.assert_allclose(wbug, weights[perm], atol=1e-6)
    assert np.any(wbug[7:] > 0)
    with pytest.raises(ValueError, match="num_malicious"):
        get_aggregator("dnc", _env(n), num_malicious=11)


# ----------------------------------------------------------------------------- SageFlow


def _sageflow_inputs(n, seed):
    """Models whose proxy entropies spread around 0.9 (< ln 3): scaled random heads."""
    g, w, sizes = _data(n, seed, spread=1.0, scale=0.1)
    scales = np.linspace(0.05, 3.0, n).astype(np.float32)
    w = (g + scales[:, None] * (w - g)).astype(np.float32)
    return g, w, sizes


@pytest.mark.parametrize(
    ("n", "invalid", "opts"),
    [
        (3, False, {"eth": 0.9}),
        (10, True, {"eth": 0.9, "delta": 2.0, "data_weighted": True}),
        (10, False, {"client_chunk": 4}),
    ],
)
def test_sageflow_matches_oracle(n, invalid, opts):
    proxy = PROXY
    g, w, sizes = _sageflow_inputs(n, 21)
    valid = _valid(n, invalid)
    w = _neutralise(w, g, valid)
    out, _, weights = _run("sageflow", _env(n), w, _ctx(g, n, valid=valid, sizes=sizes), **opts)
    stats = [proxy.loss_entropy_np(row) for row in w.astype(np.float64)]
    losses, ents = np.array([s[0] for s in stats]), np.array([s[1] for s in stats])
    kw = {k: v for k, v in opts.items() if k != "client_chunk"}
    exp, exp_w = sageflow_oracle.sageflow(w, g, valid, sizes, losses, ents, **kw)
    if "eth" in opts:  # the filter must actually split the clients here
        q = ents[valid] < opts["eth"]
        assert q.any() and not q.all()
    # Weights depend on 1/loss: float32 loss rounding (~1e-7 relative) stays far below ATOL.
    _close(weights, exp_w)
    _close(out, exp)


def test_sageflow_fallback_and_reference_bug():
    n = 10
    g, w, sizes = _sageflow_inputs(n, 22)
    valid = _valid(n, True)
    w = _neutralise(w, g, valid)
    ctx = _ctx(g, n, valid=valid, sizes=sizes)
    uniform = valid / valid.sum()
    mean = uniform @ w.astype(np.float64)
    # eth = 0 filters everybody; eps = 0 forces the explicit fallback (with eps > 0 the
    # oracle cases above check the eps term).
    for opts in ({"eth": 0.0, "eps": 0.0}, {"reference_bug": True}):
        out, _, weights = _run("sageflow", _env(n), w, ctx, **opts)
        _close(weights, uniform)
        _close(out, mean)
    # Without the bug the weights are not uniform on these models.
    _, _, weights = _run("sageflow", _env(n), w, ctx, client_chunk=4)
    assert np.ptp(weights[valid]) > 1e-2


# ----------------------------------------------------------------------------- Bulyan


@pytest.mark.parametrize(
    ("n", "f", "invalid", "opts"),
    [
        (3, 0, False, {"momentum": 0.5}),  # θ = β = 3: the mean
        (10, 2, True, {"momentum_buffers": True}),  # θ = 6, β = 2
        (10, 3, False, {}),  # clamped: θ = 4, β = 2
        # θ = 8, β = 5, non-squared Krum; momentum added to the model of client id 0.
        (10, 3, True, {"reference_fixed_f": True, "reference_base_client0": True}),
    ],
)
def test_bulyan_matches_oracle_over_rounds(n, f, invalid, opts):
    env = _env(n, m=f)
    init, aggregate = _build("bulyan", env, **opts)
    g, _, _ = _data(n, 31)
    valid = _valid(n, invalid)
    state = init(jnp.asarray(g))
    vel = np.zeros(D)
    mom = opts.get("momentum", 0.9)
    # Client ids in a random row order, so "client id 0" is not row 0.
    ids = np.random.default_rng(2).permutation(n)
    row0 = int(np.argmax(ids == 0))
    assert row0 != 0
    for t in range(3):  # momentum carries over rounds
        g_t, w, _ = _data(n, 40 + t)
        w = _neutralise((g + (w - g_t)).astype(np.float32), g, valid)
        ctx = _ctx(g, n, t=t, valid=valid, ids=ids)
        out, state, info = aggregate(jnp.asarray(w), state, ctx)
        exp, vel, exp_w, _ = bulyan_oracle.bulyan(
            w,
            g,
            valid,
            f,
            vel,
            PARAM_MASK,
            momentum=mom,
            momentum_buffers=opts.get("momentum_buffers", False),
            reference_fixed_f=opts.get("reference_fixed_f", False),
            base=w[row0] if opts.get("reference_base_client0") else None,
        )
        _close(info.client_weights, exp_w, atol=1e-6)
        _close(out, exp)
        _close(state.velocity, vel)
        g = np.asarray(out)


def test_bulyan_counts_clamp():
    from spmc_jax.aggregators.bulyan import bulyan_counts

    assert bulyan_counts(11, 2) == (7, 3)  # n = 4f + 3: the paper's tight case
    assert bulyan_counts(10, 3) == (4, 2)  # clamped: coordinate median of 4 Krum picks
    assert bulyan_counts(10, 2) == (6, 2)
    assert bulyan_counts(10, 1, reference_fixed_f=True) == (8, 5)


# ----------------------------------------------------------------------------- RFA


@pytest.mark.parametrize(
    ("n", "invalid", "opts"),
    [
        (3, False, {}),
        (10, True, {}),
        (10, False, {"maxiter": 20, "data_weighted": False}),
    ],
)
def test_rfa_matches_oracle(n, invalid, opts):
    g, w, sizes = _data(n, 51)
    w[0] += 1.0  # one far point so the median differs from the mean
    valid = _valid(n, invalid)
    w = _neutralise(w, g, valid)
    out, _, weights = _run("rfa", _env(n), w, _ctx(g, n, valid=valid, sizes=sizes), **opts)
    exp, exp_w = rfa_oracle.rfa(w, g, valid, sizes, **opts)
    _close(weights, exp_w)
    _close(out, exp)
    assert weights[~valid].sum() == 0


# ----------------------------------------------------------------------------- RLR


@pytest.mark.parametrize(
    ("n", "invalid", "opts"),
    [
        (3, False, {"threshold": 2.0}),
        (10, True, {}),
        (10, False, {"threshold": 7.0, "server_lr": 0.5}),
    ],
)
def test_rlr_matches_oracle(n, invalid, opts):
    g, w, sizes = _data(n, 61)
    w[:, :10] += 0.15  # coordinates with strong sign agreement, so both η signs occur
    valid = _valid(n, invalid)
    w = _neutralise(w, g, valid)
    votes = np.abs(np.sign(w[valid] - g).sum(0))[PARAM_MASK]
    thr = opts.get("threshold", 4.0)
    assert (votes >= thr).any() and (votes < thr).any()  # both η signs are exercised
    out, _, weights = _run("rlr", _env(n), w, _ctx(g, n, valid=valid, sizes=sizes), **opts)
    exp, exp_w = rlr_oracle.rlr(w, g, valid, sizes, PARAM_MASK, **opts)
    _close(weights, exp_w)
    _close(out, exp)


def test_rlr_reference_permutation_bug():
    n = 10
    g, w, sizes = _data(n, 62)
    ctx = _ctx(g, n, seed=9, sizes=sizes)
    out, _, _ = _run("rlr", _env(n), w, ctx, reference_permutation_bug=True)
    perm = np.asarray(jax.random.permutation(ctx.key, n))
    exp, _ = rlr_oracle.rlr(w, g, np.ones(n, bool), sizes[perm], PARAM_MASK)
    _close(out, exp)
    exp_ok, _ = rlr_oracle.rlr(w, g, np.ones(n, bool), sizes, PARAM_MASK)
    assert not np.allclose(exp, exp_ok, atol=1e-4)  # the bug is visible on these sizes


# ----------------------------------------------------------------------------- CRFL


# rounds = 5, so t = 4 is the last round. scale 1: ‖g_P‖ ≈ 6 (never clipped); scale 10:
# ‖g_P‖ ≈ 42-60, clipped to τ_t = 5t + 30 while that is smaller.
@pytest.mark.parametrize(
    ("n", "invalid", "t", "scale"),
    [
        (3, False, 0, 1.0),
        (10, True, 2, 1.0),
        (3, False, 0, 10.0),
        (10, True, 1, 10.0),
        (10, False, 4, 10.0),
        (10, False, 14, 10.0),
    ],
)
def test_crfl_matches_oracle_without_noise(n, invalid, t, scale):
    g, w, sizes = _data(n, 71, scale=scale)
    valid = _valid(n, invalid)
    w = _neutralise(w, g, valid)
    ctx = _ctx(g, n, t=t, valid=valid, sizes=sizes)
    out, _, weights = _run("crfl", _env(n, rounds=5), w, ctx, sigma=0.0)
    exp, exp_w = crfl_oracle.crfl(w, g, valid, sizes, PARAM_MASK, t, 5, np.zeros(D))
    _close(weights, exp_w)
    _close(out, exp, atol=ATOL * scale)  # values are O(scale)
    if scale == 10.0 and t == 0:  # make sure the clip is exercised
        assert np.linalg.norm(out[PARAM_MASK]) == pytest.approx(min(5 * t + 30, 100), rel=1e-5)


def test_crfl_noise_only_on_params_and_not_in_last_round():
    n = 10
    g, w, sizes = _data(n, 72)
    sigma = 0.01
    env = _env(n, rounds=5)
    for t in (0, 4):
        ctx = _ctx(g, n, seed=t, t=t, sizes=sizes)
        noisy, _, _ = _run("crfl", env, w, ctx, sigma=sigma)
        clean, _, _ = _run("crfl", env, w, ctx, sigma=0.0)
        diff = noisy - clean
        np.testing.assert_array_equal(diff[~PARAM_MASK], 0.0)
        if t == 4:
            np.testing.assert_array_equal(diff, 0.0)
        else:
            # 35 N(0, σ²) draws: the sample std is within ±40% of σ with overwhelming odds.
            assert 0.6 * sigma < np.std(diff[PARAM_MASK]) < 1.4 * sigma


# ----------------------------------------------------------------------------- FoolsGold


# FoolsGold's logit has slope 1/(a(1 − a)), up to ~100 for weights near 0.01 or 0.99, on
# top of the pardoning ratios: float32 cosine rounding (~1e-7) can reach ~2e-5 in a weight.
FG_ATOL = 1e-4


@pytest.mark.parametrize(
    ("n", "total", "opts"),
    [
        (3, None, {"reference_first_coords": True}),
        (10, None, {}),
        (4, 7, {"normalize": False, "confidence": 0.8}),
    ],
)
def test_foolsgold_matches_oracle_over_rounds(n, total, opts):
    env = _env(n, total=total)
    init, aggregate = _build("foolsgold", env, **opts)
    oracle_opts = {k: v for k, v in opts.items() if k != "reference_first_coords"}
    oracle = foolsgold_oracle.FoolsGold(PARAM_MASK, **oracle_opts)
    # reference_first_coords: cosines on the first n parameter coordinates only.
    coords = np.flatnonzero(PARAM_MASK)[:n] if opts.get("reference_first_coords") else None
    g, _, _ = _data(n, 81)
    state = init(jnp.asarray(g))
    rng = np.random.default_rng(0)
    sybil, common = rng.normal(size=D), rng.normal(size=D)
    big_n = env.n_registered
    # Benign clients share `common` with client-specific strengths, so their cosines spread
    # over (0, 1) and the pardoning and the logit's unsaturated range are exercised.
    strength = np.linspace(0.0, 0.2, big_n)
    for t in range(3):
        # Benign rows: a random subset of the other registered ids, in random order; the
        # sybils are always registered ids N − 2, N − 1 (so their histories accumulate).
        ids = np.concatenate([rng.permutation(big_n - 2)[: n - 2], [big_n - 2, big_n - 1]])
        g_t, w, _ = _data(n, 90 + t)
        w = g + (w - g_t) + strength[ids, None] * common  # benign: random + shared part
        w[-2:] = g + 0.2 * sybil + 0.01 * rng.normal(size=(2, D))  # two colluding sybils
        w = w.astype(np.float32)
        valid = _valid(n, t == 1 and n > 3)
        w = _neutralise(w, g, valid)
        out, state, info = aggregate(jnp.asarray(w), state, _ctx(g, n, t=t, valid=valid, ids=ids))
        exp, exp_w = oracle.round(w, g, valid, ids, coords=coords)
        _close(info.client_weights, exp_w, atol=FG_ATOL)
        _close(out, exp, atol=FG_ATOL)
        g = np.asarray(out)
    # The sybils (the last two rows, in every round) end up with (near) zero weight.
    assert np.all(np.asarray(info.client_weights)[-2:] < 0.05)


def test_foolsgold_reference_permutation_bug():
    n = 5
    env = _env(n)
    g, w, _ = _data(n, 83)
    ctx = _ctx(g, n, seed=4)
    # Position-indexed history: row p gets the update of client perm[p].
    out, _, weights = _run("foolsgold", env, w, ctx, reference_permutation_bug=True)
    perm = np.asarray(jax.random.permutation(ctx.key, n))
    exp, w_pos = foolsgold_oracle.FoolsGold(PARAM_MASK).round(
        w[perm], g, np.ones(n, bool), np.arange(n)
    )
    exp_w = np.zeros(n)
    exp_w[perm] = w_pos
    _close(weights, exp_w)
    _close(out, exp)


# ----------------------------------------------------------------------------- RSA


@pytest.mark.parametrize(
    ("n", "invalid", "opts"),
    [
        (3, False, {}),
        (10, True, {}),
        (10, True, {"clip": 2.0, "reference_sequential_clip": True}),
        (10, False, {"clip": 3.0}),
        (3, False, {"reference_frozen_buffers": True, "alpha": 0.5}),
    ],
)
def test_rsa_matches_oracle(n, invalid, opts):
    g, w, _ = _data(n, 101)
    valid = _valid(n, invalid)
    w = _neutralise(w, g, valid)
    out, _, weights = _run("rsa", _env(n), w, _ctx(g, n, valid=valid), **opts)
    kw = {
        "alpha": opts.get("alpha", 0.05),
        "clip": opts.get("clip", math.inf),
        "sequential": opts.get("reference_sequential_clip", False),
        "frozen_buffers": opts.get("reference_frozen_buffers", False),
        # The reference's clients vote in a random order, drawn here from the round key.
        "order": np.asarray(jax.random.permutation(jax.random.key(0), n)),
    }
    exp, exp_w = rsa_oracle.rsa(w, g, valid, PARAM_MASK, **kw)
    _close(weights, exp_w)
    _close(out, exp)


def test_rsa_sequential_clip_order_comes_from_the_round_key():
    # Five votes +1 (rows 0-4) and five −1 (rows 5-9): clip-after-each-addition (c = 2) ends
    # at 2 − 5 = −2 in row order and at +2 in the reverse order; the clients vote in a random
    # order drawn from the round key (the reference's online order), not in row order.
    n = 10
    g = np.zeros(D, np.float32)
    w = np.where(np.arange(n)[:, None] < 5, -1.0, 1.0) * np.ones((n, D), np.float32)
    w = w.astype(np.float32)
    outs = []
    for seed in range(6):
        out = _run(
            "rsa", _env(n), w, _ctx(g, n, seed=seed), clip=2.0, reference_sequential_clip=True
        )
        order = np.asarray(jax.random.permutation(jax.random.key(seed), n))
        exp, _ = rsa_oracle.rsa(
            w, g, np.ones(n, bool), PARAM_MASK, clip=2.0, sequential=True, order=order
        )
        _close(out[0], exp)
        outs.append(out[0][0])
    assert len({round(float(v), 6) for v in outs}) > 1  # the order changes with the key


# ----------------------------------------------------------------------------- Finetuning


@pytest.mark.parametrize(("n", "invalid"), [(3, False), (10, True)])
def test_finetuning_matches_oracle(n, invalid):
    proxy = PROXY
    g, w, _ = _data(n, 111)
    valid = _valid(n, invalid)
    w = _neutralise(w, g, valid)
    out, _, weights = _run("finetuning", _env(n), w, _ctx(g, n, valid=valid))
    train = lambda x: np.asarray(proxy.train(jnp.asarray(x, jnp.float32), None, 1))
    exp, exp_w = finetuning_oracle.finetuning(w, valid, train)
    _close(weights, exp_w)
    _close(out, exp)
    mean = exp_w @ w.astype(np.float64)
    assert proxy.loss_entropy_np(out)[0] < proxy.loss_entropy_np(mean)[0]  # it did train
    if n == 10:
        out0, _, _ = _run("finetuning", _env(n), w, _ctx(g, n, valid=valid), epochs=0)
        _close(out0, mean)


@pytest.mark.parametrize("name", ["sageflow", "finetuning"])
def test_proxy_rules_refuse_to_build_without_proxy(name):
    with pytest.raises(ValueError, match="proxy"):
        get_aggregator(name, _env(10, proxy=False))


# ----------------------------------------------------------------------------- robustness


OUTLIER_NORM = 1e4


@pytest.mark.parametrize(
    ("name", "opts"),
    [
        ("dnc", {"filter_frac": 1.0, "num_malicious": 3}),
        ("bulyan", {}),
        ("rfa", {"maxiter": 20, "data_weighted": False}),
        ("foolsgold", {}),
        ("rsa", {}),
        ("sageflow", {}),
    ],
)
def test_robust_rules_resist_huge_outliers(name, opts):
    """f = 3 < n/2 identical huge-norm rows: the robust rules stay near the benign mean."""
    n, f = 10, 3
    g, w, sizes = _data(n, 121)
    direction = np.random.default_rng(1).normal(size=D)
    w[n - f :] = g + OUTLIER_NORM * direction / np.linalg.norm(direction)
    benign = w[: n - f].astype(np.float64)
    centre = benign.mean(0)
    radius = np.max(np.linalg.norm(benign - centre, axis=1))
    ctx = _ctx(g, n, sizes=sizes)
    env = _env(n, m=f if name == "bulyan" else 0)  # m only matters to Bulyan here
    out, _, weights = _run(name, env, w, ctx, **opts)
    # RSA protects the parameters only: BN statistics take the plain client mean.
    coords = PARAM_MASK if name == "rsa" else np.ones(D, bool)
    # SageFlow's 1/loss weight falls like 1/‖outlier‖, so the outliers keep an O(1) pull
    # (bounded, independent of their norm) instead of vanishing.
    bound = 20 * radius if name == "sageflow" else 2 * radius
    assert np.linalg.norm((out - centre)[coords]) <= bound
    fedavg, _, _ = _run("fedavg", _env(n), w, ctx)
    assert np.linalg.norm(fedavg - centre) > 100 * radius
    if name in ("dnc", "bulyan", "foolsgold"):
        assert np.all(weights[n - f :] < 1e-3)  # the outliers got (essentially) no weight
