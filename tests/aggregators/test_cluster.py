"""The JAX clustering primitives (`spmc_jax.aggregators._cluster`) against scikit-learn.

Oracles: `sklearn.cluster.HDBSCAN(metric="precomputed")` (float64), `KMeans` with the same
initial centres (`n_init=1`, Lloyd), `PCA` (full SVD). Inputs: random Gaussian blobs and
adversarial layouts (a tight minority cluster next to a diffuse majority, far outliers,
non-finite-row masks). Distances are well separated (no exact ties), so the float32 JAX
run must reproduce the labels exactly, up to a permutation of the cluster ids.
Tolerances: PCA projections 1e-4 absolute on O(1) values (float32 SVD of a 12×6 matrix).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.distance import cdist
from sklearn.cluster import HDBSCAN, KMeans
from sklearn.decomposition import PCA

from spmc_jax.aggregators._cluster import (
    cosine_distances,
    farthest_point_init,
    hdbscan_precomputed,
    kmeans,
    pca,
)

# XLA backend optimisations only change fusion/rounding; skipping them cuts compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@functools.partial(jax.jit, compiler_options=FAST_COMPILE)
def _hdbscan_batch(dists, mcs, min_samples, single, valid):
    """Every setting is traced, so each matrix size compiles once."""
    return jax.vmap(hdbscan_precomputed)(dists, mcs, min_samples, valid, single)


def _hdbscan(dist, mcs, min_samples=1, valid=None, single=False):
    n = dist.shape[0]
    valid = np.ones(n, bool) if valid is None else valid
    return _hdbscan_batch(
        jnp.asarray(dist, jnp.float32)[None],
        jnp.asarray([mcs]),
        jnp.asarray([min_samples]),
        jnp.asarray([single]),
        jnp.asarray(valid)[None],
    )[0]


_kmeans = jax.jit(kmeans, compiler_options=FAST_COMPILE)


def same_partition(a, b) -> bool:
    """Equal labels up to a bijection of the cluster ids, with noise (-1) kept as noise."""
    a, b = np.asarray(a), np.asarray(b)
    if not np.array_equal(a == -1, b == -1):
        return False
    fwd: dict[int, int] = {}
    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        if x != -1 and fwd.setdefault(x, y) != y:
            return False
    return len(set(fwd.values())) == len(fwd)


def sk_hdbscan(dist, mcs, ms, single):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # sklearn's `copy` default change
        est = HDBSCAN(
            min_cluster_size=mcs, min_samples=ms, metric="precomputed", allow_single_cluster=single
        )
        return est.fit(dist).labels_


def _blobs(rng, n, k, dim=5, spread=4.0):
    centres = rng.normal(size=(k, dim)) * spread
    return centres[rng.integers(0, k, n)] + rng.normal(size=(n, dim))


def _adversarial(rng, n):
    """A diffuse majority, a tight minority (a backdoor-like group) and two far outliers."""
    n_min = max(2, n // 4)
    major = rng.normal(size=(n - n_min - 2, 6))
    minor = 3.0 + 0.05 * rng.normal(size=(n_min, 6))
    far = 25.0 * rng.normal(size=(2, 6))
    return rng.permutation(np.concatenate([major, minor, far]))


@pytest.mark.parametrize("n", [7, 16])
def test_hdbscan_matches_sklearn(n):
    dists = []
    for seed in range(12):
        rng = np.random.default_rng(seed)
        x = _adversarial(rng, n) if seed % 3 == 0 else _blobs(rng, n, 1 + seed % 4)
        dists.append(cdist(x, x))
    cases = [
        (d, mcs, ms, single)
        for d in dists
        for mcs in sorted({2, 3, n // 2 + 1})
        for ms in (1, 2)
        for single in (False, True)
    ]
    got = _hdbscan_batch(  # one vmapped call for all cases
        jnp.asarray(np.stack([c[0] for c in cases]), jnp.float32),
        jnp.asarray([c[1] for c in cases]),
        jnp.asarray([c[2] for c in cases]),
        jnp.asarray([c[3] for c in cases]),
        jnp.ones((len(cases), n), bool),
    )
    for (dist, mcs, ms, single), labels in zip(cases, np.asarray(got), strict=True):
        ref = sk_hdbscan(dist, mcs, ms, single)
        assert same_partition(ref, labels), (mcs, ms, single, ref, labels)


def test_hdbscan_finds_planted_clusters_and_noise():
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [rng.normal(size=(8, 3)), 10 + 0.1 * rng.normal(size=(7, 3)), [[50.0, -50, 50]]]
    )
    labels = np.asarray(_hdbscan(cdist(x, x), 3))
    assert len(set(labels[:8].tolist())) == 1 and len(set(labels[8:15].tolist())) == 1
    assert labels[0] != labels[8] and labels[0] >= 0 and labels[8] >= 0
    assert labels[15] == -1


def test_hdbscan_valid_mask_equals_sklearn_on_the_valid_rows():
    n = 16
    for seed in range(4):
        rng = np.random.default_rng(100 + seed)
        x = _blobs(rng, n, 2 + seed % 2)
        valid = np.ones(n, bool)
        valid[rng.choice(n, 3, replace=False)] = False
        dist = cdist(x, x)
        dist_bad = dist.copy()
        dist_bad[~valid] = 0.0  # whatever invalid rows hold must not matter
        dist_bad[:, ~valid] = 0.0
        n_valid = int(valid.sum())
        for mcs, single in ((3, False), (n_valid // 2 + 1, True)):
            ref = sk_hdbscan(dist[np.ix_(valid, valid)], mcs, 1, single)
            got = np.asarray(_hdbscan(dist_bad, mcs, 1, valid, single))
            assert np.all(got[~valid] == -1)
            assert same_partition(ref, got[valid]), (seed, mcs, ref, got)


def test_hdbscan_duplicates_form_one_cluster():
    dist = np.zeros((7, 7), np.float32)
    labels = np.asarray(_hdbscan(dist, 3, 1, None, True))
    np.testing.assert_array_equal(labels, 0)


def test_hdbscan_rejects_bad_sizes():
    with pytest.raises(ValueError, match="n >= 2"):
        hdbscan_precomputed(jnp.zeros((1, 1)), 2)
    with pytest.raises(ValueError, match="min_samples=0"):
        hdbscan_precomputed(jnp.zeros((4, 4)), 2, min_samples=0)


def test_cosine_distances_match_scipy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(9, 30))
    got = np.asarray(cosine_distances(jnp.asarray(x, jnp.float32)))
    np.testing.assert_allclose(got, cdist(x, x, "cosine"), atol=1e-6)  # float32 dot products


@pytest.mark.parametrize("k", [2, 3])
def test_kmeans_matches_sklearn_from_the_same_init(k):
    for seed in range(8):
        rng = np.random.default_rng(seed)
        x = _blobs(rng, 20, k + seed % 2, dim=3, spread=2.0)
        init = np.asarray(farthest_point_init(jnp.asarray(x, jnp.float32), k))
        ref = KMeans(k, init=init.astype(np.float64), n_init=1, algorithm="lloyd", tol=0.0)
        ref.fit(x)
        labels, centres = _kmeans(jnp.asarray(x, jnp.float32), jnp.asarray(init))
        assert same_partition(ref.labels_, labels), seed
        order = np.asarray(labels)
        for c in range(k):
            np.testing.assert_allclose(
                np.asarray(centres)[c], ref.cluster_centers_[ref.labels_[order == c][0]], atol=1e-5
            )


def test_farthest_point_init_is_deterministic_and_skips_invalid():
    x = jnp.asarray([[0.0, 0], [1, 0], [10, 0], [100, 0], [0.5, 0]])
    valid = jnp.asarray([True, True, True, False, True])
    c = np.asarray(farthest_point_init(x, 2, valid))
    # mean of the valid rows is (2.875, 0): closest row is (1, 0); the farthest from it (10, 0)
    np.testing.assert_array_equal(c, [[1.0, 0], [10, 0]])
    labels, _ = kmeans(x, jnp.asarray(c), valid)
    assert np.asarray(labels)[3] == -1


def test_pca_matches_sklearn():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(12, 6)) @ rng.normal(size=(6, 6))
    proj, var = pca(jnp.asarray(x, jnp.float32), 2)
    ref = PCA(n_components=2, svd_solver="full").fit(x)
    np.testing.assert_allclose(np.asarray(proj), ref.transform(x), atol=1e-4)
    np.testing.assert_allclose(np.asarray(var), ref.explained_variance_, rtol=1e-4)
    valid = np.ones(12, bool)
    valid[[2, 5]] = False
    proj_v, _ = pca(jnp.asarray(x, jnp.float32), 2, jnp.asarray(valid))
    ref_v = PCA(n_components=2, svd_solver="full").fit(x[valid])
    np.testing.assert_allclose(np.asarray(proj_v)[valid], ref_v.transform(x[valid]), atol=1e-4)
