"""Vmapped client chunks grouped by local steps, against chunks in id order, in one process.

A chunk of clients trained under `vmap` runs its largest client's step count for every
client of the chunk (the others' steps are computed and discarded). The engine therefore
forms chunks from the clients sorted by their steps (`engine.SORT_CHUNKS_BY_STEPS`). This
times, on a Dirichlet split of SYNTHETIC MNIST-kind images (unequal client sizes, as in the
paper's protocol), one jitted FedAvg / SPMC round (`Simulation.run_rounds`) under:

- `grouped`: `--client-chunk K`, chunks of clients sorted by steps (the default);
- `id_order`: the same chunks formed in client-id order (the switch off);
- `one_by_one`: chunk 1, the clients one after another (the sequential per-client loop
  inside the round; the CPU default);
- `all_vmapped`: every client in one chunk (the GPU default when memory allows).

Each variant is compiled ahead of time (compile reported apart) and the variants are run
interleaved, `--repeats` times; median [min, max] seconds and each variant's computed
client-steps (real steps plus the steps chunks compute for clients already done) are
reported, with ratios per interleaved sample. The global models are compared too.

    python benchmarks/chunk_grouping.py --clients 10 --client-chunk 5
    python benchmarks/chunk_grouping.py --clients 40 --client-chunk 10 --json runs/chunks.json

Nothing here asserts anything about time.
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
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from round_throughput import environment, synthetic_dataset, write_json

from spmc_jax import engine
from spmc_jax.config import Config

VARIANTS = ("grouped", "id_order", "one_by_one", "all_vmapped")


def chunk_cost(steps: list[int], chunk: int) -> int:
    """Client-steps computed by chunks of `chunk` clients taken in the given order."""
    parts = (steps[i : i + chunk] for i in range(0, len(steps), chunk))
    return sum(len(c) * max(c) for c in parts)


def build(args: argparse.Namespace, defense: str, variant: str):
    """(Simulation, compiled round) of one variant; the module switch is read at trace time."""
    chunk = {"one_by_one": 1, "all_vmapped": args.clients}.get(variant, args.client_chunk)
    cfg = Config(
        dataset="mnist",
        model=args.model,
        clients=args.clients,
        rounds=1,
        local_epochs=args.local_epochs,
        batch_size=args.batch_size,
        partition="dirichlet",
        beta=args.beta,
        defense=defense,
        attack="none",
        client_chunk=chunk,
        balance_clients=False,
        seed=args.seed,
    )
    sim = engine.Simulation(cfg, synthetic_dataset(args.samples))
    state, r0 = sim.init_state(), jnp.asarray(0, jnp.int32)
    engine.SORT_CHUNKS_BY_STEPS = variant != "id_order"
    try:
        t0 = time.perf_counter()
        # Nested, run_rounds compiles as part of this jit, so it takes the Simulation's options.
        one = sim.jit(lambda s, d: sim.run_rounds(s, d, 1, r0))
        fn = one.lower(state, sim.data).compile()
        compile_s = time.perf_counter() - t0
    finally:
        engine.SORT_CHUNKS_BY_STEPS = True
    return sim, state, fn, compile_s


def bench(args: argparse.Namespace, defense: str) -> dict[str, Any]:
    built = {v: build(args, defense, v) for v in VARIANTS}
    sim = built["grouped"][0]
    steps = (np.asarray(sim.plan.partition.sizes) // args.batch_size).tolist()
    epochs = sim.plan.epochs
    cost = {
        "grouped": chunk_cost(sorted(steps), args.client_chunk),
        "id_order": chunk_cost(steps, args.client_chunk),
        "one_by_one": sum(steps),
        "all_vmapped": len(steps) * max(steps),
    }

    def run(v: str) -> jax.Array:
        s, state, fn, _ = built[v]
        return jax.block_until_ready(fn(state, s.data)[0].global_flat)

    finals = {v: np.asarray(run(v)) for v in VARIANTS}  # warm-up
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):
        for v in VARIANTS:
            t0 = time.perf_counter()
            run(v)
            times[v].append(time.perf_counter() - t0)
    res: dict[str, Any] = {
        "defense": defense,
        "steps_per_epoch": steps,
        "epochs": epochs,
        "client_chunk": args.client_chunk,
        "client_devices": 1 if sim.mesh is None else sim.mesh.size,
    }
    for v in VARIANTS:
        ts = times[v]
        res[v] = {
            "round_s": statistics.median(ts),
            "min_s": min(ts),
            "max_s": max(ts),
            "compile_s": built[v][3],
            "computed_client_steps": cost[v] * epochs,
            "max_abs_diff_vs_grouped": float(np.max(np.abs(finals[v] - finals["grouped"]))),
        }
    for v in ("id_order", "one_by_one", "all_vmapped"):
        r = [a / b for a, b in zip(times[v], times["grouped"], strict=True)]
        res[f"speedup_grouped_vs_{v}"] = {
            "median": statistics.median(r),
            "min": min(r),
            "max": max(r),
        }
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--client-chunk", type=int, default=5)
    p.add_argument("--defense", nargs="+", default=["fedavg"], choices=["fedavg", "spmc"])
    p.add_argument("--model", default="simple_cnn", choices=["simple_cnn", "mlp"])
    p.add_argument("--samples", type=int, default=60_000, help="synthetic train images")
    p.add_argument("--beta", type=float, default=0.5, help="Dirichlet concentration")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="interleaved samples")
    p.add_argument("--cpu-devices", type=int, default=None, help="split the CPU into N devices")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if not 1 < args.client_chunk < args.clients:
        p.error(f"--client-chunk {args.client_chunk}; accepted: 2..{args.clients - 1}")
    if args.cpu_devices is not None:
        from spmc_jax.sharding import set_cpu_devices

        set_cpu_devices(args.cpu_devices)
    env = environment()
    n_dev = len(env["devices"])
    print(f"device: {env['device_kind']} x{n_dev} ({env['backend']}), jax {env['jax']}")
    print(
        f"config: {args.model}, {args.clients} clients, Dirichlet({args.beta}) of "
        f"{args.samples} synthetic images, batch {args.batch_size}, {args.local_epochs} "
        f"local epoch(s), chunk {args.client_chunk}, {args.repeats} interleaved samples"
    )
    rows = []
    for defense in args.defense:
        r = bench(args, defense)
        rows.append(r)
        print(f"{defense}: steps per client {r['steps_per_epoch']} x {r['epochs']} epoch(s)")
        for v in VARIANTS:
            d = r[v]
            print(
                f"  {v:12s} {d['round_s']:7.2f} s [{d['min_s']:.2f}, {d['max_s']:.2f}]  "
                f"{d['computed_client_steps']:6d} computed client-steps  compile "
                f"{d['compile_s']:.1f} s  max|dw| vs grouped {d['max_abs_diff_vs_grouped']:.1e}"
            )
        for v in ("id_order", "one_by_one", "all_vmapped"):
            s = r[f"speedup_grouped_vs_{v}"]
            print(f"  grouped vs {v}: {s['median']:.2f}x [{s['min']:.2f}, {s['max']:.2f}]")
    if args.json:
        write_json(args.json, {"environment": env, "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
