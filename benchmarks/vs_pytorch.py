"""Client-step speed: the engine against a plain PyTorch loop of the same model, step and batch.

Issue 14. Both contenders train the reference's SimpleCNN (3×32×32 input, 92,626 parameters)
with batch `--batch-size` (64) and SGD(lr 0.01, momentum 0.9, weight decay 1e-5):

- `fedavg`: forward + cross-entropy backward + SGD step;
- `spmc`: SPMC's client step (spmc_reference.md §3): student forward, teacher forward (no
  gradient), G_g = ∇ soft-label CE towards the teacher (backward 1), G_d = ∇ CE (backward 2),
  per-tensor projection of G_d off G_g where ⟨G_d, G_g⟩ < 0 (λ = 1), SGD step.

The engine figure is one client's jitted local training (`Simulation.local_train`, the
`lax.scan` over its steps that every round runs per client), on synthetic MNIST-kind images;
it also includes what PyTorch's loop does not: the batch gather, augmentation (random crop +
flip) and normalisation, so the ratio is conservative for the engine. The PyTorch loop reads
ready-made float32 NCHW batches from memory (no data loader).

Timing: both warmed up (the engine's compile time reported separately), then A B A B …
`--repeats` times in ONE process, each sample = `--steps` steps; the figure is the median
steps/s, with min/max as the spread; `ratio` = engine / PyTorch steps per second (> 1: the
engine is faster). Threads: PyTorch `torch.set_num_threads(--threads)`; XLA:CPU uses the
process's allowed cores (its thread pool size is not settable per call).

    python benchmarks/vs_pytorch.py --json runs/vs_pytorch.json
    python benchmarks/vs_pytorch.py --defense fedavg --steps 5 --repeats 3

Needs PyTorch (`pip install -e .[bench]`, the CPU wheel). Nothing here asserts anything about
time.
"""

from __future__ import annotations

import argparse
import os
import platform
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
from spmc_jax.engine import first_block

DEFENSES = ("fedavg", "spmc")


def import_torch():
    """Import torch lazily, with a clear message when it is absent (it is never a runtime
    dependency of spmc_jax)."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - exercised only without torch
        raise SystemExit(
            "benchmarks/vs_pytorch.py needs PyTorch: pip install -e '.[bench]' "
            "(or pip install torch==2.13.0, the CPU wheel)"
        ) from e
    return torch


def project_conflicting_(torch: Any, params: list, g_g: list) -> None:
    """The reference's per-tensor projection, in place on `p.grad` (spmc_reference.md §3.2-3.3).

    Where a tensor's data gradient conflicts with the guidance gradient (negative cosine), its
    component along the guidance gradient is removed.
    """
    with torch.no_grad():
        for p, gg in zip(params, g_g, strict=True):
            gd = p.grad
            dot = (gd * gg).sum()
            norms = gg.norm() * gd.norm()
            if norms > 0 and dot / norms < 0:
                gd.sub_((dot / (gg * gg).sum()) * gg)


def torch_simple_cnn(torch):
    """The reference's SimpleCNN (RF/Backbones/SimpleCNN.py, spmc_reference.md §1.3)."""
    nn = torch.nn

    class SimpleCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 6, 5)
            self.conv2 = nn.Conv2d(6, 16, 5)
            self.pool = nn.MaxPool2d(2)
            self.fc1 = nn.Linear(400, 120)
            self.fc2 = nn.Linear(120, 84)
            self.l1 = nn.Linear(84, 84)
            self.l2 = nn.Linear(84, 256)
            self.cls = nn.Linear(256, 10)

        def forward(self, x):
            f = torch.nn.functional
            x = self.pool(f.relu(self.conv1(x)))
            x = self.pool(f.relu(self.conv2(x)))
            x = torch.flatten(x, 1)
            x = f.relu(self.fc1(x))
            x = f.relu(self.fc2(x))
            x = f.relu(self.l1(x))
            return self.cls(self.l2(x))

    return SimpleCNN()


def torch_loop(torch, defense: str, batch_size: int, n_batches: int, seed: int = 0):
    """`run(steps)`: `steps` SGD steps of a PyTorch loop over `n_batches` in-memory batches."""
    torch.manual_seed(seed)
    model = torch_simple_cnn(torch)
    teacher = torch_simple_cnn(torch)
    teacher.load_state_dict(model.state_dict())
    for p in teacher.parameters():  # a different model than the student (round > 0)
        p.data.add_(0.01 * torch.randn_like(p))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-5)
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n_batches, batch_size, 3, 32, 32, generator=g)
    ys = torch.randint(0, 10, (n_batches, batch_size), generator=g)
    ce = torch.nn.functional.cross_entropy
    params = list(model.parameters())

    def fedavg_step(x, y):
        opt.zero_grad()
        ce(model(x), y).backward()
        opt.step()

    def spmc_step(x, y):
        # RF/Optims/AlignedGradient.py as in spmc_reference.md §3.2-3.3.
        opt.zero_grad()
        s = model(x)
        with torch.no_grad():
            t = torch.softmax(teacher(x), dim=1)
        guide = -(t * torch.log_softmax(s, dim=1)).sum(1).mean()
        guide.backward(retain_graph=True)
        g_g = [p.grad.clone() for p in params]
        opt.zero_grad()
        ce(s, y).backward()
        project_conflicting_(torch, params, g_g)
        opt.step()

    step = fedavg_step if defense == "fedavg" else spmc_step

    def run(steps: int) -> None:
        for i in range(steps):
            step(xs[i % n_batches], ys[i % n_batches])

    return run


def engine_client(defense: str, steps: int, batch_size: int, conv_impl: str = "auto"):
    """`(run, first_call_s, conv_impl)`: `run()` = one client's jitted local training of
    `steps` SGD steps (1 local epoch of `steps` full batches) in a real `Simulation`."""
    args = argparse.Namespace(
        samples=steps * batch_size, batch_size=batch_size, local_epochs=1, client_chunk=None
    )
    sim = round_throughput.bench_simulation(
        2, defense, args, conv_impl=conv_impl, model="simple_cnn"
    )
    state = sim.init_state()
    data = sim.data
    train = first_block(data.train)
    variables = sim.flat.unravel(state.global_flat)
    # A teacher different from the student, as in every round after the first.
    teacher = jax.tree.map(lambda a: a * 1.01, variables)
    keys = jax.random.split(jax.random.key(1), 2)
    task = ClientTask(data.idx[0], data.sizes[0], data.malicious[0], data.rank[0], keys[0])
    local = sim.jit(sim.local_train)
    attack_on = jnp.asarray(True)

    def run() -> Any:
        return jax.block_until_ready(local(variables, teacher, train, task, attack_on).loss)

    t0 = time.perf_counter()
    res = local(variables, teacher, train, task, attack_on)
    jax.block_until_ready(res.loss)
    first = time.perf_counter() - t0
    if int(res.steps) != steps:
        raise RuntimeError(f"engine ran {int(res.steps)} steps, expected {steps}")
    return run, first, sim.conv_impl


def engine_round(defense: str, steps: int, batch_size: int, clients: int, conv_impl: str = "auto"):
    """`(run, first_call_s, conv_impl, devices)`: `run()` = one jitted engine round of
    `clients` clients with `steps` SGD steps each (training and aggregation, as every round
    runs), the clients sharded over all JAX devices (`--cpu-devices`: one client per core)."""
    args = argparse.Namespace(
        samples=steps * batch_size, batch_size=batch_size, local_epochs=1, client_chunk=None
    )
    sim = round_throughput.bench_simulation(
        clients, defense, args, conv_impl=conv_impl, model="simple_cnn"
    )
    state = sim.init_state()
    r0 = jnp.asarray(0, jnp.int32)

    def run() -> Any:
        return jax.block_until_ready(sim.run_rounds(state, sim.data, 1, r0)[0].global_flat)

    t0 = time.perf_counter()
    run()
    return run, time.perf_counter() - t0, sim.conv_impl, 1 if sim.mesh is None else sim.mesh.size


def _stats(rates: list[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
        "samples": rates,
    }


def bench(defense: str, args: argparse.Namespace, torch) -> dict[str, Any]:
    """Interleaved timing of one defense's step: engine, PyTorch at each thread count, again."""
    eng, first, impl = engine_client(defense, args.steps, args.batch_size, args.conv_impl)
    engines = {"engine": (eng, args.steps)}
    extra: dict[str, Any] = {}
    if args.clients:
        rnd, r_first, _, n_dev = engine_round(
            defense, args.steps, args.batch_size, args.clients, args.conv_impl
        )
        engines["engine_round"] = (rnd, args.clients * args.steps)
        extra = {"round_clients": args.clients, "round_devices": n_dev, "round_compile_s": r_first}
    pt = torch_loop(torch, defense, args.batch_size, n_batches=min(args.steps, 8))
    for th in args.threads:  # warm-up (oneDNN primitive caches, thread pools)
        torch.set_num_threads(th)
        pt(2)
    eng()
    names = [f"pytorch_{th}t" for th in args.threads]
    rates: dict[str, list[float]] = {n: [] for n in [*engines, *names]}
    ratios = {e: {n: [] for n in names} for e in engines}
    best: dict[str, list[float]] = {e: [] for e in engines}
    for _ in range(args.repeats):
        for e, (fn, n_steps) in engines.items():
            t0 = time.perf_counter()
            fn()
            rates[e].append(n_steps / (time.perf_counter() - t0))
        for th, n in zip(args.threads, names, strict=True):
            torch.set_num_threads(th)
            t0 = time.perf_counter()
            pt(args.steps)
            rates[n].append(args.steps / (time.perf_counter() - t0))
        for e in engines:
            for n in names:
                ratios[e][n].append(rates[e][-1] / rates[n][-1])
            best[e].append(min(ratios[e][n][-1] for n in names))
    out = {
        "defense": defense,
        "steps_per_sample": args.steps,
        "batch_size": args.batch_size,
        "conv_impl": impl,
        "engine_compile_s": first,
        **extra,
        **{name: _stats(r) for name, r in rates.items()},
        # ratio = engine steps/s over PyTorch steps/s of the same sample (> 1: engine faster).
        "ratio": {name: _stats(r) for name, r in ratios["engine"].items()},
        "ratio_vs_best_pytorch": _stats(best["engine"]),
        "loadavg_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if "engine_round" in engines:
        out["round_ratio"] = {name: _stats(r) for name, r in ratios["engine_round"].items()}
        out["round_ratio_vs_best_pytorch"] = _stats(best["engine_round"])
    return out


def _fmt(st: dict[str, Any], digits: int = 1) -> str:
    """median [min, max]"""
    return f"{st['median']:.{digits}f} [{st['min']:.{digits}f}, {st['max']:.{digits}f}]"


def environment(torch, threads: list[int]) -> dict[str, Any]:
    import jaxlib

    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "torch": torch.__version__,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "torch_threads": threads,
        "torch_config": torch.__config__.parallel_info(),
        "cores_allowed": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_count": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--defense", nargs="+", default=list(DEFENSES), choices=DEFENSES)
    p.add_argument("--steps", type=int, default=20, help="SGD steps per timed sample")
    p.add_argument("--repeats", type=int, default=7, help="interleaved A/B samples")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[2, 1],
        help="PyTorch intra-op thread counts, each timed in the interleave (the ratio against "
        "the fastest of them per sample is `ratio_vs_best_pytorch`)",
    )
    p.add_argument("--conv-impl", default="auto", choices=("auto", "lax", "patches"))
    p.add_argument(
        "--clients",
        type=int,
        default=0,
        help="also time the engine's jitted round of this many clients (client-steps/s, "
        "training + aggregation; clients sharded over the JAX devices); 0: off",
    )
    p.add_argument(
        "--cpu-devices",
        type=int,
        default=None,
        help="split the CPU into N JAX devices (one client per core for --clients); PyTorch "
        "is unaffected",
    )
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    for name in ("steps", "repeats", "batch_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}; accepted: >= 1")
    if min(args.threads) < 1:
        raise SystemExit(f"--threads {args.threads}; accepted: integers >= 1")
    if args.clients < 0:
        raise SystemExit(f"--clients {args.clients}; accepted: 0 (off) or >= 1")
    if args.cpu_devices is not None:
        from spmc_jax.sharding import set_cpu_devices

        set_cpu_devices(args.cpu_devices)  # before the first backend use below
    torch = import_torch()
    env = environment(torch, args.threads)
    print(
        f"jax {env['jax']} (jaxlib {env['jaxlib']}) on {env['backend']} ({env['device_kind']}), "
        f"torch {env['torch']} with {args.threads} threads ({torch.get_num_interop_threads()} "
        f"inter-op); {env['cores_allowed']} cores "
        f"allowed of {env['cpu_count']}; {env['platform']}; load {env['loadavg']}"
    )
    rows = []
    for d in args.defense:
        r = bench(d, args, torch)
        rows.append(r)
        parts = [f"{d:>7}: engine {_fmt(r['engine'])} steps/s"]
        for th in args.threads:
            n = f"pytorch_{th}t"
            parts.append(f"pytorch {th} thr {_fmt(r[n])} (ratio {_fmt(r['ratio'][n], 2)})")
        parts.append(f"ratio vs best pytorch {_fmt(r['ratio_vs_best_pytorch'], 2)}")
        if "engine_round" in r:
            parts.append(
                f"engine round ({r['round_clients']} clients on {r['round_devices']} "
                f"device(s)) {_fmt(r['engine_round'])} client-steps/s, ratio vs best pytorch "
                f"{_fmt(r['round_ratio_vs_best_pytorch'], 2)}"
            )
        print(
            "; ".join(parts) + f" [compile {r['engine_compile_s']:.1f} s, {r['conv_impl']}]",
            flush=True,
        )
    if args.json:
        round_throughput.write_json(
            args.json, {"environment": env, "args": vars(args), "rows": rows}
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
