"""Round throughput: the vectorized engine against a sequential loop of the same client step.

For every client count K (and every `--defense`, default fedavg and spmc) this builds a real
`Simulation` on SYNTHETIC data (random uint8 28×28 "MNIST-kind" images, IID partition, every
client holding `--samples` images, so `--samples // --batch-size` SGD steps per local epoch)
and times, in the same process on the same device:

- `engine`: one full jitted round, `Simulation.run_rounds(state, data, 1, r)` (local training
  of all K clients + attack + aggregation + new global; SPMC also teachers and projection);
- `vmap`: the vmapped local training alone (no aggregation), for reference;
- `seq_step`: the shape of a PyTorch training loop (the reference's): for each client, for
  each of its epochs and batches, one call of the SAME jitted SGD step the engine scans
  (`Simulation.client_step`: batch gather, augmentation, attack, forward/backward, SPMC
  projection, optimizer update), the result blocked on before the next client;
- `seq_client`: a stronger baseline, a Python loop over clients of the whole local training
  (`Simulation.local_train`: the same steps under one jitted `lax.scan` per client).
Neither sequential loop includes the aggregation, so ratios are conservative for the engine.

Client-steps = K × local epochs × steps per epoch. Timing: one warm-up call (compile time
reported separately), then the median of `--repeats` calls; wall time and the process CPU
time (the second is less sensitive to other processes on a shared machine). The sequential
loop is measured on min(K, `--seq-max`) clients and scaled linearly (stated in the output).

    python benchmarks/round_throughput.py --quick
    python benchmarks/round_throughput.py --clients 10 100 1000 --json runs/round.json
    python benchmarks/round_throughput.py --conv-impl lax patches --clients 10 100

Nothing here asserts anything about time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spmc_jax.client import ClientTask, epoch_order
from spmc_jax.config import MODELS, Config
from spmc_jax.data.types import Dataset
from spmc_jax.engine import Simulation, first_block


def synthetic_dataset(n_train: int, n_test: int = 200, seed: int = 0) -> Dataset:
    """Random MNIST-shaped uint8 images with random labels (throughput only, not learning)."""
    rng = np.random.RandomState(seed)
    x = rng.randint(0, 256, (n_train + n_test, 28, 28, 1), dtype=np.uint8)
    y = rng.randint(0, 10, n_train + n_test).astype(np.int32)
    return Dataset(
        "synthetic-mnist", x[:n_train], y[:n_train], x[n_train:], y[n_train:], "generated", "mnist"
    )


def _time(fn, repeats: int) -> dict[str, float]:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    walls, cpus = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        jax.block_until_ready(fn())
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return {
        "first_call_s": first,
        "wall_s": statistics.median(walls),
        "cpu_s": statistics.median(cpus),
    }


def bench_simulation(
    k: int, defense: str, args: argparse.Namespace, **overrides: Any
) -> Simulation:
    """A real one-round `Simulation` of K clients on synthetic data, each holding exactly
    `args.samples` images (IID split of a pool that is 90 % of the train set)."""
    n_train = int(np.ceil(k * args.samples / 0.9)) + 10
    cfg = Config(
        dataset="mnist",
        clients=k,
        rounds=1,
        local_epochs=args.local_epochs,
        batch_size=args.batch_size,
        partition="iid",
        defense=defense,
        attack="base",
        gamma=0.2,
        client_chunk=args.client_chunk,
        eval_batch=200,
        **overrides,
    )
    return Simulation(cfg, synthetic_dataset(n_train))


def bench_cell(k: int, defense: str, conv_impl: str, args: argparse.Namespace) -> dict[str, Any]:
    """Time one (K, defense, conv_impl) cell."""
    sim = bench_simulation(k, defense, args, conv_impl=conv_impl, model=args.model)
    cfg = sim.cfg
    plan = sim.plan
    steps = int(plan.partition.sizes.min() // cfg.batch_size) * plan.epochs
    client_steps = k * steps
    state = sim.init_state()
    data = sim.data
    train = first_block(data.train)  # one device: block 0 = every client
    r0 = jnp.asarray(0, jnp.int32)
    res: dict[str, Any] = {
        "K": k,
        "defense": defense,
        "model": sim.cfg.model,
        "conv_impl": sim.conv_impl,
        "client_steps": client_steps,
        "steps_per_client": steps,
        "dim": plan.dim,
        "client_chunk": sim.client_chunk,
    }
    eng = _time(lambda: sim.run_rounds(state, data, 1, r0)[0].global_flat, args.repeats)
    res["engine"] = eng

    variables = sim.flat.unravel(state.global_flat)
    keys = jax.random.split(jax.random.key(1), k)
    attack_on = jnp.asarray(True)

    def task(i):
        return ClientTask(data.idx[i], data.sizes[i], data.malicious[i], data.rank[i], keys[i])

    teacher = variables  # SPMC: round-0 teachers are the global model
    local = sim.jit(sim.local_train)  # compiled as the engine's round is
    vm = sim.jit(jax.vmap(sim.local_train, in_axes=(None, None, None, 0, None)))
    all_tasks = task(jnp.arange(k))
    if k <= args.vmap_max:
        res["vmap"] = _time(
            lambda: vm(variables, teacher, train, all_tasks, attack_on).loss, args.repeats
        )
    else:  # K vmapped im2col buffers at once would not fit (3+ GB at K = 1000)
        res["vmap"] = {"wall_s": float("nan"), "cpu_s": float("nan"), "skipped": True}
    n_seq = min(k, args.seq_max)
    tasks = [jax.tree.map(lambda a, i=i: a[i], all_tasks) for i in range(n_seq)]
    scale = k / n_seq

    def seq_client():
        out = None
        for t in tasks:
            out = local(variables, teacher, train, t, attack_on).loss
            out.block_until_ready()
        return out

    step = sim.jit(sim.client_step)
    order = jax.jit(epoch_order)
    opt_init = jax.jit(sim._tx.init)
    sizes = np.asarray(data.sizes)

    def seq_step():
        out = None
        for i, t in enumerate(tasks):
            v, opt = variables, opt_init(variables["params"])
            for e in range(plan.epochs):
                perm, key = order(t, jnp.asarray(e, jnp.int32))
                for s_ in range(int(sizes[i]) // cfg.batch_size):
                    r = step(v, opt, teacher, train, t, attack_on, perm, key, s_)
                    v, opt = r.variables, r.opt_state
            out = jax.block_until_ready(v)
        return out

    for name, fn in (("seq_step", seq_step), ("seq_client", seq_client)):
        s = _time(fn, max(1, args.repeats))
        res[name] = {
            "first_call_s": s["first_call_s"],
            "wall_s": s["wall_s"] * scale,
            "cpu_s": s["cpu_s"] * scale,
            "measured_clients": n_seq,
        }
    for name in ("engine", "vmap", "seq_step", "seq_client"):
        d = res[name]
        d["client_steps_per_s"] = client_steps / d["wall_s"]
    for name in ("seq_step", "seq_client"):
        res[f"ratio_engine_vs_{name}_wall"] = res[name]["wall_s"] / eng["wall_s"]
        res[f"ratio_engine_vs_{name}_cpu"] = res[name]["cpu_s"] / eng["cpu_s"]
    res["ratio_vmap_vs_seq_client_wall"] = res["seq_client"]["wall_s"] / res["vmap"]["wall_s"]
    return res


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Write a benchmark's results (creating the folder) and say where."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=1)
    print(f"wrote {path}")


def environment() -> dict[str, Any]:
    dev = jax.devices()[0]
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": dev.device_kind,
        "cpu_count": os.cpu_count(),
        "cores_used": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--defense", nargs="+", default=["fedavg", "spmc"])
    p.add_argument("--conv-impl", nargs="+", default=["auto"])
    p.add_argument("--model", default="simple_cnn", choices=MODELS)
    p.add_argument("--samples", type=int, default=128, help="images per client")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--client-chunk", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--seq-max",
        type=int,
        default=100,
        help="time the sequential loop on at most this many clients, scale linearly",
    )
    p.add_argument(
        "--vmap-max",
        type=int,
        default=100,
        help="time the all-clients vmap of local training (no aggregation) only up to this K",
    )
    p.add_argument(
        "--cpu-devices",
        type=int,
        default=None,
        help="split the CPU into N JAX devices; the engine shards clients over them (the "
        "sequential loops run on device 0, so compare them with a run without this flag)",
    )
    p.add_argument(
        "--cores",
        type=int,
        default=None,
        help="pin this process to its first N allowed CPU cores (Linux; see core_scaling.py)",
    )
    p.add_argument("--quick", action="store_true", help="K in {10, 100}, fedavg only, 1 repeat")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.cores is not None:
        allowed = sorted(os.sched_getaffinity(0))
        if not 1 <= args.cores <= len(allowed):
            raise SystemExit(f"--cores {args.cores}; accepted: 1..{len(allowed)} (allowed cores)")
        os.sched_setaffinity(0, allowed[: args.cores])  # before XLA starts its threads
    if args.cpu_devices is not None:
        from spmc_jax.sharding import set_cpu_devices

        set_cpu_devices(args.cpu_devices)  # before the first backend use below
    if args.quick:
        args.clients, args.defense, args.repeats, args.seq_max = [10, 100], ["fedavg"], 1, 20
    env = environment()
    print(
        f"jax {env['jax']} on {env['backend']}: {env['devices']} ({env['device_kind']}), "
        f"{env['cpu_count']} CPUs ({env['cores_used']} used), load {env['loadavg']}"
    )
    print(
        f"config: {args.model}, synthetic MNIST-kind data, {args.samples} images/client, batch "
        f"{args.batch_size}, {args.local_epochs} local epoch(s), chunk {args.client_chunk}"
    )
    rows = []
    hdr = (
        f"{'K':>6} {'defense':>7} {'conv':>7} {'chunk':>5} {'steps':>6} | {'engine s':>8} "
        f"{'steps/s':>8} | {'vmap s':>7} | {'seq_step s':>10} {'steps/s':>8} | "
        f"{'seq_client s':>12} "
        f"| {'x step':>6} {'x client':>8} {'(cpu)':>6} | compile s"
    )
    print(hdr)
    for impl in args.conv_impl:
        for defense in args.defense:
            for k in args.clients:
                r = bench_cell(k, defense, impl, args)
                rows.append(r)
                e, v, ss, sc = r["engine"], r["vmap"], r["seq_step"], r["seq_client"]
                print(
                    f"{k:>6} {defense:>7} {r['conv_impl']:>7} {r['client_chunk']!s:>5} "
                    f"{r['client_steps']:>6} | {e['wall_s']:>8.3f} "
                    f"{e['client_steps_per_s']:>8.1f} | {v['wall_s']:>7.3f} | "
                    f"{ss['wall_s']:>10.3f} {ss['client_steps_per_s']:>8.1f} | "
                    f"{sc['wall_s']:>12.3f} | "
                    f"{r['ratio_engine_vs_seq_step_wall']:>6.2f} "
                    f"{r['ratio_engine_vs_seq_client_wall']:>8.2f} "
                    f"{r['ratio_engine_vs_seq_client_cpu']:>6.2f} | "
                    f"{e['first_call_s'] - e['wall_s']:.1f}",
                    flush=True,
                )
    print(
        "x step / x client = sequential time / engine time (>1: the engine is faster) against "
        "the per-step loop and the per-client scan loop; (cpu): the same for process CPU time. "
        f"Sequential loops run on <= {args.seq_max} clients, scaled linearly to K."
    )
    if args.json:
        write_json(args.json, {"environment": env, "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
