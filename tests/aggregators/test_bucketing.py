"""Bucketing against its float64 oracle (tests/reference/bucketing_oracle.py).

The permutation is drawn by the rule (`bucket_order` from the round key); the oracle gets
that permutation and does the bucketing and the inner rule itself (median / Krum oracles).
Tolerance: float32 bucket means of O(0.1) updates, then a median or selection: ~1e-7
rounding; ATOL 1e-5. Krum's selection must match exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmc_jax.aggregators import get_aggregator
from spmc_jax.aggregators.bucketing import bucket_order
from tests.reference import bucketing_oracle, krum_oracle, median_oracle

from .conftest import make_ctx, make_env

D = 24
ATOL = 1e-5


def _data(n, seed):
    rng = np.random.default_rng(seed)
    g = rng.normal(size=D).astype(np.float32)
    return g, (g + 0.1 * rng.normal(size=(n, D))).astype(np.float32)


def _run(env, w, ctx, **opts):
    agg = get_aggregator("bucketing", env, **opts)
    out, _, info = jax.jit(agg.aggregate)(jnp.asarray(w), agg.init(ctx.global_flat), ctx)
    return np.asarray(out, np.float64), np.asarray(info.client_weights, np.float64)


def _order(ctx):
    k_perm, _ = jax.random.split(ctx.key)
    return np.asarray(bucket_order(k_perm, ctx.client_ids))


def _median_inner(g, models, valid):
    return median_oracle.median(g, models, valid), median_oracle.median_shares(models, valid)


@pytest.mark.parametrize(("n", "s"), [(10, 3), (7, 2)])
def test_bucketing_median_matches_oracle(n, s):
    g, w = _data(n, n + s)
    valid = np.ones(n, bool)
    valid[1] = False
    w[1] = g  # a sanitised row, as the engine passes it
    env = make_env(n, D, num_malicious=1)
    ctx = make_ctx(g, n, seed=s, valid=valid, client_ids=np.arange(100, 100 + n))
    out, weights = _run(env, w, ctx, bucket_size=s)
    exp, exp_w = bucketing_oracle.bucketing(g, w, _order(ctx), s, _median_inner, valid)
    np.testing.assert_allclose(out, exp, atol=ATOL)
    np.testing.assert_allclose(weights, exp_w, atol=ATOL)
    assert weights[1] == 0.0 and weights.sum() == pytest.approx(1.0, abs=1e-6)


def test_bucketing_krum_with_inner_options_matches_oracle():
    n, s, f = 12, 2, 1
    g, w = _data(n, 3)
    w[0] += 3.0  # an outlier: its bucket must not be selected
    env = make_env(n, D, num_malicious=f)
    ctx = make_ctx(g, n, seed=4)

    def krum_inner(num_neighbors):
        def inner(g_, models, valid):
            new, best = krum_oracle.krum(
                g_, models, f, valid, num_neighbors=num_neighbors, mask=env.param_mask
            )
            return new, np.eye(models.shape[0])[best]

        return inner

    for opts, nn_ in (({}, None), ({"inner_opts": "num_neighbors=1;squared=true"}, 1)):
        out, weights = _run(env, w, ctx, bucket_size=s, inner="krum", **opts)
        exp, exp_w = bucketing_oracle.bucketing(g, w, _order(ctx), s, krum_inner(nn_))
        np.testing.assert_allclose(out, exp, atol=ATOL)
        np.testing.assert_allclose(weights, exp_w, atol=ATOL)
        assert weights[0] == 0.0
    # num_neighbors reached Krum: with 1 neighbour the two closest buckets tie, with the
    # default 6 - 1 - 2 = 3 the choice is made on more distances; both follow the oracle.


def test_bucket_order_is_a_permutation_tied_to_client_ids():
    key = jax.random.key(0)
    ids = jnp.arange(20, dtype=jnp.int32) * 3
    order = np.asarray(bucket_order(key, ids))
    assert sorted(order) == list(range(20))
    assert not np.array_equal(order, np.asarray(bucket_order(jax.random.key(1), ids)))
    perm = np.random.default_rng(0).permutation(20)
    order_p = np.asarray(bucket_order(key, ids[perm]))
    np.testing.assert_array_equal(np.asarray(ids)[perm][order_p], np.asarray(ids)[order])


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({"bucket_size": 0}, "bucket_size=0"),
        ({"inner": "nope"}, "unknown inner rule 'nope'"),
        ({"inner": "bucketing"}, "inner='bucketing'"),
        ({"inner": "krum"}, "neighbour count"),  # 2 buckets of 5: Krum needs f + 3
        ({"inner_opts": "trim"}, "inner_opts='trim'"),
        ({"inner_opts": "bogus=1"}, "no option 'bogus'"),
    ],
)
def test_bucketing_rejects_bad_options(opts, match):
    with pytest.raises(ValueError, match=match):
        get_aggregator("bucketing", make_env(10, D, num_malicious=1), **{"bucket_size": 5, **opts})
