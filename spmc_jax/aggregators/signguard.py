"""SignGuard (Xu, Huang, Song & Lan, "Byzantine-robust Federated Learning through
Collaborative Malicious Gradient Filtering", ICDCS 2022, Algorithm 1).

With updates Δ_i = w_i − g on the trainable parameters (`env.param_mask`) and
M = median_i ‖Δ_i‖ over the valid clients:

    S1  = {i : L·M < ‖Δ_i‖ < R·M}                           (norm filter; L = 0.1, R = 3.0)
    C   = a random subset of ⌊frac·d⌋ parameter coordinates  (frac = 0.1, key per round)
    p_i, z_i, n_i = fractions of the coordinates in C where Δ_i > 0, = 0, < 0
    φ_i = (p_i / max_j p_j, z_i / max_j z_j, n_i / max_j n_j)  (sign features)
    S2  = the largest cluster of MeanShift(φ)                (flat kernel, bandwidth from
                                                              estimate_bandwidth(quantile=0.5),
                                                              orphans left out)
    S   = S1 ∩ S2
    g'  = g + (1/|S|) Σ_{i ∈ S} Δ_i · min(1, M / ‖Δ_i‖)      (clipping to the median norm)

The max-normalisation of the features, the bandwidth quantile 0.5 and `cluster_all=False`
follow the authors' code; MeanShift is `_meanshift.mean_shift` (tested against
scikit-learn). The authors pick C as a random contiguous window; the paper's random subset
is used here.

Details: BatchNorm statistics (param_mask False) are not clipped and take the plain mean
over S. Non-finite rows (`ctx.valid` False) are left out of M, of the clustering and of S.
If S is empty the rule falls back to S1 (then to all valid clients), so a round never
stalls. With n ≤ 3 the bandwidth estimate is 0 (the nearest point is the point itself)
and clusters are groups of identical feature vectors.

client_weights: 1/|S| on S (the clipping factor is not included).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from spmc_jax.aggregators import register
from spmc_jax.aggregators._meanshift import largest_cluster, mean_shift
from spmc_jax.aggregators._robust import coordinate_median
from spmc_jax.aggregators.base import AggInfo, Aggregator, AggregatorEnv, AggregatorSpec


def sign_features(delta_c: jax.Array, valid: jax.Array) -> jax.Array:
    """(n, 3) SignGuard features of the updates restricted to the sampled coordinates."""
    frac = jnp.stack(
        [
            jnp.mean(delta_c > 0, axis=1),
            jnp.mean(delta_c == 0, axis=1),
            jnp.mean(delta_c < 0, axis=1),
        ],
        axis=1,
    ).astype(jnp.float32)
    top = jnp.max(jnp.where(valid[:, None], frac, 0.0), axis=0)
    return frac / (top + 1e-8)


def signguard_selection(
    delta: jax.Array,
    valid: jax.Array,
    coords: jax.Array,
    lower: float,
    upper: float,
    quantile: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(selected mask S (n,), median norm M, norms (n,)) for parameter updates `delta`."""
    norms = jnp.linalg.norm(delta, axis=1)
    med = coordinate_median(norms[:, None], valid)[0]
    s1 = valid & (norms > lower * med) & (norms < upper * med)
    feats = sign_features(delta[:, coords], valid)
    s2 = largest_cluster(mean_shift(feats, valid, quantile=quantile, cluster_all=False).labels)
    sel = s1 & s2
    sel = jnp.where(jnp.any(sel), sel, jnp.where(jnp.any(s1), s1, valid))
    return sel, med, norms


def signguard(
    env: AggregatorEnv,
    *,
    lower: float = 0.1,
    upper: float = 3.0,
    coord_fraction: float = 0.1,
    bandwidth_quantile: float = 0.5,
) -> Aggregator:
    """Build SignGuard (see the module docstring for the formula and the options).

    Args:
      env: run facts; uses param_mask.
      lower, upper: norm-filter bounds L < R relative to the median norm.
      coord_fraction: fraction of the parameter coordinates whose signs are counted.
      bandwidth_quantile: quantile of `estimate_bandwidth` for MeanShift's bandwidth.
    """
    if not 0.0 <= lower < upper:
        raise ValueError(f"signguard: lower={lower}, upper={upper}; accepted: 0 <= lower < upper")
    if not 0.0 < coord_fraction <= 1.0:
        raise ValueError(f"signguard: coord_fraction={coord_fraction}; accepted: 0 < value <= 1")
    if not 0.0 < bandwidth_quantile <= 1.0:
        raise ValueError(
            f"signguard: bandwidth_quantile={bandwidth_quantile}; accepted: 0 < value <= 1"
        )
    mask_np = np.asarray(env.param_mask, bool)
    param_idx = jnp.asarray(np.flatnonzero(mask_np), jnp.int32)
    n_coords = max(1, int(coord_fraction * param_idx.shape[0]))
    mask = jnp.asarray(mask_np)

    def init(global_flat):
        return ()

    def aggregate(client_flat, state, ctx):
        deltas = client_flat - ctx.global_flat[None, :]
        dp = jnp.where(mask[None, :], deltas, 0.0)
        coords = jax.random.choice(ctx.key, param_idx, (n_coords,), replace=False)
        sel, med, norms = signguard_selection(
            dp, ctx.valid, coords, lower, upper, bandwidth_quantile
        )
        scale = jnp.minimum(1.0, med / jnp.where(norms > 0, norms, 1.0))
        w = sel.astype(jnp.float32) / jnp.maximum(jnp.sum(sel), 1)
        hi = jax.lax.Precision.HIGHEST
        update = jnp.where(
            mask,
            jnp.matmul(w * scale, deltas, precision=hi),
            jnp.matmul(w, deltas, precision=hi),
        )
        return ctx.global_flat + update, state, AggInfo(client_weights=w)

    return Aggregator(init, aggregate)


register(
    AggregatorSpec(
        "signguard",
        signguard,
        "SignGuard (Xu et al., ICDCS'22): norm filter (0.1..3 x median), MeanShift on sign "
        "statistics of a random 10% of coordinates, largest cluster, clipped to median norm",
    )
)
