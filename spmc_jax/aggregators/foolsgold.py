"""FoolsGold (Fung, Yoon & Beschastnikh, RAID 2020, Algorithm 1).

Each registered client i keeps a history H_i = Σ_rounds Δ̂_i of its parameter updates
(Δ_i = w_i − g on env.param_mask coordinates), with Δ̂_i = Δ_i / (‖Δ_i‖ + 0.1) as in the
reference (`normalize=True`; the paper sums raw updates, `normalize=False`). Per round,
over the participating clients:

    cs_ij = cos(H_i, H_j) for i ≠ j,  cs_ii = 0
    v_i   = max_j cs_ij + 1e-5
    cs_ij ← cs_ij · v_i / v_j   if v_i < v_j           (pardoning)
    a_i   = clip(1 − max_j cs_ij, 0, 1);  a ← a / max_j a_j;  a_i = 0.99 where a_i = 1
    a_i   ← κ · (ln(a_i / (1 − a_i) + 1e-5) + 0.5)      (logit, κ = `confidence` = 1)
    a_i   ← 1 if a_i > 1 or inf, 0 if a_i < 0 (or nan)
    g'    = Σ_i a_i w_i / Σ_i a_i                       (models, incl. BatchNorm statistics)

following the authors' reference implementation (the +1e-5 inside the log is the SPMC
reference's; it only matters for a_i → 0, which is clipped to 0 either way). The paper's
optional feature-importance weighting is not used (nor by the reference). If every
weight is 0 (e.g. all histories identical), the rule falls back to the uniform mean of
the valid clients (the reference would produce NaN there).

State: H, (env.n_registered, d) in the model's dtype (float64 under jax_enable_x64), rows
indexed by ctx.client_ids (zeros on BatchNorm coordinates). Clients seen for the first
time have H = their first update.
Invalid rows (ctx.valid False) add nothing to their history, are left out of the
similarity matrix and get weight 0.

Reference bugs, as options:
  reference_first_coords: the reference passes arange(n) as the "significant features"
    index, so similarities use only the first n coordinates of the parameter history,
    flattened in PyTorch's `parameters()` order and layout (SimpleCNN, n = 10:
    conv1.weight[0, 0, 0:2, :]). Reproduced on those same weights through
    `env.reference_param_order` (`flat.reference_order`); a model without a reference
    counterpart (mlp) uses the first n parameter coordinates of our flat vector.
  reference_permutation_bug: the reference indexes the history by position in the
    random online order: each round, history row p receives the update of a random client
    and that client gets the weight computed from row p. Reproduced with a random
    permutation from ctx.key on history rows 0..n−1.

client_weights = the normalised a.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from spmc_jax.aggregators import register
from spmc_jax.aggregators.base import (
    AggInfo,
    Aggregator,
    AggregatorEnv,
    AggregatorSpec,
    normalized,
    weighted_mean,
)


class FoolsGoldState(NamedTuple):
    """Per registered client history of (normalised) parameter updates, (N, d)."""

    history: jax.Array


def foolsgold_weights(history: jax.Array, valid: jax.Array, confidence: float = 1.0) -> jax.Array:
    """FoolsGold weights a (n,) from the participants' histories (n, k) (before normalising)."""
    n = history.shape[0]
    norms = jnp.linalg.norm(history, axis=1)
    unit = history / jnp.where(norms > 0, norms, 1.0)[:, None]
    eye = jnp.eye(n, dtype=bool)
    pair_ok = valid[:, None] & valid[None, :] & ~eye
    cs = jnp.where(pair_ok, unit @ unit.T, 0.0)
    v = jnp.max(cs, axis=1) + 1e-5
    pardon = (v[:, None] < v[None, :]) & ~eye
    cs = jnp.where(pardon, cs * v[:, None] / v[None, :], cs)
    a = jnp.clip(1.0 - jnp.max(cs, axis=1), 0.0, 1.0)
    a = jnp.where(valid, a, 0.0)
    top = jnp.max(a)
    a = jnp.where(top > 0, a / jnp.where(top > 0, top, 1.0), 0.0)
    a = jnp.where(a == 1.0, 0.99, a)
    a = confidence * (jnp.log(a / (1.0 - a) + 1e-5) + 0.5)
    a = jnp.where(jnp.isinf(a) | (a > 1.0), 1.0, a)
    a = jnp.where((a < 0.0) | jnp.isnan(a), 0.0, a)
    return jnp.where(valid, a, 0.0)


def foolsgold(
    env: AggregatorEnv,
    *,
    normalize: bool = True,
    norm_eps: float = 0.1,
    confidence: float = 1.0,
    reference_first_coords: bool = False,
    reference_permutation_bug: bool = False,
) -> Aggregator:
    """Build FoolsGold (see the module docstring for the formula and the options' meaning)."""
    if norm_eps < 0:
        raise ValueError(f"foolsgold norm_eps={norm_eps} must be >= 0")
    param_mask = np.asarray(env.param_mask, bool)
    param_idx = np.flatnonzero(param_mask)
    if env.reference_param_order is not None:
        param_idx = np.asarray(env.reference_param_order)
    n_registered = env.n_registered

    def init(global_flat):
        shape = (n_registered, global_flat.shape[0])
        return FoolsGoldState(history=jnp.zeros(shape, global_flat.dtype))

    def aggregate(client_flat, state, ctx):
        n = client_flat.shape[0]
        pm = jnp.asarray(param_mask)
        valid = ctx.valid
        delta = jnp.where(pm[None, :], client_flat - ctx.global_flat[None, :], 0.0)
        if normalize:
            delta = delta / (jnp.linalg.norm(delta, axis=1, keepdims=True) + norm_eps)
        if reference_permutation_bug:
            perm = jax.random.permutation(ctx.key, n)  # position p holds client perm[p]
            rows = jnp.arange(n)
            delta, row_valid = delta[perm], valid[perm]
        else:
            rows = ctx.client_ids
            row_valid = valid
        history = state.history.at[rows].add(delta * row_valid[:, None])
        h = history[rows]
        if reference_first_coords:
            h = h[:, param_idx[:n]]
        a = foolsgold_weights(h, row_valid, confidence)
        if reference_permutation_bug:
            a = jnp.zeros_like(a).at[perm].set(a)
        a = jnp.where(jnp.sum(a) > 0, a, valid.astype(a.dtype))  # all zero: uniform fallback
        w = normalized(a)
        new_global = ctx.global_flat + weighted_mean(client_flat - ctx.global_flat[None, :], w)
        info = AggInfo(client_weights=w.astype(jnp.float32))
        return new_global, FoolsGoldState(history=history), info

    return Aggregator(init, aggregate)


register(
    AggregatorSpec(
        "foolsgold",
        foolsgold,
        "FoolsGold (RAID'20): down-weight clients whose update histories are too similar "
        "(cosine with pardoning, logit weights)",
    )
)
