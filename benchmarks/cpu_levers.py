"""Issue 14's CPU levers on one client's local training, each variant timed in ONE process.

Variants (each a fresh `Simulation` whose jitted `local_train` is traced under the setting):

- `block-N` / `block-none`: `layers.IM2COL_BATCH_BLOCK` = N (the full-im2col stem convolution
  over blocks of N images, each block's im2col recomputed in the backward pass) or one block;
- `no-crop`: the training transform without its random crop, at the default block: an upper
  bound on what fusing the crop into conv1's im2col gather could save (the fused version
  still has to gather the same pixels);
- `no-fold`: `layers.FOLD_EQUAL_CHANNELS` off, at the default block: the stem convolves all
  3 channels of the (equal-channel, MNIST-kind) images instead of one channel with the
  kernel summed over channels. The timed client is benign (its batches are clean);
- `no-dot-fusion`: the default settings, compiled without XLA:CPU's YNNPACK dot fusion
  (`--cpu-dot-fusion off`; every other variant is compiled with the Simulation's own
  `compiler_options`, as the engine's round is);
- `xla:KEY=VALUE[,KEY=VALUE...]`: the default settings, compiled with these XLA debug options
  on top of the Simulation's own (e.g. `xla:xla_cpu_enable_fast_min_max=true`): any option
  this jaxlib's XLA:CPU accepts, to try it without editing code. Values parse as int, float
  or true/false, else stay strings (enum names).

All variants run A B C … A B C … `--repeats` times; per sample: steps/s (wall) and CPU ms per
step (`time.process_time`, all threads), whose ratio to the first variant's is far less
sensitive to other processes on a shared machine than wall time. The first variant's final
weights are compared with every other's (max |diff|: float32 summation order, or the
changed augmentation for `no-crop`).

    python benchmarks/cpu_levers.py --defense fedavg --variants block-none block-8 block-4
    python benchmarks/cpu_levers.py --defense spmc --variants block-8 no-fold
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sibling benchmarks

import round_throughput

from spmc_jax.client import ClientTask
from spmc_jax.compile_options import Program
from spmc_jax.data import pipeline
from spmc_jax.engine import first_block
from spmc_jax.models import layers

DEFENSES = ("fedavg", "spmc")


def _no_crop(key: jax.Array, x: jax.Array, size: int = 32, pad: int = 4) -> jax.Array:
    del key, size, pad
    return x


def _option_value(v: str) -> Any:
    """An `xla:` variant's value as XLA's option parser wants it: bool, int, float or str."""
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return v


def _xla_options(spec: str) -> dict[str, Any]:
    """`KEY=VALUE[,KEY=VALUE...]` -> {KEY: value}; a SystemExit naming a malformed item."""
    out = {}
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("xla_") or not value:
            raise SystemExit(f"variant option {item!r}; accepted: xla_NAME=VALUE")
        out[key] = _option_value(value)
    return out


def _settings(name: str) -> dict[str, Any]:
    """A variant's name -> the module settings it traces under (and its compiler options)."""
    base = {"block": layers.IM2COL_BATCH_BLOCK, "crop": pipeline.random_crop, "fold": True}
    if name.startswith("xla:"):
        return {**base, "extra_options": _xla_options(name.removeprefix("xla:"))}
    if name == "no-dot-fusion":
        return {**base, "fusion": "off"}
    if name == "no-crop":
        return {**base, "crop": _no_crop}
    if name == "no-fold":
        return {**base, "fold": False}
    if name.startswith("block-"):
        v = name.removeprefix("block-")
        if v == "none":
            return {**base, "block": None}
        if v.isdigit() and int(v) > 0:
            return {**base, "block": int(v)}
    raise SystemExit(
        f"variant {name!r}; accepted: block-none, block-N (N >= 1), no-crop, no-fold, "
        "no-dot-fusion, xla:KEY=VALUE[,KEY=VALUE...]"
    )


def build(defense: str, name: str, steps: int, batch_size: int):
    """`(run, final_variables)` of the variant: `run()` = one jitted local training."""
    s = _settings(name)
    saved = layers.IM2COL_BATCH_BLOCK, pipeline.random_crop, layers.FOLD_EQUAL_CHANNELS
    layers.IM2COL_BATCH_BLOCK, pipeline.random_crop = s["block"], s["crop"]
    layers.FOLD_EQUAL_CHANNELS = s["fold"]
    try:
        args = argparse.Namespace(
            samples=steps * batch_size, batch_size=batch_size, local_epochs=1, client_chunk=None
        )
        sim = round_throughput.bench_simulation(
            2,
            defense,
            args,
            conv_impl="patches",
            model="simple_cnn",
            cpu_dot_fusion=s.get("fusion", "auto"),
        )
        state = sim.init_state()
        data = sim.data
        train = first_block(data.train)
        variables = sim.flat.unravel(state.global_flat)
        teacher = jax.tree.map(lambda a: a * 1.01, variables)  # a teacher unlike the student
        task = ClientTask(
            data.idx[0], data.sizes[0], data.malicious[0], data.rank[0], jax.random.key(1)
        )
        options = {**(sim.compiler_options or {}), **s.get("extra_options", {})}
        local = Program(sim.local_train, options or None)
        on = jnp.asarray(True)

        def run() -> Any:
            return jax.block_until_ready(local(variables, teacher, train, task, on).variables)

        out = run()  # traced and compiled here, under the variant's settings
    finally:
        layers.IM2COL_BATCH_BLOCK, pipeline.random_crop, layers.FOLD_EQUAL_CHANNELS = saved
    return run, out


def _stats(xs: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "samples": xs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--defense", default="fedavg", choices=DEFENSES)
    p.add_argument("--variants", nargs="+", default=["block-none", "block-8", "no-crop"])
    p.add_argument("--steps", type=int, default=10, help="SGD steps per timed sample")
    p.add_argument("--repeats", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    for n in ("steps", "repeats", "batch_size"):
        if getattr(args, n) < 1:
            raise SystemExit(f"--{n.replace('_', '-')} {getattr(args, n)}; accepted: >= 1")
    for v in args.variants:
        _settings(v)
    runs, outs = {}, {}
    for v in args.variants:
        runs[v], outs[v] = build(args.defense, v, args.steps, args.batch_size)
    first = args.variants[0]
    diff = {
        v: max(
            float(jnp.max(jnp.abs(a - b)))
            for a, b in zip(jax.tree.leaves(outs[first]), jax.tree.leaves(outs[v]), strict=True)
        )
        for v in args.variants
    }
    rate: dict[str, list[float]] = {v: [] for v in runs}
    cpu: dict[str, list[float]] = {v: [] for v in runs}
    for _ in range(args.repeats):
        for v, run in runs.items():
            c0, t0 = time.process_time(), time.perf_counter()
            run()
            rate[v].append(args.steps / (time.perf_counter() - t0))
            cpu[v].append(1000.0 * (time.process_time() - c0) / args.steps)
    rows = []
    for v in runs:
        wall = [a / b for a, b in zip(rate[v], rate[first], strict=True)]
        cpu_x = [b / a for a, b in zip(cpu[v], cpu[first], strict=True)]
        rows.append(
            {
                "variant": v,
                "steps_per_s": _stats(rate[v]),
                "cpu_ms_per_step": _stats(cpu[v]),
                # > 1: faster than the first variant in the same sample.
                "wall_speedup": _stats(wall),
                "cpu_speedup": _stats(cpu_x),
                "max_abs_diff_vs_first": diff[v],
            }
        )
        f = lambda s: f"{s['median']:.2f} [{s['min']:.2f}, {s['max']:.2f}]"
        r = rows[-1]
        print(
            f"{args.defense} {v:>10}: {f(r['steps_per_s'])} steps/s, CPU {f(r['cpu_ms_per_step'])}"
            f" ms/step; vs {first}: wall {f(r['wall_speedup'])}, CPU {f(r['cpu_speedup'])}; "
            f"max |diff| {diff[v]:.1e}",
            flush=True,
        )
    load = os.getloadavg()
    print(f"load {load[0]:.1f}")
    if args.json:
        round_throughput.write_json(
            args.json, {"args": vars(args), "loadavg": load, "rows": rows, "jax": jax.__version__}
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
