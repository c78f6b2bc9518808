"""A full paper-protocol round on CPU: the engine against a reference-shaped PyTorch loop.

Issue 14, second goal. Both contenders run one communication round of the Table 2 protocol
(spmc_reference.md §1): 10 clients of the Dirichlet(0.5) MNIST split (the engine's own
partition, so both train on the same client sizes), SimpleCNN, batch 64 with `drop_last`,
SGD(lr 0.01, momentum 0.9, wd 1e-5) re-created per client, FedAvg clients 1 local epoch,
SPMC clients 10, no attack (`--attack none`: the backdoor stamp is a negligible cost on both
sides and would need a second implementation here). `--gamma G` runs the engine's round with
the base backdoor on a fraction G of the clients (PyTorch still without): their poisoned
batches have an unequal channel 0, so they take the full stem convolution instead of the
one-channel fold (`layers.FOLD_EQUAL_CHANNELS`) the clean grayscale batches take;
`--compare-no-fold` also times the engine with the fold off, in the same interleave;
`--compare-no-dot-fusion` the engine compiled without XLA:CPU's YNNPACK dot fusion
(`--cpu-dot-fusion off`, spmc_jax/compile_options.py).

- Engine: `Simulation.run_rounds(state, data, 1, r)`, the jitted round (`python -m
  spmc_jax.train --protocol paper` runs the same function), training + aggregation, no
  evaluation. Its compile time (trace + lower + XLA compile, ahead of time) is reported apart.
- PyTorch (the reference's loop shape, §1.2-1.5): the clients one after another, each from
  the global model with a fresh optimiser; per epoch a fresh random order of the client's
  indices (SubsetRandomSampler) and per batch of 64: gather the uint8 32×32 images from an
  in-memory tensor, RandomCrop(32, padding=4) per sample, /255, 1 → 3 channels, Normalize
  (the reference's MNIST train transform, no flip), then the step. FedAvg: forward + CE
  backward + SGD. SPMC (§3): student forward, teacher forward (no grad), G_g = ∇ soft-label
  CE (backward 1), G_d = ∇ CE (backward 2), per-tensor projection, SGD. The aggregation is
  the uniform mean (`Equal`, §4) for FedAvg and SPMD's leave-one-out cosine softmax (§2) for
  SPMC. The images are pre-resized to 32×32 once (a tidy loop would; the reference resizes
  with PIL per sample and epoch, the data-loader cost the issue measured).

SPMC's round is 10 epochs (~8,400 steps, minutes per contender on 2 cores): `--spmc-epochs`
(default 1) runs a fixed fraction of it on both sides, `round_fraction` in the JSON; the
round is linear in the epochs (the same steps again), so the ratio carries over.

Timing: A B A B … `--repeats` times in ONE process (engine, PyTorch at each `--threads`);
median [min, max] seconds per round; `ratio` = PyTorch s / engine s (> 1: engine faster).

    python benchmarks/round_vs_pytorch.py --json runs/round_vs_pytorch.json
    python benchmarks/round_vs_pytorch.py --defense fedavg --repeats 3 --threads 1

Needs PyTorch (`pip install -e .[bench]`, the CPU wheel) and MNIST (`python -m spmc_jax.data
fetch mnist`), or `--synthetic N` (N synthetic MNIST-kind images, for smoke tests).
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sibling benchmarks

import round_throughput
import vs_pytorch

from spmc_jax.config import Config
from spmc_jax.data.pipeline import pil_bilinear_resize
from spmc_jax.data.types import MEAN, STD
from spmc_jax.engine import Simulation, make_plan
from spmc_jax.models import layers

DEFENSES = ("fedavg", "spmc")
PAPER_EPOCHS = {"fedavg": 1, "spmc": 10}  # spmc_reference.md §1.4


def build_simulation(
    defense: str,
    args: argparse.Namespace,
    ds: Any,
    balance: bool = True,
    dot_fusion: str = "auto",
) -> Simulation:
    """The paper-protocol Simulation of `defense` (SPMC with `--spmc-epochs` local epochs);
    `balance`: `Config.balance_clients` (clients placed on devices by balanced steps);
    `dot_fusion`: `Config.cpu_dot_fusion`."""
    cfg = Config(
        balance_clients=balance,
        cpu_dot_fusion=dot_fusion,
        dataset="mnist",
        clients=args.clients,
        rounds=1,
        protocol="paper",
        local_epochs=args.spmc_epochs if defense == "spmc" else None,
        batch_size=args.batch_size,
        defense=defense,
        attack="base" if args.gamma > 0 else "none",
        gamma=args.gamma,
        seed=args.seed,
    )
    return Simulation(cfg, ds, make_plan(cfg, ds))


def engine_round(sim: Simulation, fold: bool = True):
    """`(run, compile_s)`: `run()` = one jitted round from the initial state; `compile_s` =
    the round's trace + lower + XLA compile (ahead of time, so not mixed with a round).
    `fold`: `layers.FOLD_EQUAL_CHANNELS` while the round is traced."""
    state = sim.init_state()
    data = sim.data
    r = jnp.asarray(1, jnp.int32)  # round 2 (0-based 1): SPMC teachers are in use
    saved, layers.FOLD_EQUAL_CHANNELS = layers.FOLD_EQUAL_CHANNELS, fold
    try:
        t0 = time.perf_counter()
        compiled = sim.run_rounds.lower(state, data, 1, r).compile()
        compile_s = time.perf_counter() - t0
    finally:
        layers.FOLD_EQUAL_CHANNELS = saved

    def run() -> Any:
        return jax.block_until_ready(compiled(state, data, r)[0].global_flat)

    run()  # warm-up (first-call allocations)
    return run, compile_s


def torch_round(torch, sim: Simulation, defense: str, epochs: int, seed: int = 0):
    """`run()` = one reference-shaped PyTorch round over `sim`'s clients and images."""
    nn_f = torch.nn.functional
    torch.manual_seed(seed)
    model = vs_pytorch.torch_simple_cnn(torch)
    teacher = vs_pytorch.torch_simple_cnn(torch)
    global_sd = {k: v.clone() for k, v in model.state_dict().items()}
    # Per-client teachers (the marginal models of §3.1), here the global model perturbed:
    # a different network than the student, as in every round after the first.
    g = torch.Generator().manual_seed(seed)
    teacher_sd = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in global_sd.items()}
    # The engine's partition and its images, resized to 32x32 once (global indices, so this
    # also holds when the engine splits the clients over several CPU devices).
    part = sim.plan.partition
    x = np.asarray(sim.ds.x_train)
    resize = jax.jit(pil_bilinear_resize)
    x32 = np.concatenate([np.asarray(resize(x[i : i + 8192])) for i in range(0, len(x), 8192)])
    images = torch.from_numpy(x32[..., 0].copy())  # (N, 32, 32) uint8
    labels = torch.from_numpy(np.asarray(sim.ds.y_train).astype(np.int64))
    sizes = np.asarray(part.sizes)
    idx = [
        torch.from_numpy(part.indices[c, : sizes[c]].astype(np.int64)) for c in range(len(sizes))
    ]
    bs = sim.cfg.batch_size
    mean, std = float(MEAN["mnist"][0]), float(STD["mnist"][0])
    ar = torch.arange(32)
    params = list(model.parameters())

    def augment(x_u8):
        # RandomCrop(32, padding=4) per sample -> ToTensor -> repeat x3 -> Normalize.
        b = x_u8.shape[0]
        padded = nn_f.pad(x_u8, (4, 4, 4, 4))
        r0 = torch.randint(0, 9, (b,), generator=g)
        c0 = torch.randint(0, 9, (b,), generator=g)
        rows = (r0[:, None] + ar)[:, :, None]
        cols = (c0[:, None] + ar)[:, None, :]
        crop = padded[torch.arange(b)[:, None, None], rows, cols]
        x = (crop.float() / 255.0 - mean) / std
        return x[:, None].repeat(1, 3, 1, 1)

    def fedavg_step(opt, x, y):
        opt.zero_grad()
        nn_f.cross_entropy(model(x), y).backward()
        opt.step()

    def spmc_step(opt, x, y):
        # RF/Optims/AlignedGradient.py (spmc_reference.md §3.2-3.3), as in vs_pytorch.py.
        opt.zero_grad()
        s = model(x)
        with torch.no_grad():
            t = torch.softmax(teacher(x), dim=1)
        (-(t * torch.log_softmax(s, dim=1)).sum(1).mean()).backward(retain_graph=True)
        g_g = [p.grad.clone() for p in params]
        opt.zero_grad()
        nn_f.cross_entropy(s, y).backward()
        vs_pytorch.project_conflicting_(torch, params, g_g)
        opt.step()

    step = fedavg_step if defense == "fedavg" else spmc_step

    def flat() -> Any:
        return torch.cat([p.detach().reshape(-1) for p in params])

    def run(limit: int | None = None) -> Any:
        """One round; `limit`: stop after that many steps (warm-up), returning None."""
        rows, done = [], 0
        for c in torch.randperm(len(sizes), generator=g).tolist():  # random client order
            model.load_state_dict(global_sd)
            if defense == "spmc":
                teacher.load_state_dict(teacher_sd)
            opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-5)
            for _ in range(epochs):
                order = idx[c][torch.randperm(len(idx[c]), generator=g)]
                for b in range(len(order) // bs):  # drop_last
                    sel = order[b * bs : (b + 1) * bs]
                    step(opt, augment(images[sel]), labels[sel])
                    done += 1
                    if limit is not None and done >= limit:
                        return None
            rows.append(flat())
        w = torch.stack(rows)
        if defense == "fedavg":  # Equal: the uniform mean (§4)
            return w.mean(0)
        # SPMD (§2): leave-one-out mean, cosine, softmax, weighted sum.
        loo = (w.sum(0, keepdim=True) - w) / (len(rows) - 1)
        cos = (w * loo).sum(1) / (w.norm(dim=1) * loo.norm(dim=1) + 1e-5)
        alpha = torch.softmax(cos, 0)
        return alpha @ w

    return run


def _stats(xs: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "samples": xs}


def bench(defense: str, args: argparse.Namespace, ds: Any, torch) -> dict[str, Any]:
    """Interleaved round timing of one defense: engine, PyTorch at each thread count, again."""
    sim = build_simulation(defense, args, ds)
    epochs = sim.plan.epochs
    sizes = np.asarray(sim.plan.partition.sizes)
    run_e, compile_s = engine_round(sim)
    # Other engine builds of the same round, timed in the same interleave (name -> run).
    others = {}
    if args.compare_contiguous:  # clients on devices in contiguous id blocks
        sim_c = build_simulation(defense, args, ds, balance=False)
        others["engine_contiguous"] = engine_round(sim_c)[0]
    if args.compare_no_fold:  # the stem always convolving all 3 channels
        # A Simulation of its own: a jitted function reuses its trace, whatever the flag.
        others["engine_no_fold"] = engine_round(build_simulation(defense, args, ds), fold=False)[0]
    if args.compare_no_dot_fusion:  # XLA:CPU's own loops around each YNNPACK matmul
        sim_f = build_simulation(defense, args, ds, dot_fusion="off")
        others["engine_no_dot_fusion"] = engine_round(sim_f)[0]
    run_t = torch_round(torch, sim, defense, epochs, args.seed)
    secs: dict[str, list[float]] = {"engine": []} | {f"pytorch_{t}t": [] for t in args.threads}
    ratios: dict[str, list[float]] = {f"pytorch_{t}t": [] for t in args.threads}
    for name in others:
        secs[name], ratios[name] = [], []
    for th in args.threads:  # warm-up (oneDNN primitive caches, thread pools)
        torch.set_num_threads(th)
        run_t(limit=3)
    load_before = os.getloadavg()
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        run_e()
        e = time.perf_counter() - t0
        secs["engine"].append(e)
        for name, run_o in others.items():
            t0 = time.perf_counter()
            run_o()
            o = time.perf_counter() - t0
            secs[name].append(o)
            ratios[name].append(o / e)
        for th in args.threads:
            torch.set_num_threads(th)
            t0 = time.perf_counter()
            run_t()
            t = time.perf_counter() - t0
            secs[f"pytorch_{th}t"].append(t)
            ratios[f"pytorch_{th}t"].append(t / e)
        print(
            f"  {defense}: engine {e:.2f} s, "
            + "".join(f"{_LABELS[n]} {secs[n][-1]:.2f} s, " for n in others)
            + ", ".join(
                f"pytorch {th} thr {secs[f'pytorch_{th}t'][-1]:.2f} s" for th in args.threads
            ),
            flush=True,
        )
    real_steps = int((sizes // args.batch_size).sum()) * epochs
    return {
        "defense": defense,
        "local_epochs": epochs,
        "paper_local_epochs": PAPER_EPOCHS[defense],
        "round_fraction": epochs / PAPER_EPOCHS[defense],
        "client_sizes": sizes.tolist(),
        "client_steps": real_steps,
        "engine_scan_steps": int(sim.plan.steps_per_epoch) * epochs * len(sizes),
        "conv_impl": sim.conv_impl,
        "client_chunk": sim.client_chunk,
        "gamma": args.gamma,
        "fold_equal_channels": layers.FOLD_EQUAL_CHANNELS,
        "cpu_dot_fusion": sim.cpu_dot_fusion,
        "client_devices": 1 if sim.mesh is None else int(sim.mesh.size),
        "engine_compile_s": compile_s,
        "compilation_cache": jax.config.jax_compilation_cache_dir,
        **{name: _stats(v) for name, v in secs.items()},
        # PyTorch seconds over engine seconds of the same sample (> 1: the engine is faster).
        "ratio": {name: _stats(v) for name, v in ratios.items()},
        "ratio_vs_best_pytorch": _stats(
            [
                min(ratios[n][i] for n in ratios if n.startswith("pytorch"))
                for i in range(args.repeats)
            ]
        ),
        "client_order": None if sim.train_order is None else sim.train_order.tolist(),
        "device_steps": _device_steps(sim),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }


def _device_steps(sim: Simulation) -> dict[str, list[int]] | None:
    """Each device's summed client steps: as placed (`balanced`) and in id blocks."""
    placement = sim.device_placement()
    if placement is None:
        return None
    steps = np.asarray(placement["client_steps"])
    return {
        "balanced": placement["steps"],
        "contiguous": steps.reshape(len(placement["steps"]), -1).sum(axis=1).tolist(),
    }


# The other engine builds' names in the printed lines.
_LABELS = {
    "engine_contiguous": "contiguous",
    "engine_no_fold": "no fold",
    "engine_no_dot_fusion": "no dot fusion",
}


def _fmt(st: dict[str, Any], digits: int = 2) -> str:
    return f"{st['median']:.{digits}f} [{st['min']:.{digits}f}, {st['max']:.{digits}f}]"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--defense", nargs="+", default=list(DEFENSES), choices=DEFENSES)
    p.add_argument("--repeats", type=int, default=3, help="interleaved A/B samples")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument(
        "--spmc-epochs",
        type=int,
        default=1,
        help="SPMC local epochs timed (the paper's round runs 10; the JSON's round_fraction)",
    )
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--synthetic",
        type=int,
        default=None,
        metavar="N",
        help="N synthetic MNIST-kind train images instead of MNIST (smoke tests)",
    )
    p.add_argument(
        "--cpu-devices",
        type=int,
        default=None,
        metavar="N",
        help="split the CPU into N JAX devices, the clients sharded over them (as the CLI's "
        "--cpu-devices); PyTorch is unaffected",
    )
    p.add_argument(
        "--compare-contiguous",
        action="store_true",
        help="also time the engine with --no-balance-clients (clients on devices in "
        "contiguous id blocks) in the same interleave; ratio = contiguous s / balanced s",
    )
    p.add_argument(
        "--compare-no-fold",
        action="store_true",
        help="also time the engine with layers.FOLD_EQUAL_CHANNELS off (the stem convolving "
        "all 3 equal channels) in the same interleave; ratio = no-fold s / engine s",
    )
    p.add_argument(
        "--compare-no-dot-fusion",
        action="store_true",
        help="also time the engine compiled with --cpu-dot-fusion off (no YNNPACK dot fusion) "
        "in the same interleave; ratio = no-fusion s / engine s",
    )
    p.add_argument(
        "--gamma",
        type=float,
        default=0.0,
        help="the engine runs the base backdoor on this fraction of clients (their poisoned "
        "batches take the full stem convolution); PyTorch runs no attack. Default 0: none",
    )
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.cpu_devices is not None:
        from spmc_jax.sharding import set_cpu_devices

        set_cpu_devices(args.cpu_devices)  # before the first backend use below
    for name in ("repeats", "spmc_epochs", "clients", "batch_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}; accepted: >= 1")
    if not 0.0 <= args.gamma < 1.0:
        raise SystemExit(f"--gamma {args.gamma}; accepted: 0 <= gamma < 1")
    if min(args.threads) < 1:
        raise SystemExit(f"--threads {args.threads}; accepted: integers >= 1")
    if args.spmc_epochs > PAPER_EPOCHS["spmc"]:
        raise SystemExit(f"--spmc-epochs {args.spmc_epochs}; accepted: 1..{PAPER_EPOCHS['spmc']}")
    torch = vs_pytorch.import_torch()
    if args.synthetic is not None:
        ds = round_throughput.synthetic_dataset(args.synthetic)
    else:
        from spmc_jax.data import load_dataset

        ds = load_dataset("mnist", fetch=False)
    env = vs_pytorch.environment(torch, args.threads)
    print(
        f"jax {env['jax']} on {env['backend']}, torch {env['torch']} threads {args.threads}; "
        f"{env['cores_allowed']} cores allowed of {env['cpu_count']}; load {env['loadavg']}",
        flush=True,
    )
    rows = []
    for d in args.defense:
        r = bench(d, args, ds, torch)
        rows.append(r)
        parts = [f"{d:>7} ({r['local_epochs']} epochs, {r['client_steps']} steps)"]
        parts.append(f"engine {_fmt(r['engine'])} s")
        for n, label in _LABELS.items():
            if n in r:
                parts.append(f"{label} {_fmt(r[n])} s (ratio {_fmt(r['ratio'][n])})")
        for th in args.threads:
            n = f"pytorch_{th}t"
            parts.append(f"pytorch {th} thr {_fmt(r[n])} s (ratio {_fmt(r['ratio'][n])})")
        print(
            "; ".join(parts) + f" [compile {r['engine_compile_s']:.1f} s; load "
            f"{r['loadavg_before'][0]:.1f} -> {r['loadavg_after'][0]:.1f}]",
            flush=True,
        )
    if args.json:
        round_throughput.write_json(
            args.json, {"environment": env, "args": vars(args), "rows": rows}
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
