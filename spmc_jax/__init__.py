"""spmc_jax: a vectorized JAX simulator for federated backdoor attacks and defenses.

The public API is re-exported lazily so `import spmc_jax` does no work (no JAX
initialisation, no dataset access) until a name is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Config": "spmc_jax.config",
    "run": "spmc_jax.engine",
    "project": "spmc_jax.spmc",
    "margin_contribution": "spmc_jax.spmc",
    "get_aggregator": "spmc_jax.aggregators",
    "get_attack": "spmc_jax.attacks",
    "load_dataset": "spmc_jax.data",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'spmc_jax' has no attribute {name!r}")


__all__ = [*_LAZY, "__version__"]
