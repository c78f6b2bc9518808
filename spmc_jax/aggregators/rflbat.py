"""RFLBAT (Wang, Zhai, Zhan & Xia, "RFLBAT: A Robust Federated Learning Algorithm against
Backdoor Attack", arXiv:2201.03772, 2022, Algorithm 1).

With updates Δ_i = w_i − g (trainable parameters, `env.param_mask`):

1. PCA: x_i = the projection of Δ_i on the first two principal components.
2. Outlier removal: ed_i = Σ_j ‖x_i − x_j‖; clients with ed_i > ε₁·median(ed) are removed.
3. Clustering: the number of clusters K is chosen by the gap statistic (Tibshirani,
   Walther & Hastie 2001) on the min-max scaled points: W_k = k-means within-cluster sum
   of squares, Gap(k) = mean_b log W*_kb − log W_k over B uniform reference sets in the
   unit square, s_k = sd_b(log W*_kb)·√(1 + 1/B), K = the smallest k with
   Gap(k) ≥ Gap(k+1) − s_{k+1} (k ≤ K_max); then k-means with K clusters on x.
4. Cluster selection: for each cluster c, s_c = median_{i∈c} mean_{j∈c} cos(x_i, x_j)
   (s_c = 1 for a single client); the cluster with the lowest s_c is taken as benign
   (backdoor updates resemble each other).
5. Second outlier removal inside it: ed'_i = Σ_{j∈c} ‖x_i − x_j‖ > ε₂·median(ed') removed.
6. g' = g + mean_{kept} Δ_i (uniform; BatchNorm statistics included).

ε₁ = 10, ε₂ = 4, K_max = 10, B = 5 as in the authors' setting. k-means runs in JAX
(`_cluster.kmeans`, Lloyd from deterministic farthest-point centres instead of the
authors' random k-means++ starts) and the reference sets are drawn from ctx.key, so the
round is deterministic given the key.

Invalid (non-finite) rows take no part and get weight 0. If no client survives (only
possible in degenerate layouts) the valid clients are averaged. client_weights = 1/L on
the L kept clients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spmc_jax.aggregators import register
from spmc_jax.aggregators._cluster import farthest_point_init, kmeans, mean_of_kept_rule, pca
from spmc_jax.aggregators.base import Aggregator, AggregatorEnv, AggregatorSpec, RoundContext


def _dists(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum((x[:, None, :] - x[None, :, :]) ** 2, axis=-1))


def outlier_keep(x: jax.Array, members: jax.Array, eps: float) -> jax.Array:
    """Members with Σ_{j member} ‖x_i − x_j‖ ≤ eps · median over members of that sum."""
    ed = jnp.sum(jnp.where(members[None, :], _dists(x), 0.0), axis=1)
    med = jnp.nanmedian(jnp.where(members, ed, jnp.nan))
    return members & (ed <= eps * med)


def reference_sets(key: jax.Array, n_sets: int, n: int) -> jax.Array:
    """The gap statistic's B uniform reference sets in [0, 1]², (B, n, 2); set b uses
    its first m points (m = the number of clustered clients)."""
    return jax.random.uniform(key, (n_sets, n, 2))


def within_ss(x: jax.Array, members: jax.Array, k_max: int) -> jax.Array:
    """W_k, k = 1..k_max: k-means (farthest-point init, Lloyd) within-cluster sum of
    squares of the member rows of x."""
    init = farthest_point_init(x, k_max, members)

    def one(k):
        labels, centres = kmeans(x, init, members, n_active=k)
        diff = x - centres[jnp.maximum(labels, 0)]
        return jnp.sum(jnp.where(members, jnp.sum(diff**2, axis=1), 0.0))

    return jax.vmap(one)(jnp.arange(1, k_max + 1))


def gap_statistic_k(
    x: jax.Array, members: jax.Array, refs: jax.Array, k_max: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Tibshirani's choice of k on the member rows of x (min-max scaled per axis).

    Returns:
      (k (int32 scalar), gap (k_max,), s (k_max,)).
    """
    n = x.shape[0]
    m = jnp.sum(members)
    lo = jnp.min(jnp.where(members[:, None], x, jnp.inf), axis=0)
    hi = jnp.max(jnp.where(members[:, None], x, -jnp.inf), axis=0)
    span = jnp.where(hi > lo, hi - lo, 1.0)
    z = jnp.where(members[:, None], (x - lo) / span, 0.0)
    tiny = jnp.finfo(x.dtype).tiny
    log_w = jnp.log(jnp.maximum(within_ss(z, members, k_max), tiny))
    ref_members = jnp.arange(n) < m
    log_wb = jnp.log(jnp.maximum(jax.vmap(lambda r: within_ss(r, ref_members, k_max))(refs), tiny))
    n_sets = refs.shape[0]
    gap = jnp.mean(log_wb, axis=0) - log_w
    s = jnp.std(log_wb, axis=0) * jnp.sqrt(1.0 + 1.0 / n_sets)
    ks = jnp.arange(1, k_max + 1)
    ok = (gap[:-1] >= gap[1:] - s[1:]) & (ks[1:] <= m)
    first = jnp.argmax(ok) + 1
    k = jnp.where(jnp.any(ok), first, jnp.minimum(k_max, jnp.maximum(m, 1)))
    return k.astype(jnp.int32), gap, s


def rflbat_kept(
    deltas: jax.Array,
    valid: jax.Array,
    key: jax.Array,
    eps1: float,
    eps2: float,
    k_max: int,
    n_sets: int,
) -> jax.Array:
    """RFLBAT's decision on (masked) updates: the (n,) bool mask of kept clients."""
    n = deltas.shape[0]
    x, _ = pca(deltas, 2, valid)
    x = jnp.where(valid[:, None], x, 0.0)
    acc = outlier_keep(x, valid, eps1)
    k, _, _ = gap_statistic_k(x, acc, reference_sets(key, n_sets, n), k_max)
    labels, _ = kmeans(x, farthest_point_init(x, k_max, acc), acc, n_active=k)
    norms = jnp.linalg.norm(x, axis=1)
    unit = x / jnp.maximum(norms, 1e-30)[:, None]
    cos = unit @ unit.T

    def cluster_score(c):
        mem = labels == c
        size = jnp.sum(mem)
        mean_cos = jnp.sum(jnp.where(mem[None, :], cos, 0.0), axis=1) / jnp.maximum(size, 1)
        med = jnp.nanmedian(jnp.where(mem, mean_cos, jnp.nan))
        return jnp.where(size == 0, jnp.inf, jnp.where(size == 1, 1.0, med))

    scores = jax.vmap(cluster_score)(jnp.arange(k_max))
    chosen = labels == jnp.argmin(scores)
    return outlier_keep(x, chosen & acc, eps2)


def rflbat(
    env: AggregatorEnv,
    *,
    eps1: float = 10.0,
    eps2: float = 4.0,
    k_max: int = 10,
    n_reference_sets: int = 5,
) -> Aggregator:
    """Build RFLBAT (see the module docstring).

    Args:
      env: run facts; uses n_clients and param_mask.
      eps1, eps2: the two outlier thresholds (multiples of the median summed distance).
      k_max: the largest cluster count the gap statistic considers (capped at n).
      n_reference_sets: B, the gap statistic's uniform reference sets.
    """
    if eps1 <= 0 or eps2 <= 0:
        raise ValueError(f"rflbat: eps1={eps1}, eps2={eps2}; accepted: both > 0")
    if k_max < 1:
        raise ValueError(f"rflbat: k_max={k_max}; accepted: >= 1")
    if n_reference_sets < 2:
        raise ValueError(f"rflbat: n_reference_sets={n_reference_sets}; accepted: >= 2")
    k_cap = max(1, min(k_max, env.n_clients))

    def kept_of(deltas: jax.Array, ctx: RoundContext) -> jax.Array:
        kept = rflbat_kept(deltas, ctx.valid, ctx.key, eps1, eps2, k_cap, n_reference_sets)
        return jnp.where(jnp.any(kept), kept, ctx.valid)

    return mean_of_kept_rule(env.param_mask, kept_of)


register(
    AggregatorSpec(
        "rflbat",
        rflbat,
        "RFLBAT (arXiv'22): 2-D PCA of updates, distance-outlier removal (eps1), k-means with "
        "gap-statistic k, keep the cluster of lowest median cosine, second removal (eps2)",
    )
)
