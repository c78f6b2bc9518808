"""SPMC server rule (ICML 2025): margin-contribution aggregation (spmc_reference.md §2).

    φ_i = cos(w_i, Γ_i),  Γ_i = (1/(n−1)) Σ_{j≠i} w_j   (uniform leave-one-out mean),
    α = softmax(φ / T),   g' = Σ_i α_i w_i,

with the cosine over trainable parameters only and the mean and the aggregate over the
full rows (BatchNorm statistics included), as the reference's `SPMD` server. The math
lives in `spmc_jax.spmc`; the engine builds the clients' teachers from
`info.client_weights` (= α) with `spmc_jax.spmc.teachers`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from spmc_jax import spmc as spmc_math
from spmc_jax.aggregators import register
from spmc_jax.aggregators.base import (
    AggInfo,
    Aggregator,
    AggregatorEnv,
    AggregatorSpec,
    normalized,
)


def spmc(
    env: AggregatorEnv,
    *,
    temperature: float = 1.0,
    space: str = "weights",
    server_weighting: bool = True,
    compare_bn: bool = False,
) -> Aggregator:
    """Build the SPMC server rule.

    Args:
      env: static run facts; `env.param_mask` selects the coordinates the cosine uses.
      temperature: softmax temperature T > 0 (1 in the reference).
      space: "weights" (the reference: cosines of whole weight vectors) or "updates"
        (cosines of w_i − g and Γ_i − g, g the previous global model).
      server_weighting: False gives uniform α over the valid clients (the paper's
        "client part only" ablation); α is still reported for the teachers.
      compare_bn: also compare BatchNorm statistics in the cosine (all coordinates).

    Raises:
      ValueError: on an option value outside the accepted ones.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise ValueError(f"spmc temperature={temperature!r}; accepted: a finite number > 0")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"spmc temperature={temperature!r}; accepted: a finite number > 0")
    if space not in spmc_math.SPACES:
        raise ValueError(f"spmc space={space!r}; accepted: {', '.join(spmc_math.SPACES)}")
    for name, value in (("server_weighting", server_weighting), ("compare_bn", compare_bn)):
        if not isinstance(value, bool | np.bool_):
            raise ValueError(f"spmc {name}={value!r}; accepted: True, False")
    mask = None if compare_bn else np.asarray(env.param_mask, bool)
    temperature = float(temperature)

    def init(global_flat):
        return ()

    def aggregate(client_flat, state, ctx):
        if server_weighting:
            new_global, alpha = spmc_math.margin_contribution(
                client_flat,
                compare_mask=mask,
                temperature=temperature,
                space=space,
                global_flat=ctx.global_flat,
                valid=ctx.valid,
            )
        else:
            alpha = normalized(ctx.valid.astype(jnp.float32))
            # HIGHEST: the default float32 matmul on TPU/GPU rounds to bf16/TF32.
            new_global = jnp.matmul(alpha, client_flat, precision=jax.lax.Precision.HIGHEST)
            new_global = jnp.where(jnp.any(ctx.valid), new_global, ctx.global_flat)
        return new_global, state, AggInfo(client_weights=alpha)

    return Aggregator(init, aggregate)


register(
    AggregatorSpec(
        "spmc", spmc, "SPMC margin-contribution aggregation (softmax of leave-one-out cosines)"
    )
)
