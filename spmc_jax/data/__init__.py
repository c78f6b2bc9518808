"""Datasets (tfds or offline files), the reference partition, and the in-jit pipeline."""

from __future__ import annotations

from spmc_jax.data.types import DATASETS, Dataset

__all__ = ["DATASETS", "Dataset", "load_dataset"]


def load_dataset(name: str, data_dir: str | None = None, fetch: bool = True, log=print) -> Dataset:
    """Load `name` (see `spmc_jax.data.sources.load_dataset`)."""
    from spmc_jax.data.sources import load_dataset as _load

    return _load(name, data_dir=data_dir, fetch=fetch, log=log)
