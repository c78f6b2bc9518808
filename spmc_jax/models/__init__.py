"""Model registry (`--model NAME`)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from spmc_jax.models.layers import CONV_IMPLS
from spmc_jax.models.mlp import MLP
from spmc_jax.models.precision import COMPUTE_DTYPES, CastModel, with_compute_dtype
from spmc_jax.models.resnet import ResNet10
from spmc_jax.models.simple_cnn import SimpleCNN

MODELS: dict[str, type[nn.Module]] = {
    "simple_cnn": SimpleCNN,
    "resnet10": ResNet10,
    "mlp": MLP,
}

# Flax module name of each model's classifier layer (layer-wise defenses read its rows).
OUTPUT_LAYERS: dict[str, str] = {"simple_cnn": "cls", "resnet10": "linear", "mlp": "out"}


def get_model(
    name: str, num_classes: int = 10, conv_impl: str = "lax", compute_dtype: str = "float32"
) -> Any:
    """Build model `name` (one of MODELS) with the given convolution implementation.

    `compute_dtype` "bfloat16" wraps it in `precision.CastModel` (bf16 arithmetic, float32
    master weights and outputs); "float32" returns the flax module itself.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; accepted: {', '.join(MODELS)}")
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"unknown conv_impl {conv_impl!r}; accepted: {', '.join(CONV_IMPLS)}")
    return with_compute_dtype(
        MODELS[name](num_classes=num_classes, conv_impl=conv_impl), compute_dtype
    )


__all__ = [
    "COMPUTE_DTYPES",
    "CONV_IMPLS",
    "MLP",
    "MODELS",
    "OUTPUT_LAYERS",
    "CastModel",
    "ResNet10",
    "SimpleCNN",
    "get_model",
]
