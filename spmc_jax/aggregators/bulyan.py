"""Bulyan (El Mhamdi, Guerraoui & Rouault, ICML 2018, Algorithm 2), with server momentum.

On the updates Δ_i = w_i − g (the reference works on u_i = (g − w_i)/lr = −Δ_i/lr; both
selection and coordinate-wise aggregation are invariant to that scaling and sign), with f
the assumed number of Byzantine clients:

 1. Selection: θ = n − 2f times, pick k* = argmin_{i ∈ R} Σ_{j ∈ N_i} ‖Δ_i − Δ_j‖² (Krum on
    the remaining set R; N_i = the |R| − f − 2 nearest other members of R), move k* from
    R to the selection S.
 2. Aggregation: per coordinate, the mean of the β = θ − 2f values of S closest to the
    coordinate-wise median of S.
 3. Server momentum (the reference's addition, not in the paper): v ← μ·v + agg,
    g' = g + v with μ = `momentum` = 0.9 (the reference's v ← 0.9 v − lr·ū is the same
    recursion in pseudo-gradient units). `momentum=0` gives plain Bulyan.

f = `env.num_malicious` (⌊n·γ⌋), or the `num_malicious` option when >= 0. Bulyan's
guarantee needs n ≥ 4f + 3; when that fails (e.g. n = 10 with f ≥ 2, Table 2's setting) the
counts are clamped: θ = max(n − 2f, 1), β = max(θ − 2f, 2 − θ mod 2) (at least the
coordinate median of the selection), Krum neighbours clamped to [1, |R| − 1]; with f = 3,
n = 10 that selects 4 vectors by Krum and takes their coordinate median (β = 2). Invalid
rows (ctx.valid False) are never neighbours, are selected only once no valid row remains,
and are never aggregated.

Momentum is applied to the trainable-parameter coordinates (env.param_mask); BatchNorm
statistics take the plain aggregate (`momentum_buffers=False`): momentum on running
variances can overshoot below zero. The reference applies it to the whole state_dict
(`momentum_buffers=True`).

Reference quirks, as options:
  reference_fixed_f: the reference always passes corrupted count 1 (independent of γ):
    θ = n − 2, Krum scores sum the *non-squared* distances to all other remaining vectors,
    β = θ − 3 (5 of 8 for n = 10).
  reference_base_client0: the reference adds the momentum to the trained model of the
    client with id 0 instead of the global model (`nets_list[0]`): g' = w_{id 0} + v.

Distances use the Gram form (`pairwise_sq_dists`) on the updates: absolute error about
1e-7·(‖Δ_i‖² + ‖Δ_j‖²), which only matters for near-ties in the Krum ranking.

client_weights: each client's share of the coordinate-wise kept entries in step 2
(fraction of coordinates where it was among the β closest to the median, normalised to
sum 1); the momentum term is not attributed to clients.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from spmc_jax.aggregators import register
from spmc_jax.aggregators._robust import (
    closest_to_median_mean_kept,
    krum_scores,
    pairwise_sq_dists,
    resolve_num_malicious,
)
from spmc_jax.aggregators.base import AggInfo, Aggregator, AggregatorEnv, AggregatorSpec


class BulyanState(NamedTuple):
    """Server momentum buffer v (d,)."""

    velocity: jax.Array


def bulyan_counts(n: int, f: int, reference_fixed_f: bool = False) -> tuple[int, int]:
    """(θ selected by Krum, β kept per coordinate) for n clients and f assumed attackers."""
    if reference_fixed_f:
        theta = max(n - 2, 1)
        return theta, max(theta - 3, 1)
    theta = max(n - 2 * f, 1)
    # β ≥ 1 for odd θ, ≥ 2 for even θ: at least the coordinate median of the selection (for
    # even θ, β = 1 would pick one of the two middle values, which tie exactly).
    return theta, max(theta - 2 * f, 2 - theta % 2)


def bulyan_select(
    sq_dists: jax.Array,
    valid: jax.Array,
    theta: int,
    f: int,
    reference_fixed_f: bool = False,
) -> jax.Array:
    """Iterated Krum: (n,) bool mask of the θ selected rows (valid rows first)."""
    n = sq_dists.shape[0]
    dist = jnp.sqrt(sq_dists) if reference_fixed_f else sq_dists

    def body(_, carry):
        remaining, selected = carry
        cand = remaining & valid
        count = jnp.sum(cand).astype(jnp.int32)
        if reference_fixed_f:
            k = count - 1
        else:
            k = jnp.clip(count - f - 2, jnp.minimum(1, count - 1), count - 1)
        scores = krum_scores(dist, k, valid=cand)
        # Once no valid row remains, take remaining invalid rows (never aggregated later).
        scores = jnp.where(cand, scores, jnp.where(remaining, jnp.finfo(dist.dtype).max, jnp.inf))
        pick = jax.nn.one_hot(jnp.argmin(scores), n, dtype=bool)
        return remaining & ~pick, selected | pick

    init = (jnp.ones((n,), bool), jnp.zeros((n,), bool))
    return jax.lax.fori_loop(0, min(theta, n), body, init)[1]


def bulyan(
    env: AggregatorEnv,
    *,
    num_malicious: int = -1,
    momentum: float = 0.9,
    momentum_buffers: bool = False,
    reference_fixed_f: bool = False,
    reference_base_client0: bool = False,
) -> Aggregator:
    """Build Bulyan (see the module docstring for the formula and the options' meaning)."""
    f = resolve_num_malicious(env.num_malicious, num_malicious, env.n_clients)
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"bulyan momentum={momentum} must be in [0, 1)")
    param_mask = np.asarray(env.param_mask, bool)

    def init(global_flat):
        return BulyanState(velocity=jnp.zeros_like(global_flat))

    def aggregate(client_flat, state, ctx):
        n = client_flat.shape[0]
        theta, beta = bulyan_counts(n, f, reference_fixed_f)
        delta = client_flat - ctx.global_flat[None, :]
        selected = bulyan_select(pairwise_sq_dists(delta), ctx.valid, theta, f, reference_fixed_f)
        agg, share = closest_to_median_mean_kept(delta, beta, valid=selected & ctx.valid)
        mom_mask = jnp.asarray(param_mask | momentum_buffers)
        velocity = jnp.where(mom_mask, momentum * state.velocity + agg, agg)
        if reference_base_client0:
            base = client_flat[jnp.argmax(ctx.client_ids == 0)]
        else:
            base = ctx.global_flat
        info = AggInfo(client_weights=share.astype(jnp.float32))
        return base + velocity, BulyanState(velocity=velocity), info

    return Aggregator(init, aggregate)


register(
    AggregatorSpec(
        "bulyan",
        bulyan,
        "Bulyan (ICML'18): theta = n-2f by iterated Krum, mean of beta = theta-2f values "
        "closest to the coordinate median, server momentum 0.9; f = env.num_malicious unless "
        "num_malicious >= 0",
        needs_num_malicious=True,
    )
)
