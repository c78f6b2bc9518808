"""Server aggregation rules, one module each, registered by name (`--defense NAME`).

See `base.py` for the interface. `get_aggregator(name, env, **options)` builds one.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from spmc_jax.aggregators.base import (
    AggInfo,
    Aggregator,
    AggregatorEnv,
    AggregatorSpec,
    RoundContext,
    sanitize,
)
from spmc_jax.registry import Registry, coerce_options

REGISTRY: Registry[AggregatorSpec] = Registry("defense", __name__)


def register(spec: AggregatorSpec) -> AggregatorSpec:
    """Add a rule to the registry (called at import time by each rule module)."""
    return REGISTRY.register(spec.name, spec)


def get_aggregator(name: str, env: AggregatorEnv, **options: Any) -> Aggregator:
    """Build the rule `name` with `options` (validated against its factory).

    The returned `aggregate` sanitises its input first (non-finite rows -> zero update,
    `ctx.valid` False), so no rule can be poisoned by NaN/Inf rows.
    """
    spec = REGISTRY.get(name)
    opts = coerce_options("defense", name, spec.factory, options)
    agg = spec.factory(env, **opts)

    def aggregate(client_flat, state, ctx: RoundContext):
        clean, valid = sanitize(client_flat, ctx.global_flat)
        ctx = ctx._replace(valid=jnp.logical_and(ctx.valid, valid))
        new_global, state, info = agg.aggregate(clean, state, ctx)
        # Last line of defence: a rule that still produced a non-finite model keeps the old one.
        ok = jnp.all(jnp.isfinite(new_global))
        new_global = jnp.where(ok, new_global, ctx.global_flat)
        return new_global, state, info

    return Aggregator(init=agg.init, aggregate=aggregate)


__all__ = [
    "REGISTRY",
    "AggInfo",
    "Aggregator",
    "AggregatorEnv",
    "AggregatorSpec",
    "RoundContext",
    "get_aggregator",
    "register",
]
