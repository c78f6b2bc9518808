"""Centered clipping (Karimireddy, He and Jaggi, "Learning from History for Byzantine Robust
Optimization", ICML 2021).

Starting from a centre v_0, L iterations of clipped averaging around the current centre:

    v_{l+1} = v_l + (1/n) Σ_i (Δ_i − v_l) · min(1, τ / ‖Δ_i − v_l‖),   g' = g + v_L,

with updates Δ_i = w_i − g. The paper starts from the previous round's aggregate (its
"history"), which is the default here (`use_history=True`: the state holds v_L of the last
round, zeros at first); `use_history=False` starts every round from 0. Each outlier moves
the centre by at most τ/n per iteration, whatever its norm.

Defaults τ = 10 and L = 5 are the common choices of public re-implementations; the
paper tunes τ to the scale of the honest updates, and so should a run (τ is in the units
of ‖Δ‖, i.e. learning rate times accumulated gradient). Needs no attacker count.

Norms use the trainable parameters only (`env.param_mask`); each clip factor (<= 1)
scales the whole difference, so BatchNorm statistics stay convex combinations of the
clients' and the centre's. Non-finite rows (`ctx.valid` False) are left out (the mean is
over the valid rows).

`client_weights`: the coefficients c_i of Δ_i in v_L = c_0·v_0 + Σ_i c_i Δ_i (tracked
through the iterations), normalised to sum 1.
"""

from __future__ import annotations

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
)


def centered_clipping(
    env: AggregatorEnv, *, tau: float = 10.0, iters: int = 5, use_history: bool = True
) -> Aggregator:
    """Iterative centered clipping of the updates.

    Args:
      env: run facts; uses param_mask.
      tau: clipping radius τ (> 0), in update-norm units.
      iters: clipping iterations L (>= 1).
      use_history: start from the previous round's aggregate (True, the paper) or from 0.

    Returns:
      Aggregator with state = the last aggregate v (d,) when use_history, else ().
    """
    if not tau > 0:
        raise ValueError(f"centered_clipping: tau={tau}; accepted: > 0")
    if iters < 1:
        raise ValueError(f"centered_clipping: iters={iters}; accepted: integer >= 1")
    mask = jnp.asarray(np.asarray(env.param_mask, dtype=bool))
    n_iters = int(iters)

    def init(global_flat):
        return jnp.zeros_like(global_flat) if use_history else ()

    def aggregate(client_flat, state, ctx):
        deltas = client_flat - ctx.global_flat[None, :]
        valid = ctx.valid.astype(deltas.dtype)
        n_valid = jnp.maximum(jnp.sum(valid), 1.0)
        v0 = state if use_history else jnp.zeros_like(ctx.global_flat)

        def step(_, carry):
            v, c0, c = carry
            diff = jnp.where(mask[None, :], deltas - v[None, :], 0.0)
            norms = jnp.linalg.norm(diff, axis=1)
            clip = jnp.where(norms > tau, tau / jnp.where(norms > 0, norms, 1.0), 1.0)
            s = valid * clip / n_valid
            # v ← (1 − Σs) v + Σ s_i Δ_i; the coefficients of v_0 and of each Δ_i follow.
            s_sum = jnp.sum(s)
            return (1.0 - s_sum) * v + s @ deltas, (1.0 - s_sum) * c0, (1.0 - s_sum) * c + s

        n = deltas.shape[0]
        init_carry = (v0, jnp.ones((), deltas.dtype), jnp.zeros((n,), deltas.dtype))
        v, _, coef = jax.lax.fori_loop(0, n_iters, step, init_carry)
        new_state = v if use_history else state
        weights = normalized(coef).astype(jnp.float32)
        return ctx.global_flat + v, new_state, AggInfo(client_weights=weights)

    return Aggregator(init, aggregate)


register(
    AggregatorSpec(
        "centered_clipping",
        centered_clipping,
        "Centered clipping (Karimireddy et al. 2021): iters rounds of tau-clipped averaging "
        "around a centre started at the previous aggregate; needs no attacker count",
    )
)
