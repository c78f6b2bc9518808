"""Roofline: achieved FLOP/s of the client step against the device's measured matmul peak.

Everything is measured in ONE process on ONE device, so the percentage compares like with like:

1. Matmul peak: a jitted float32 `a @ b` (default matmul precision, the one the model's layers
   use) for square sizes n, best of `--repeats` batches of calls (a batch of back-to-back
   calls amortises the dispatch), 2·n³/t FLOP/s; the peak is the best size. On accelerators
   float32 at `Precision.HIGHEST` is measured too (the default may use TF32 tensor cores);
   `--bf16` adds bfloat16. On CPU both precisions are the same and HIGHEST is skipped.
2. FLOPs: XLA's own count, `jax.jit(f).lower(*args).compile().cost_analysis()["flops"]`, of
   (a) ONE SGD step of one client (`Simulation.client_step`: batch gather, augmentation,
   attack, forward/backward, SPMC teacher forward + second backward + projection, optimizer
   update), (a') one client's whole local training (`Simulation.local_train`, a `lax.scan` of
   steps) and (b) one full engine round (`Simulation.run_rounds(state, data, 1, r)`: K
   clients + attack + aggregation + new global), for every `--defense`. XLA's cost analysis
   counts the body of a while loop (every `lax.scan`/`lax.map`) ONCE, not × its trip count;
   the script checks this (XLA's count of (a') and (b) against steps × (a)) and, when the
   loop is undercounted, uses per-step FLOPs × client-steps plus the part of XLA's count
   outside the step (aggregation, epoch orders, etc.) instead, and says so. An analytic
   count of the SimpleCNN's conv/matmul FLOPs from its layer shapes is printed beside XLA's.
3. Time: one warm-up call, then the median of `--repeats` calls; (a) is timed as a Python
   loop of `--chain` dependent jitted steps blocked on at the end (the shape of a PyTorch
   training loop), per step. Reported: GFLOP/s, % of the measured f32 peak, client-steps/s.

Data: synthetic MNIST-kind images (`round_throughput.synthetic_dataset`), IID split,
`--samples` images per client; it measures throughput, not learning.

    python benchmarks/roofline.py --quick
    python benchmarks/roofline.py --clients 100 --json runs/roofline.json
    python benchmarks/roofline.py --conv-impl lax --bf16          # on a GPU

Nothing here asserts anything about time.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from itertools import pairwise
from typing import Any

import jax
import jax.numpy as jnp

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))
sys.path.insert(0, _HERE)

from round_throughput import bench_simulation, environment, write_json  # noqa: E402

from spmc_jax.client import ClientTask, epoch_order  # noqa: E402
from spmc_jax.engine import first_block  # noqa: E402

# Below this ratio of XLA's count to steps × the single step's count, a loop body was counted
# once (the ratio is then ~1/steps); above it XLA multiplied by the trip count (ratio ~1).
UNDERCOUNT_RATIO = 0.9
# Cap on the outputs kept alive by one batch of matmul calls (bytes).
MATMUL_BATCH_BYTES = 2 * 2**30


# ----------------------------------------------------------------------------- FLOPs
def xla_flops(compiled: Any) -> float | None:
    """The "flops" of a compiled executable's cost analysis (dict or list-of-dict forms)."""
    try:
        ca = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    if not ca or "flops" not in ca:
        return None
    return float(ca["flops"])


def simple_cnn_flops(batch: int, spmc: bool) -> dict[str, float]:
    """Conv/matmul FLOPs of one SimpleCNN training step from the layer shapes (no bias,
    ReLU, pooling, augmentation or optimizer terms).

    A layer with M multiply-adds per image costs 2M FLOPs forward, 2M for its weight gradient
    and 2M for its input gradient, except the first layer, whose input (the image) needs no
    gradient: fwd+bwd = 6·ΣM − 2·M_conv1. SPMC adds a teacher forward (2·ΣM) and a second
    backward through the student's VJP for the guide gradient (4·ΣM − 2·M_conv1).
    """
    h, cin = 32, 3  # INPUT_SHAPE (32, 32, 3): MNIST is resized and tiled to 3 channels
    macs: list[tuple[str, int]] = []
    for name, cout, k in (("conv1", 6, 5), ("conv2", 16, 5)):
        oh = h - k + 1  # valid conv, stride 1
        macs.append((name, oh * oh * cout * k * k * cin))
        h, cin = oh // 2, cout  # 2×2 max pool
    dims = [h * h * cin, 120, 84, 84, 256, 10]  # flatten (400) → fc1 fc2 l1 l2 cls
    for name, (a, b) in zip(("fc1", "fc2", "l1", "l2", "cls"), pairwise(dims), strict=True):
        macs.append((name, a * b))
    total = sum(m for _, m in macs)
    first = macs[0][1]
    fwd = 2 * total
    bwd = 4 * total - 2 * first
    per_image = fwd + bwd + ((fwd + bwd) if spmc else 0)
    return {
        "macs_per_image": float(total),
        "fwd_per_image": float(fwd),
        "fwd_bwd_per_image": float(fwd + bwd),
        "step_per_image": float(per_image),
        "step": float(per_image * batch),
        "layers_macs": {n: float(m) for n, m in macs},
    }


# ----------------------------------------------------------------------------- timing
def _median_time(fn: Callable[[], Any], repeats: int) -> dict[str, float]:
    """Warm-up call, then the median wall / process-CPU time of `repeats` blocked calls."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    walls, cpus = [], []
    for _ in range(max(1, repeats)):
        c0, t0 = time.process_time(), time.perf_counter()
        jax.block_until_ready(fn())
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return {
        "first_call_s": first,
        "wall_s": statistics.median(walls),
        "cpu_s": statistics.median(cpus),
    }


def matmul_peak(
    sizes: list[int], dtype: Any, precision: Any, repeats: int, min_batch_s: float
) -> list[dict[str, float]]:
    """Best-of-`repeats` time of a jitted n×n @ n×n for each n; 2·n³/t FLOP/s."""
    f = jax.jit(lambda a, b: jnp.matmul(a, b, precision=precision))
    rows = []
    for n in sizes:
        ka, kb = jax.random.split(jax.random.key(n))
        a = jax.random.normal(ka, (n, n), dtype)
        b = jax.random.normal(kb, (n, n), dtype)
        jax.block_until_ready(f(a, b))  # compile + warm-up
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, b))
        one = time.perf_counter() - t0
        keep = max(1, MATMUL_BATCH_BYTES // (n * n * jnp.dtype(dtype).itemsize))
        calls = int(min(keep, max(1, math.ceil(min_batch_s / max(one, 1e-9)))))
        best = math.inf
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            outs = [f(a, b) for _ in range(calls)]  # back-to-back: dispatch overlaps compute
            jax.block_until_ready(outs)
            best = min(best, (time.perf_counter() - t0) / calls)
            del outs
        rows.append({"n": n, "calls_per_batch": calls, "s": best, "gflops": 2 * n**3 / best / 1e9})
    return rows


# ----------------------------------------------------------------------------- one cell
def bench_defense(defense: str, args: argparse.Namespace, peak: float) -> dict[str, Any]:
    """FLOPs and times of (a) one step, (a') one client's local training, (b) one round."""
    sim = bench_simulation(args.clients, defense, args, model=args.model, conv_impl=args.conv_impl)
    cfg = sim.cfg
    plan = sim.plan
    # The scans run steps_per_epoch (of the LARGEST client) steps for every client; steps past
    # a client's own data are masked but still computed, so they count as executed.
    steps = plan.steps_per_epoch * plan.epochs
    client_steps = sim.n * steps
    state, data = sim.init_state(), sim.data
    train = first_block(data.train)  # one device: block 0 = every client
    r0 = jnp.asarray(0, jnp.int32)
    variables = sim.flat.unravel(state.global_flat)
    opt_state = sim._tx.init(variables["params"])
    teacher = variables  # SPMC round-0 teachers are the global model
    attack_on = jnp.asarray(True)
    key = jax.random.key(1)
    task = ClientTask(data.idx[0], data.sizes[0], data.malicious[0], data.rank[0], key)
    perm, step_key = jax.jit(epoch_order)(task, jnp.asarray(0, jnp.int32))
    s_idx = [jnp.asarray(s, jnp.int32) for s in range(plan.steps_per_epoch)]

    # (a) one SGD step of one client.
    t0 = time.perf_counter()
    step_c = (
        sim.jit(sim.client_step)
        .lower(variables, opt_state, teacher, train, task, attack_on, perm, step_key, s_idx[0])
        .compile()
    )
    compile_step = time.perf_counter() - t0
    chain = max(1, args.chain)

    def run_chain():
        v, opt = variables, opt_state
        for i in range(chain):
            out = step_c(
                v, opt, teacher, train, task, attack_on, perm, step_key, s_idx[i % len(s_idx)]
            )
            v, opt = out.variables, out.opt_state
        return v

    t_step = _median_time(run_chain, args.repeats)
    t_step = {name: val / chain for name, val in t_step.items()} | {"chain": chain}

    # (a') one client's local training (lax.scan over its steps).
    t0 = time.perf_counter()
    local_c = sim.jit(sim.local_train).lower(variables, teacher, train, task, attack_on).compile()
    compile_local = time.perf_counter() - t0
    t_local = _median_time(
        lambda: local_c(variables, teacher, train, task, attack_on).loss, args.repeats
    )

    # (b) one engine round (count=1 is static: the compiled call takes the other three args).
    t0 = time.perf_counter()
    round_c = sim.run_rounds.lower(state, data, 1, r0).compile()
    compile_round = time.perf_counter() - t0
    t_round = _median_time(lambda: round_c(state, data, r0)[0].global_flat, args.repeats)

    f_step = xla_flops(step_c)
    f_local_xla = xla_flops(local_c)
    f_round_xla = xla_flops(round_c)
    notes: list[str] = []

    def used(
        xla: float | None, n_steps: int, body_steps: int, what: str
    ) -> tuple[float | None, float | None]:
        """(FLOPs to use, XLA / (n_steps × step)). `body_steps`: steps traced in the loop body."""
        if xla is None or not f_step:
            return xla, None
        ratio = xla / (n_steps * f_step)
        if ratio >= UNDERCOUNT_RATIO or n_steps == body_steps:
            return xla, ratio
        # Loop body counted once: XLA's count ≈ copies × body_steps × step + the part outside
        # the step (copies = 1, or more where XLA unrolled a loop partly).
        copies = max(1, round(xla / (body_steps * f_step)))
        rest = max(xla - copies * body_steps * f_step, 0.0)
        notes.append(
            f"{defense} {what}: XLA counts {xla / 1e9:.4g} GFLOP = {ratio:.3f} × ({n_steps} "
            f"steps × step) ≈ {copies * body_steps} steps → while-loop body counted once, not "
            f"× trip count; using {n_steps} × step + {rest / 1e9:.3g} GFLOP outside the step"
        )
        return n_steps * f_step + rest, ratio

    # Clients traced into the loop body: vmap puts all m in one; a chunked lax.map puts
    # `chunk` in its loop body and maps the remainder m % chunk once outside it.
    chunk = sim.client_chunk
    body = sim.n if chunk is None or chunk >= sim.n else chunk + sim.n % chunk
    f_local, r_local = used(f_local_xla, steps, 1, "local_train")
    f_round, r_round = used(f_round_xla, client_steps, body, "round")

    analytic = (
        simple_cnn_flops(cfg.batch_size, cfg.uses_spmc_client)
        if cfg.model == "simple_cnn"
        else None
    )

    def row(
        what: str,
        xla: float | None,
        flops: float | None,
        t: dict,
        n_steps: int,
        ratio: float | None,
    ) -> dict[str, Any]:
        gflops = flops / t["wall_s"] / 1e9 if flops else None
        return {
            "what": what,
            "client_steps": n_steps,
            "xla_flops": xla,
            "xla_over_steps_x_step": ratio,
            "flops": flops,
            "analytic_flops": analytic["step"] * n_steps if analytic else None,
            "time": t,
            "gflops_per_s": gflops,
            "pct_of_peak": 100 * gflops / peak if gflops and peak else None,
            "client_steps_per_s": n_steps / t["wall_s"],
        }

    return {
        "defense": defense,
        "K": sim.n,
        "conv_impl": sim.conv_impl,
        "client_chunk": sim.client_chunk,
        "steps_per_client": steps,
        "client_steps": client_steps,
        "dim": plan.dim,
        "compile_s": {"step": compile_step, "local_train": compile_local, "round": compile_round},
        "analytic": analytic,
        "rows": [
            row(
                "step (1 client, jitted call loop)",
                f_step,
                f_step,
                t_step,
                1,
                1.0 if f_step else None,
            ),
            row("local_train (1 client, scan)", f_local_xla, f_local, t_local, steps, r_local),
            row(f"round (K={sim.n}, engine)", f_round_xla, f_round, t_round, client_steps, r_round),
        ],
        "notes": notes,
    }


# ----------------------------------------------------------------------------- main
def _g(x: float | None, fmt: str = ".4g") -> str:
    return "-" if x is None else format(x, fmt)


def _giga(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e9:.4g}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=10, help="K clients per round")
    p.add_argument("--defense", nargs="+", default=["fedavg", "spmc"])
    p.add_argument("--samples", type=int, default=128, help="images per client")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--model", default="simple_cnn", help="simple_cnn, resnet10, mlp")
    p.add_argument("--conv-impl", default="auto", help="auto, lax, patches")
    p.add_argument("--client-chunk", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chain", type=int, default=20, help="dependent steps per timed step loop")
    p.add_argument(
        "--matmul-sizes",
        type=int,
        nargs="+",
        default=None,
        help="square matmul sizes (default: 512 1024 2048 on CPU, 1024..8192 elsewhere)",
    )
    p.add_argument("--bf16", action="store_true", help="also measure the bfloat16 matmul peak")
    p.add_argument("--quick", action="store_true", help="fedavg only, small matmuls, 2 repeats")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    cpu = jax.default_backend() == "cpu"
    if args.matmul_sizes is None:
        args.matmul_sizes = [512, 1024, 2048] if cpu else [1024, 2048, 4096, 8192]
    if args.quick:
        args.defense, args.repeats, args.chain = ["fedavg"], 2, 8
        args.matmul_sizes = [256, 512, 1024] if cpu else [1024, 4096]
    env = environment()
    env["default_matmul_precision"] = str(jax.config.jax_default_matmul_precision)
    print(
        f"jax {env['jax']} on {env['backend']}: {env['devices']} ({env['device_kind']}), "
        f"{env['cpu_count']} CPUs, load {env['loadavg']}"
    )

    min_batch_s = 0.05 if args.quick else 0.2
    matmul: dict[str, list[dict[str, float]]] = {}
    kinds: list[tuple[str, Any, Any]] = [("f32", jnp.float32, None)]
    if not cpu:
        kinds.append(("f32_highest", jnp.float32, jax.lax.Precision.HIGHEST))
    if args.bf16:
        kinds.append(("bf16", jnp.bfloat16, None))
    print(
        f"matmul peak: jitted a @ b, best of {args.repeats} batches, "
        f"default precision = {env['default_matmul_precision']}"
    )
    print(f"{'dtype':>12} {'n':>6} {'ms/call':>9} {'GFLOP/s':>10}")
    for name, dtype, prec in kinds:
        matmul[name] = matmul_peak(args.matmul_sizes, dtype, prec, args.repeats, min_batch_s)
        for r in matmul[name]:
            print(f"{name:>12} {r['n']:>6} {1e3 * r['s']:>9.3f} {r['gflops']:>10.1f}", flush=True)
    peaks = {name: max(r["gflops"] for r in rows) for name, rows in matmul.items()}
    peak = peaks["f32"]
    print("peaks (GFLOP/s): " + ", ".join(f"{n} {v:.1f}" for n, v in peaks.items()))
    print(
        f"config: {args.model}, synthetic MNIST-kind data, K={args.clients}, {args.samples} "
        f"images/client, batch {args.batch_size}, {args.local_epochs} local epoch(s), conv "
        f"{args.conv_impl}, chunk {args.client_chunk}; % of the f32 peak {peak:.1f} GFLOP/s"
    )
    results = []
    for defense in args.defense:
        res = bench_defense(defense, args, peak)
        results.append(res)
        a = res["analytic"]
        print(
            f"\n[{defense}] K={res['K']} conv={res['conv_impl']} chunk={res['client_chunk']} "
            f"steps/client={res['steps_per_client']} client-steps={res['client_steps']} "
            f"d={res['dim']}; compile s: "
            + ", ".join(f"{n} {v:.1f}" for n, v in res["compile_s"].items())
        )
        if a:
            print(
                f"  analytic conv+matmul MFLOP/image: fwd {a['fwd_per_image'] / 1e6:.3f}, "
                f"fwd+bwd {a['fwd_bwd_per_image'] / 1e6:.3f}, "
                f"this step {a['step_per_image'] / 1e6:.3f} "
                f"(× batch {args.batch_size} = {a['step'] / 1e6:.1f} MFLOP/step)"
            )
        print(
            f"  {'what':<34} {'XLA GF':>9} {'XLA/(n·step)':>12} {'used GF':>9} "
            f"{'analytic GF':>11} {'wall s':>9} {'GFLOP/s':>8} {'% peak':>7} {'steps/s':>9}"
        )
        for r in res["rows"]:
            print(
                f"  {r['what']:<34} {_giga(r['xla_flops']):>9} "
                f"{_g(r['xla_over_steps_x_step'], '.3f'):>12} {_giga(r['flops']):>9} "
                f"{_giga(r['analytic_flops']):>11} "
                f"{r['time']['wall_s']:>9.4f} {_g(r['gflops_per_s'], '.2f'):>8} "
                f"{_g(r['pct_of_peak'], '.2f'):>7} {r['client_steps_per_s']:>9.1f}",
                flush=True,
            )
        for n in res["notes"]:
            print(f"  note: {n}")
    print(
        "\nGF = GFLOP. XLA/(n·step): XLA's count of the whole call over (its client-steps × the "
        "single step's count); ~1/steps means a loop body counted once (then 'used' = "
        "client-steps × step + the rest of XLA's count). analytic = conv/matmul FLOPs only "
        "(no elementwise, augmentation, optimizer). % peak: against the measured f32 matmul peak."
    )
    if args.json:
        payload = {
            "environment": env,
            "args": vars(args),
            "matmul": matmul,
            "peaks": peaks,
            "results": results,
        }
        write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
