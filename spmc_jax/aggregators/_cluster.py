"""Clustering primitives for the clustering defenses (FLAME, DeepSight, RFLBAT, Auror).

All functions are jittable for a static client count n (arrays are (n, n) or (n, p)); the
loops are `lax.fori_loop`/`while_loop` over at most n steps, so they run inside the
jitted round. They are tested against scikit-learn (`sklearn.cluster.HDBSCAN`,
`KMeans`, `PCA`) in tests/aggregators/test_cluster.py.

* `hdbscan_precomputed`: HDBSCAN (Campello, Moulavi & Sander, PAKDD 2013; McInnes &
  Healy's accelerated formulation, ICDMW 2017) on a precomputed distance matrix:
  core distances (the `min_samples`-th smallest distance, the point itself included),
  mutual reachability d_mr(i, j) = max(core_i, core_j, d_ij), its minimum spanning tree
  (Prim), the single-linkage hierarchy, the tree condensed at `min_cluster_size`
  (λ = 1/distance), cluster stabilities Σ_p (λ_p − λ_birth), and excess-of-mass
  selection, with the labelling of scikit-learn/hdbscan (`allow_single_cluster`: a point
  of the root cluster is labelled iff it leaves at the root's largest λ).
* `kmeans`: Lloyd's algorithm from given initial centres (labels to convergence);
  `farthest_point_init` gives deterministic initial centres. `two_means_1d`: the exact
  optimal 2-means split of each column (a sorted-prefix scan), for per-feature clustering.
* `mean_of_kept_rule`: the stateless rule shared by the filtering defenses (Auror,
  Multi-Metrics, RFLBAT): a decision on the masked updates, then g + the uniform mean of
  the kept clients' updates.
* `pca`: principal components via the SVD of the centred data, with scikit-learn's sign
  convention (the largest-magnitude entry of each component is positive).

Rows with `valid == False` take no part: they are never neighbours, never cluster members
(label −1) and do not move centres.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from spmc_jax.aggregators.base import AggInfo, Aggregator, RoundContext

NOISE = -1
_LAMBDA_CAP = 1e30  # λ = 1/d for d = 0 (duplicate points): a finite stand-in for +inf


def cosine_distances(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """1 − cos(x_i, x_j) for all rows (zero rows: cosine 0, distance 1); exact 0 diagonal."""
    norms = jnp.linalg.norm(x, axis=1)
    unit = x / jnp.maximum(norms, eps)[:, None]
    cos = jnp.matmul(unit, unit.T, precision=jax.lax.Precision.HIGHEST)
    d = jnp.clip(1.0 - cos, 0.0, 2.0)
    d = 0.5 * (d + d.T)
    return jnp.where(jnp.eye(x.shape[0], dtype=bool), 0.0, d)


def _mst_prim(mr: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Minimum spanning tree of a dense (n, n) graph by Prim, from the first valid node.

    Invalid nodes are at +inf from everything, and attach to the start node last.

    Returns:
      (u, v, w): the n − 1 edges' endpoints and weights, in the order Prim adds them.
    """
    n = mr.shape[0]
    start = jnp.argmax(valid)
    in_tree = jnp.arange(n) == start
    best = mr[start]
    parent = jnp.full((n,), start)
    zeros_i = jnp.zeros((n - 1,), jnp.int32)

    def step(i, carry):
        in_tree, best, parent, eu, ev, ew = carry
        # Not-in-tree nodes first, then the smallest distance (ties: lowest index).
        v = jnp.lexsort((best, in_tree))[0]
        eu, ev, ew = eu.at[i].set(parent[v]), ev.at[i].set(v), ew.at[i].set(best[v])
        in_tree = in_tree.at[v].set(True)
        closer = (mr[v] < best) & ~in_tree
        return (
            in_tree,
            jnp.where(closer, mr[v], best),
            jnp.where(closer, v, parent),
            eu,
            ev,
            ew,
        )

    carry = (in_tree, best, parent, zeros_i, zeros_i, jnp.zeros((n - 1,), mr.dtype))
    _, _, _, eu, ev, ew = jax.lax.fori_loop(0, n - 1, step, carry)
    return eu, ev, ew


def single_linkage(
    eu: jax.Array, ev: jax.Array, ew: jax.Array, n: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Single-linkage hierarchy from MST edges (scipy's linkage layout).

    Merge k (edges in increasing weight, stable) creates node n + k from two existing
    nodes; points are nodes 0..n−1.

    Returns:
      left (n−1,), right (n−1,), dist (n−1,), and member (2n−1, n) bool: the points
      under each node.
    """
    order = jnp.argsort(ew, stable=True)
    eu, ev, ew = eu[order], ev[order], ew[order]
    member0 = jnp.concatenate([jnp.eye(n, dtype=bool), jnp.zeros((n - 1, n), bool)])

    def step(k, carry):
        comp, member, left, right = carry
        cu, cv = comp[eu[k]], comp[ev[k]]
        joined = (comp == cu) | (comp == cv)
        member = member.at[n + k].set(joined)
        comp = jnp.where(joined, n + k, comp)
        return comp, member, left.at[k].set(cu), right.at[k].set(cv)

    zeros_i = jnp.zeros((n - 1,), jnp.int32)
    carry = (jnp.arange(n, dtype=jnp.int32), member0, zeros_i, zeros_i)
    _, member, left, right = jax.lax.fori_loop(0, n - 1, step, carry)
    return left, right, ew, member


def hdbscan_precomputed(
    dist: jax.Array,
    min_cluster_size: int | jax.Array,
    min_samples: int | jax.Array = 1,
    valid: jax.Array | None = None,
    allow_single_cluster: bool | jax.Array = False,
) -> jax.Array:
    """HDBSCAN labels from a precomputed symmetric distance matrix (EOM selection).

    Matches `sklearn.cluster.HDBSCAN(metric="precomputed", min_cluster_size,
    min_samples, allow_single_cluster)` run on the valid rows alone, up to a permutation
    of the cluster labels (and except for exact ties between distances, which the two
    may break differently).

    Args:
      dist: (n, n) symmetric distances, zero diagonal; n >= 2 (static).
      min_cluster_size: smallest cluster (>= 2); may be traced (e.g. n_valid // 2 + 1).
      min_samples: k of the core distance, the point itself included (1..n); may be
        traced.
      valid: optional (n,) bool; invalid rows are left out (label −1).
      allow_single_cluster: whether the root (all points) may be the one cluster; may be
        traced (so one compilation serves every setting).

    Returns:
      (n,) int32 labels: −1 for noise, clusters numbered 0.. (arbitrary order).
    """
    n = dist.shape[0]
    if n < 2:
        raise ValueError(f"hdbscan_precomputed needs n >= 2 points, got n={n}")
    if isinstance(min_samples, int) and not 1 <= min_samples <= n:
        raise ValueError(f"hdbscan_precomputed: min_samples={min_samples}; accepted: 1..n={n}")
    valid = jnp.ones((n,), bool) if valid is None else valid
    eye = jnp.eye(n, dtype=bool)
    pair = valid[:, None] & valid[None, :]
    d = jnp.where(eye, 0.0, jnp.where(pair, dist, jnp.inf))
    k = jnp.clip(jnp.asarray(min_samples) - 1, 0, n - 1)
    core = jnp.take(jnp.sort(d, axis=1), k, axis=1)
    mr = jnp.maximum(d, jnp.maximum(core[:, None], core[None, :]))
    mr = jnp.where(pair, mr, jnp.inf)

    eu, ev, ew = _mst_prim(mr, valid)
    left, right, ldist, member = single_linkage(eu, ev, ew, n)
    n_nodes = 2 * n - 1
    root = n_nodes - 1
    size = jnp.sum(member, axis=1)
    lam = 1.0 / jnp.maximum(ldist, 1.0 / _LAMBDA_CAP)  # +inf distance -> λ = 0
    mcs = jnp.asarray(min_cluster_size)

    # Condense top-down (a node's index exceeds its children's): `relabel` maps a
    # hierarchy node to the condensed cluster (itself a node id) it belongs to, -1 when
    # its points have already fallen out.
    def condense(j, carry):
        relabel, p_parent, p_lam, c_parent, c_birth, is_cl = carry
        k = n - 2 - j
        v = n + k
        c = relabel[v]
        active = c >= 0
        lk, rk, lm = left[k], right[k], lam[k]
        big_l, big_r = size[lk] >= mcs, size[rk] >= mcs
        split = active & big_l & big_r
        cont_l = active & big_l & ~big_r
        cont_r = active & big_r & ~big_l
        none = active & ~big_l & ~big_r
        relabel = relabel.at[lk].set(jnp.where(split, lk, jnp.where(cont_l, c, -1)))
        relabel = relabel.at[rk].set(jnp.where(split, rk, jnp.where(cont_r, c, -1)))
        for child in (lk, rk):
            c_parent = c_parent.at[child].set(jnp.where(split, c, c_parent[child]))
            c_birth = c_birth.at[child].set(jnp.where(split, lm, c_birth[child]))
            is_cl = is_cl.at[child].set(is_cl[child] | split)
        fall = (cont_l & member[rk]) | (cont_r & member[lk]) | (none & member[v])
        return (
            relabel,
            jnp.where(fall, c, p_parent),
            jnp.where(fall, lm, p_lam),
            c_parent,
            c_birth,
            is_cl,
        )

    init = (
        jnp.full((n_nodes,), -1, jnp.int32).at[root].set(root),
        jnp.full((n,), -1, jnp.int32),
        jnp.zeros((n,), lam.dtype),
        jnp.full((n_nodes,), -1, jnp.int32),
        jnp.zeros((n_nodes,), lam.dtype),
        jnp.zeros((n_nodes,), bool).at[root].set(True),
    )
    _, p_parent, p_lam, c_parent, c_birth, is_cl = jax.lax.fori_loop(0, n - 1, condense, init)

    # Stability of cluster c: Σ over its condensed-tree rows of (λ − birth_c)·size, the
    # rows being the points falling out of c and its child clusters (born at their λ).
    nodes = jnp.arange(n_nodes)
    p_onehot = (p_parent[:, None] == nodes[None, :]) & valid[:, None]
    c_onehot = (c_parent[:, None] == nodes[None, :]) & is_cl[:, None]
    c_size = size.astype(lam.dtype)
    stab = (
        p_lam @ p_onehot
        - c_birth * jnp.sum(p_onehot, axis=0)
        + (c_birth * c_size) @ c_onehot
        - c_birth * (c_size @ c_onehot)
    )
    overlap = (member.astype(jnp.int32) @ member.T.astype(jnp.int32)) > 0

    # Excess of mass, bottom-up (children have smaller node ids than their parent).
    def eom(k, carry):
        selected, eff = carry
        c = n + k
        children = c_onehot[:, c]
        subtree = jnp.sum(jnp.where(children, eff, 0.0))
        eligible = is_cl[c] & ((c != root) | allow_single_cluster)
        take = eligible & ~(subtree > stab[c])
        eff = eff.at[c].set(jnp.where(take, stab[c], subtree))
        below = overlap[c] & (nodes < c)
        selected = jnp.where(take & below, False, selected).at[c].set(take)
        return selected, eff

    selected, _ = jax.lax.fori_loop(
        0, n - 1, eom, (jnp.zeros((n_nodes,), bool), jnp.zeros((n_nodes,), lam.dtype))
    )

    in_sel = member.T & selected[None, :]  # (n, n_nodes): at most one True per point
    has = jnp.any(in_sel, axis=1)
    node_of = jnp.argmax(in_sel, axis=1)
    # The root as the single cluster: only points leaving at its largest λ are members.
    root_rows = jnp.concatenate(
        [
            jnp.where(p_onehot[:, root], p_lam, -jnp.inf),
            jnp.where(c_onehot[:, root], c_birth, -jnp.inf),
        ]
    )
    in_root = p_lam >= jnp.max(root_rows)
    has = has & ((node_of != root) | in_root) & valid
    rank = jnp.cumsum(selected) - 1
    return jnp.where(has, rank[node_of], NOISE).astype(jnp.int32)


def farthest_point_init(x: jax.Array, k: int, valid: jax.Array | None = None) -> jax.Array:
    """k deterministic initial centres: the valid row closest to the valid mean, then
    repeatedly the valid row farthest from the centres chosen so far (ties: lowest index).

    Returns:
      (k, p) centres (rows of x).
    """
    n = x.shape[0]
    valid = jnp.ones((n,), bool) if valid is None else valid
    mean = jnp.sum(jnp.where(valid[:, None], x, 0.0), 0) / jnp.maximum(jnp.sum(valid), 1)
    d0 = jnp.where(valid, jnp.sum((x - mean) ** 2, axis=1), jnp.inf)
    first = jnp.argmin(d0)
    mind = jnp.where(valid, jnp.sum((x - x[first]) ** 2, axis=1), -jnp.inf)
    idx = jnp.zeros((k,), jnp.int32).at[0].set(first)

    def step(j, carry):
        idx, mind = carry
        nxt = jnp.argmax(mind)
        mind = jnp.minimum(mind, jnp.where(valid, jnp.sum((x - x[nxt]) ** 2, axis=1), -jnp.inf))
        return idx.at[j].set(nxt), mind

    idx, _ = jax.lax.fori_loop(1, k, step, (idx, mind))
    return x[idx]


def kmeans(
    x: jax.Array,
    init_centers: jax.Array,
    valid: jax.Array | None = None,
    max_iter: int = 300,
    n_active: int | jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Lloyd's k-means from `init_centers` until the assignment stops changing.

    Assignment: the nearest centre (ties: lowest index). An emptied cluster keeps its
    centre (scikit-learn would move it to a far point; with farthest-point initial
    centres on distinct points no cluster empties in practice).

    Args:
      x: (n, p) points.
      init_centers: (k, p) initial centres.
      valid: optional (n,) bool; invalid points get label −1 and move no centre.
      max_iter: bound on the Lloyd iterations.
      n_active: use only the first `n_active` centres (may be traced, e.g. to run every
        k ≤ k_max under one `vmap`); the others are never assigned. Default: all.

    Returns:
      (labels (n,) int32, centres (k, p)).
    """
    n = x.shape[0]
    valid = jnp.ones((n,), bool) if valid is None else valid

    def assign(c):
        # ‖x − c‖² up to the row constant ‖x‖²: (n, k) memory, not (n, k, p).
        cross = jnp.matmul(x, c.T, precision=jax.lax.Precision.HIGHEST)
        d2 = jnp.sum(c**2, axis=1)[None, :] - 2.0 * cross
        if n_active is not None:
            d2 = jnp.where(jnp.arange(c.shape[0])[None, :] < n_active, d2, jnp.inf)
        return jnp.argmin(d2, axis=1).astype(jnp.int32)

    def update(labels, c):
        onehot = (labels[:, None] == jnp.arange(c.shape[0])[None, :]) & valid[:, None]
        counts = jnp.sum(onehot, axis=0)
        sums = onehot.T.astype(x.dtype) @ x
        return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], c)

    def cond(carry):
        it, labels, prev, _ = carry
        return (it < max_iter) & ((it == 0) | jnp.any(labels != prev))

    def body(carry):
        it, labels, _, c = carry
        c = update(labels, c)
        return it + 1, assign(c), labels, c

    lab0 = assign(init_centers)
    _, labels, _, centers = jax.lax.while_loop(
        cond, body, (jnp.asarray(0), lab0, lab0, init_centers.astype(x.dtype))
    )
    return jnp.where(valid, labels, NOISE).astype(jnp.int32), centers


def two_means_1d(values: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Distance between the two centres of the optimal 2-means split of each column.

    In one dimension the optimal 2-means clusters are a split of the sorted values into a
    lower and an upper run, so the global optimum (what scikit-learn's `KMeans(2)` finds
    with enough restarts) is the split s maximising S_s²/s + (S_m − S_s)²/(m − s) over
    the m valid values (S_s: sum of the s smallest). Columns are independent.

    Args:
      values: (n, d): n points per column, d columns.
      valid: optional (n,) bool rows to use.

    Returns:
      (d,) μ_upper − μ_lower ≥ 0 (0 when fewer than 2 valid rows).
    """
    n = values.shape[0]
    valid = jnp.ones((n,), bool) if valid is None else valid
    m = jnp.sum(valid)
    mean = jnp.sum(jnp.where(valid[:, None], values, 0.0), 0) / jnp.maximum(m, 1)
    v = jnp.where(valid[:, None], values - mean, jnp.inf)  # invalid rows sort last
    v = jnp.sort(v, axis=0)
    v = jnp.where(jnp.arange(n)[:, None] < m, v, 0.0)
    prefix = jnp.cumsum(v, axis=0)[:-1]  # S_s for s = 1..n-1
    total = jnp.sum(v, axis=0)
    s = jnp.arange(1, n, dtype=values.dtype)[:, None]
    rest = jnp.maximum(m - s, 1)
    gain = prefix**2 / s + (total - prefix) ** 2 / rest
    gain = jnp.where(s < m, gain, -jnp.inf)
    best = jnp.argmax(gain, axis=0)
    sb = s[best, 0]
    sl = jnp.take_along_axis(prefix, best[None, :], axis=0)[0]
    gap = (total - sl) / jnp.maximum(m - sb, 1) - sl / sb
    return jnp.where(m >= 2, gap, 0.0)


def pca(
    x: jax.Array, n_components: int, valid: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """PCA by SVD of the (valid-)mean-centred data, scikit-learn's sign convention.

    Returns:
      (projections (n, n_components) of every row, explained variances (n_components,)
      with denominator n_valid − 1).
    """
    n = x.shape[0]
    valid = jnp.ones((n,), bool) if valid is None else valid
    n_valid = jnp.sum(valid)
    mean = jnp.sum(jnp.where(valid[:, None], x, 0.0), 0) / jnp.maximum(n_valid, 1)
    xc = jnp.where(valid[:, None], x - mean, 0.0)
    _, s, vt = jnp.linalg.svd(xc, full_matrices=False)
    vt = vt[:n_components]
    pivot = jnp.take_along_axis(vt, jnp.argmax(jnp.abs(vt), axis=1)[:, None], axis=1)
    vt = vt * jnp.where(pivot < 0, -1.0, 1.0)
    proj = jnp.matmul(x - mean, vt.T, precision=jax.lax.Precision.HIGHEST)
    var = s[:n_components] ** 2 / jnp.maximum(n_valid - 1, 1)
    return proj, var


def mean_of_kept_rule(
    param_mask: np.ndarray, kept_of: Callable[[jax.Array, RoundContext], jax.Array]
) -> Aggregator:
    """A stateless filtering rule: g' = g + (1/L)·Σ_{i kept} Δ_i, Δ_i = w_i − g.

    `kept_of(masked_deltas, ctx) -> (n,) bool` decides on the updates with the
    non-trainable coordinates (BatchNorm statistics, `param_mask == False`) zeroed; the mean
    then covers every coordinate. client_weights = 1/L on the L kept clients (all 0 when
    none is kept, and g' = g).
    """
    mask = jnp.asarray(np.asarray(param_mask, bool))

    def init(global_flat: jax.Array) -> tuple[()]:
        return ()

    def aggregate(
        client_flat: jax.Array, state: tuple[()], ctx: RoundContext
    ) -> tuple[jax.Array, tuple[()], AggInfo]:
        deltas = client_flat - ctx.global_flat[None, :]
        kept = kept_of(jnp.where(mask[None, :], deltas, 0.0), ctx)
        w = kept.astype(jnp.float32) / jnp.maximum(jnp.sum(kept), 1)
        new_global = ctx.global_flat + jnp.matmul(w, deltas, precision=jax.lax.Precision.HIGHEST)
        return new_global, state, AggInfo(client_weights=w)

    return Aggregator(init, aggregate)
