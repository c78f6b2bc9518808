"""DnC, "Divide and Conquer" (Shejwalkar & Houmansadr, NDSS 2021, Algorithm 2).

For each of `num_iters` iterations, on the updates Δ_i = w_i − g:

    r      = `sub_dim` coordinates sampled without replacement (all of them if d ≤ sub_dim)
    μ      = mean_i Δ_i[r]
    v      = top right singular vector of the centred matrix [Δ_i[r] − μ]_i
    s_i    = ⟨Δ_i[r] − μ, v⟩²                                   (outlier score)
    I_good = I_good ∩ {the n − ⌊c·m⌋ clients with the lowest s_i}   (c = filter_frac)

and the new global model is the uniform mean of the kept clients' models,
g' = g + mean_{i ∈ I_good} Δ_i.

Following the reference (`RF/Server/DnC.py`), each Δ_i is divided by (‖Δ_i‖ + 1e-5)
before scoring (`normalize=True`; the paper scores raw updates). Normalisation only
changes which clients are kept; the average uses the clients' actual models. Unlike the
reference, the vector is our flat model (parameters and BatchNorm statistics, no integer
step counters), so the norm is not dominated by step counts.

The top singular vector comes from the eigendecomposition of the n × n Gram matrix of the
centred rows: with C = U Σ Vᵀ, ⟨c_i, v⟩² = σ₁² u_{i1}², so s = λ_max · u_max² (float32;
the scores match a float64 SVD to ~1e-5 relative, enough to rank clients unless two
scores tie to that precision).

`m` is the attacker count: `env.num_malicious` (⌊n·γ⌋ like the reference), or the
`num_malicious` option when >= 0. Invalid rows (ctx.valid False) get score +inf, are
never kept, and do not use up the ⌊c·m⌋ removals; at least one valid client is kept.

Reference bug (`reference_permutation_bug=True`): the reference passes the kept *positions*
as client ids while the client list is a random permutation, so the clients averaged are
a uniformly random subset of the kept size. Reproduced by permuting the kept mask with a
random permutation drawn from ctx.key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spmc_jax.aggregators import register
from spmc_jax.aggregators._robust import resolve_num_malicious
from spmc_jax.aggregators.base import (
    AggInfo,
    Aggregator,
    AggregatorEnv,
    AggregatorSpec,
    normalized,
    weighted_mean,
)


def dnc_subsample(key: jax.Array, d: int, sub_dim: int, num_iters: int) -> jax.Array:
    """The coordinate subsets DnC scores on: (num_iters, min(sub_dim, d)) int32 indices.

    Each subset is uniform over the b-subsets of range(d) (the indices of the b largest of
    d i.i.d. uniforms: O(d log b), cheaper than a full permutation for large d). Iteration
    t uses `jax.random.split(key, num_iters + 1)[t]`; with sub_dim >= d every iteration
    uses all coordinates in order (no randomness).
    """
    b = min(sub_dim, d)
    if b >= d:
        return jnp.broadcast_to(jnp.arange(d, dtype=jnp.int32), (num_iters, d))
    keys = jax.random.split(key, num_iters + 1)[:num_iters]
    pick = lambda k: jax.lax.top_k(jax.random.uniform(k, (d,)), b)[1].astype(jnp.int32)
    return jax.vmap(pick)(keys)


def _outlier_scores(x: jax.Array, valid: jax.Array) -> jax.Array:
    """s_i = ⟨x_i − μ, v⟩² with μ the mean of the valid rows and v the top right singular vector."""
    vf = valid.astype(x.dtype)
    mu = (vf @ x) / jnp.maximum(jnp.sum(vf), 1.0)
    c = (x - mu[None, :]) * vf[:, None]
    gram = c @ c.T
    eigvals, eigvecs = jnp.linalg.eigh(gram)  # ascending order
    return eigvals[-1] * eigvecs[:, -1] ** 2


def dnc(
    env: AggregatorEnv,
    *,
    sub_dim: int = 10000,
    num_iters: int = 1,
    filter_frac: float = 0.5,
    normalize: bool = True,
    num_malicious: int = -1,
    reference_permutation_bug: bool = False,
) -> Aggregator:
    """Build DnC (see the module docstring for the formula and the options' meaning)."""
    if sub_dim < 1:
        raise ValueError(f"dnc sub_dim={sub_dim} must be >= 1")
    if num_iters < 1:
        raise ValueError(f"dnc num_iters={num_iters} must be >= 1")
    if filter_frac < 0:
        raise ValueError(f"dnc filter_frac={filter_frac} must be >= 0")
    m = resolve_num_malicious(env.num_malicious, num_malicious, env.n_clients)
    n_remove = int(filter_frac * m)

    def init(global_flat):
        return ()

    def aggregate(client_flat, state, ctx):
        n, d = client_flat.shape
        valid = ctx.valid
        delta = client_flat - ctx.global_flat[None, :]
        x = delta
        if normalize:
            x = delta / (jnp.linalg.norm(delta, axis=1, keepdims=True) + 1e-5)
        n_keep = jnp.maximum(jnp.sum(valid).astype(jnp.int32) - n_remove, 1)
        coords = dnc_subsample(ctx.key, d, sub_dim, num_iters)
        good = valid
        for t in range(num_iters):  # num_iters is a small static count
            s = _outlier_scores(x[:, coords[t]], valid)
            s = jnp.where(valid, s, jnp.inf)
            rank = jnp.argsort(jnp.argsort(s, stable=True), stable=True)
            good = good & (rank < n_keep)
        if reference_permutation_bug:
            perm_key = jax.random.split(ctx.key, num_iters + 1)[num_iters]
            good = good[jax.random.permutation(perm_key, n)] & valid
        w = normalized(good.astype(client_flat.dtype))
        # g + Σ w_i Δ_i: equals the mean of the kept models, and stays g if none is valid.
        new_global = ctx.global_flat + weighted_mean(delta, w)
        return new_global, state, AggInfo(client_weights=w.astype(jnp.float32))

    return Aggregator(init, aggregate)


register(
    AggregatorSpec(
        "dnc",
        dnc,
        "DnC (NDSS'21): drop the floor(filter_frac*m) top-singular-direction outliers, average "
        "the rest; m = env.num_malicious unless num_malicious >= 0",
        needs_num_malicious=True,
    )
)
