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


def get_aggregator(
    name: str, env: AggregatorEnv, *, inputs_sanitized: bool = False, **options: Any
) -> Aggregator:
    """Build the rule `name` with `options` (validated against its factory).

    By default the returned `aggregate` sanitises its input first (non-finite rows -> the
    global model, i.e. a zero update, and `ctx.valid` False), so no rule can be poisoned by
    NaN/Inf rows. A caller that has already done exactly that (the engine: `sanitize`, then
    `RoundContext(valid=...)`) passes `inputs_sanitized=True` to skip a second pass over
    the (n, d) matrix. Either way, a rule that still produces a non-finite model keeps the
    old one.

    Args:
      name: registered rule name.
      env: static run facts.
      inputs_sanitized: the caller guarantees that every row of `client_flat` is finite
        and that `ctx.valid` is False for each row it replaced (as `sanitize` does).
        Default False: sanitise here (safe for direct library use).
      **options: the rule's hyperparameters.
    """
    spec = REGISTRY.get(name)
    opts = coerce_options("defense", name, spec.factory, options)
    agg = spec.factory(env, **opts)

    def aggregate(client_flat, state, ctx: RoundContext):
        if not inputs_sanitized:
            client_flat, valid = sanitize(client_flat, ctx.global_flat)
            ctx = ctx._replace(valid=jnp.logical_and(ctx.valid, valid))
        new_global, state, info = agg.aggregate(client_flat, state, ctx)
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
