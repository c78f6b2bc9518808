"""Reduced-precision compute with float32 master weights (`--compute-dtype bfloat16`).

`CastModel` wraps a flax module: every `apply` casts the float32 parameters and the input
batch to the compute dtype, runs the model, and casts the outputs (logits and updated
BatchNorm statistics) back to float32. Gradients taken with respect to the float32
parameters flow back through the casts, so the optimiser, the momentum, the flat client rows
and every aggregator stay float32: only the model's forward/backward arithmetic is bf16
(standard mixed precision). float32 is the default and matches the reference's numerics.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

COMPUTE_DTYPES = ("float32", "bfloat16")


def _cast(tree: Any, dtype: Any) -> Any:
    return jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


class CastModel:
    """A flax module run in `dtype`, with float32 variables and float32 outputs."""

    def __init__(self, module: nn.Module, dtype: str) -> None:
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute dtype {dtype!r}; accepted: {COMPUTE_DTYPES}")
        self.module = module
        self.dtype = jnp.dtype(dtype)

    def init(self, *args: Any, **kwargs: Any) -> Any:
        return self.module.init(*args, **kwargs)  # master weights stay float32

    def apply(self, variables: Any, x: jax.Array, *args: Any, **kwargs: Any) -> Any:
        params = {k: (_cast(v, self.dtype) if k == "params" else v) for k, v in variables.items()}
        out = self.module.apply(params, x.astype(self.dtype), *args, **kwargs)
        return _cast(out, jnp.float32)


def with_compute_dtype(module: nn.Module, dtype: str) -> Any:
    """`module` itself for float32, else a `CastModel` computing in `dtype`."""
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype {dtype!r}; accepted: {COMPUTE_DTYPES}")
    return module if dtype == "float32" else CastModel(module, dtype)
