"""Model registry (`--model NAME`)."""

from __future__ import annotations

import flax.linen as nn

from spmc_jax.models.layers import CONV_IMPLS
from spmc_jax.models.mlp import MLP
from spmc_jax.models.resnet import ResNet10
from spmc_jax.models.simple_cnn import SimpleCNN

MODELS: dict[str, type[nn.Module]] = {
    "simple_cnn": SimpleCNN,
    "resnet10": ResNet10,
    "mlp": MLP,
}


def get_model(name: str, num_classes: int = 10, conv_impl: str = "lax") -> nn.Module:
    """Build model `name` (one of MODELS) with the given convolution implementation."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; accepted: {', '.join(MODELS)}")
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"unknown conv_impl {conv_impl!r}; accepted: {', '.join(CONV_IMPLS)}")
    return MODELS[name](num_classes=num_classes, conv_impl=conv_impl)


__all__ = ["CONV_IMPLS", "MLP", "MODELS", "ResNet10", "SimpleCNN", "get_model"]
