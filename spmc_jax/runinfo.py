"""What every run records about where it ran: package versions, device, commit."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

PACKAGES = ("spmc_jax", "jax", "jaxlib", "flax", "optax", "chex", "numpy", "tensorflow-datasets")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_info() -> dict[str, Any]:
    import jax

    devs = jax.devices()
    return {
        "backend": jax.default_backend(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "devices": [str(d) for d in devs[:16]],
        "device_kind": devs[0].device_kind if devs else None,
    }


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """The host CPU: float32 results can differ in their last digits between CPU models (XLA
    generates different code for them), so a run records which one it ran on.

    Linux: `vendor_id`, `model name`, `cpu family`, `model`, `stepping` of the first processor
    in /proc/cpuinfo (None where absent); elsewhere `platform.processor()` as the model name.
    """
    keys = {
        "vendor_id": "vendor",
        "model name": "model_name",
        "cpu family": "family",
        "model": "model",
        "stepping": "stepping",
    }
    out: dict[str, Any] = dict.fromkeys(keys.values())
    try:
        text = cpuinfo.read_text()
    except OSError:
        text = ""
    for line in text.split("\n\n", 1)[0].splitlines():  # the first processor's block
        key, _, value = line.partition(":")
        if key.strip() in keys:
            out[keys[key.strip()]] = value.strip()
    if out["model_name"] is None:
        out["model_name"] = platform.processor() or None
    out["logical_cpus"] = os.cpu_count()
    return out


def numerics() -> dict[str, Any]:
    """The engine's module-level switches: each changes results only in float32 summation
    order, so a run records the ones it ran with (an in-process caller may have flipped one)."""
    from spmc_jax import engine
    from spmc_jax.models import layers

    return {
        "fold_equal_channels": layers.FOLD_EQUAL_CHANNELS,
        "im2col_batch_block": layers.IM2COL_BATCH_BLOCK,
        "sort_chunks_by_steps": engine.SORT_CHUNKS_BY_STEPS,
    }


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict[str, Any]:
    """Versions, device and host facts for a run's summary."""
    return {
        "packages": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_info(),
        "device": device_info(),
        "numerics": numerics(),
        "git_commit": git_commit(),
    }
