"""XLA compiler options the federation's programs are compiled with (`--cpu-dot-fusion`).

On the CPU backend, jaxlib 0.10's XLA calls YNNPACK for each matrix product on its own and
runs the elementwise ops around it (bias adds, ReLUs, the SGD update's scaling) as separate
loops over memory. Its experimental option `xla_cpu_experimental_ynn_fusion_type =
LIBRARY_FUSION_TYPE_DOT` hands YNNPACK each product together with its elementwise producers
and consumers as one fused call, so those intermediates are not written out and read back.
Issue 14 (benchmarks/RESULTS.md): one client's SimpleCNN training on one core ran 1.08x
(FedAvg) and 1.17x (SPMC) faster on an AMD EPYC host, ~1.15x on an Intel Xeon host; weights
moved by float32 summation order only (max |dw| 7.5e-9 after 10-20 steps). It is not a gain
for every model: on the same AMD host the MLP's rounds ran ~1.3x and ResNet-10's ~1.2x slower
with it, so `auto` turns it on only for the models in `FUSION_MODELS`.

The option is passed per program (`jax.jit(..., compiler_options=...)`), not through
`XLA_FLAGS`: it then reaches exactly the programs that ask for it, in-process test runs
included, and a jaxlib that lacks it is detected by a probe instead of aborting at start-up.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spmc_jax.config import CPU_DOT_FUSIONS

YNN_DOT_FUSION: dict[str, Any] = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
_OPTIONS: dict[str, dict[str, Any] | None] = {"ynn": YNN_DOT_FUSION, "off": None}
# Models whose training measured faster with the fusion (RESULTS.md, issue 14, session 11);
# `auto` leaves it off for the others (mlp, resnet10: slower).
FUSION_MODELS = ("simple_cnn",)


@functools.cache
def ynn_dot_fusion_supported() -> bool:
    """Whether this jaxlib's XLA:CPU accepts the YNNPACK dot fusion and computes with it.

    Compiles and runs a product with elementwise neighbours on the CPU under the option and
    checks it against float64 NumPy (rtol 1e-5: float32 rounding of a length-8 sum). False
    when XLA rejects the option (an older or newer jaxlib: "No such compile option", or "not
    a valid enum value") or there is no CPU device.
    """
    try:
        # This process's own device: under jax.distributed, devices("cpu")[0] is process 0's.
        cpu = jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        return False
    a = (np.arange(32, dtype=np.float32).reshape(4, 8) - 15.0) / 7.0
    b = (np.arange(64, dtype=np.float32).reshape(8, 8) % 5.0 - 2.0) / 3.0
    f = jax.jit(lambda a, b: jnp.maximum(a @ b, 0.0) @ b + 1.0, compiler_options=YNN_DOT_FUSION)
    try:
        out = np.asarray(f(jax.device_put(a, cpu), jax.device_put(b, cpu)))
    except jax.errors.JaxRuntimeError:
        return False
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    want = np.maximum(a64 @ b64, 0.0) @ b64 + 1.0
    return bool(np.allclose(out, want, rtol=1e-5, atol=1e-6))


def resolve_cpu_dot_fusion(
    setting: str, backend: str | None = None, model: str | None = None
) -> str:
    """`Config.cpu_dot_fusion` -> "ynn" or "off", for the programs of a run on `backend`.

    "auto": "ynn" on the CPU backend for a model of `FUSION_MODELS` (None: any) when this
    jaxlib supports it, else "off". "ynn" where it cannot apply (another backend, or a jaxlib
    without the option) is a ValueError, raised before any training compiles.
    """
    if setting not in CPU_DOT_FUSIONS:
        raise ValueError(f"--cpu-dot-fusion {setting!r}; accepted: {', '.join(CPU_DOT_FUSIONS)}")
    backend = backend or jax.default_backend()
    if setting == "off":
        return "off"
    if setting == "auto" and model is not None and model not in FUSION_MODELS:
        return "off"
    if backend != "cpu":
        if setting == "ynn":
            raise ValueError(
                f"--cpu-dot-fusion ynn is an XLA:CPU option, but this run's backend is "
                f"{backend!r}; accepted there: auto, off"
            )
        return "off"
    if ynn_dot_fusion_supported():
        return "ynn"
    if setting == "ynn":
        raise ValueError(
            f"--cpu-dot-fusion ynn: this jaxlib ({_jaxlib()})"
            " does not accept xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT; "
            "accepted here: auto, off"
        )
    return "off"


def compiler_options(resolved: str) -> dict[str, Any] | None:
    """The `jax.jit(compiler_options=...)` of a resolved setting ("ynn" or "off")."""
    return _OPTIONS[resolved]


def _jaxlib() -> str:
    import jaxlib

    return str(jaxlib.__version__)


class Program:
    """`jax.jit(fun, compiler_options=options, **jit_kwargs)` that may also be called inside
    another trace.

    JAX refuses compiler options on a nested jit ("can only be passed to top-level
    `jax.jit`"), so a user's `jax.jit(lambda s: sim.run_rounds(s, ...))` would fail. Called
    with a traced argument (inside a user's jit or vmap), this runs the same function jitted
    without options: the outer program is compiled with whatever options its own jit has.
    Everything else (`lower`, `trace`, `eval_shape`, the cache) is the top-level jit's.
    """

    def __init__(
        self, fun: Callable[..., Any], options: dict[str, Any] | None, **jit_kwargs: Any
    ) -> None:
        self._top = jax.jit(fun, compiler_options=options, **jit_kwargs)
        self._nested = jax.jit(fun, **jit_kwargs) if options else self._top

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        traced = any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves((args, kwargs)))
        return (self._nested if traced else self._top)(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._top, name)
