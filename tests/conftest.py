"""Shared fixtures: a small learnable synthetic dataset and real datasets.

Real-data policy: a real-data test skips when its dataset is not available locally, except
in CI (env var CI set to anything but ""/"0"/"false"/"no"), where a missing dataset fails
the test: CI runs .ci/install_data.sh first, so absence there is a bug, not a reason to skip.
"""

from __future__ import annotations

import os

# Tests run on the CPU with deterministic, modest threading.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import pytest

from spmc_jax.data.sources import DatasetNotFoundError, load_dataset
from spmc_jax.data.types import Dataset

# One persistent compilation cache per test session, shared by the xdist workers: many tests
# build the same tiny federations, and a program compiled once is loaded by the others. The
# controller makes the folder and removes it at the end; workers find it through this
# variable (not JAX_COMPILATION_CACHE_DIR, which subprocess runs under test would inherit).
# SPMC_TEST_JAX_CACHE=0 turns it off.
_CACHE_ENV = "SPMC_TEST_JAX_CACHE"


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get(_CACHE_ENV) == "0" or jax.config.jax_compilation_cache_dir:
        return
    if not hasattr(config, "workerinput") and _CACHE_ENV not in os.environ:
        os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="spmc_jax-test-jax-cache-")
        config._spmc_jax_cache_owner = True  # type: ignore[attr-defined]
    from spmc_jax.sweep import enable_jax_cache

    enable_jax_cache(Path(os.environ[_CACHE_ENV]))


def pytest_unconfigure(config: pytest.Config) -> None:
    if getattr(config, "_spmc_jax_cache_owner", False):
        shutil.rmtree(os.environ.pop(_CACHE_ENV), ignore_errors=True)


def make_blob_dataset(
    n_train: int = 1200, n_test: int = 300, kind: str = "mnist", seed: int = 0
) -> Dataset:
    """A learnable 10-class image set: each class lights its own block, plus noise."""
    rng = np.random.RandomState(seed)
    h, w, ch = (28, 28, 1) if kind != "cifar10" else (32, 32, 3)

    def make(n):
        y = rng.randint(0, 10, n).astype(np.int32)
        x = (rng.rand(n, h, w, ch) * 60).astype(np.uint8)
        for k in range(10):  # class k lights cell (k // 4, k % 4) of a 3x4 grid
            r, c = 9 * (k // 4) + 1, 7 * (k % 4)
            x[y == k, r : r + 8, c : c + 7, :] = 230
        return x, y

    xtr, ytr = make(n_train)
    xte, yte = make(n_test)
    return Dataset(f"blobs-{kind}", xtr, ytr, xte, yte, "generated", kind)


@pytest.fixture(scope="session")
def blobs() -> Dataset:
    return make_blob_dataset()


def in_ci() -> bool:
    """Whether the CI environment variable is set (GitHub/GitLab/etc. set CI=true)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def real_dataset() -> Callable[[str], Dataset]:
    """`real_dataset(name)` -> the local `Dataset` (loaded once per session; never fetches)."""
    loaded: dict[str, Dataset] = {}

    def get(name: str) -> Dataset:
        if name not in loaded:
            try:
                loaded[name] = load_dataset(name, fetch=False, log=lambda s: None)
            except DatasetNotFoundError as e:
                if in_ci():
                    pytest.fail(f"{name} missing in CI (run .ci/install_data.sh): {e}")
                pytest.skip(f"{name} not available locally: {e}")
        return loaded[name]

    return get
