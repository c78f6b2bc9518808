"""Sweep throughput: cells per hour with federations batched on an axis vs one by one.

Runs the same cells (one defense, seeds 0..C-1, alternating γ 0.2/0.3) twice in one process:
one by one (`engine.run` per cell, as `--cell-batch 1`) and as one batch
(`batch.BatchedSimulation` + `run_batch`, as `--cell-batch C`), and reports for each

  wall_s          everything: build, compile, train, evaluate
  steady_round_s  seconds per round after the first block (compile excluded), summed over
                  the cells for one by one
  cells_per_hour  C / wall_s × 3600, and `steady_cells_per_hour` from steady_round_s

plus the largest |A| / |R| difference between the two (they must agree: same numbers up to
float32 summation order). JSON via --json.

    python benchmarks/sweep_throughput.py --cells 4 --defense fedavg spmc --json runs/tp.json
    python benchmarks/sweep_throughput.py --dataset mnist --real --subsample 6000 --cells 8

Nothing here asserts anything about time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from round_throughput import environment, write_json  # noqa: E402

from spmc_jax import batch as batch_lib  # noqa: E402
from spmc_jax.config import Config  # noqa: E402
from spmc_jax.data.types import Dataset  # noqa: E402
from spmc_jax.engine import make_plan, run  # noqa: E402


def _steady(hist: list[dict[str, Any]]) -> float | None:
    """Mean seconds per round after the first block (None: a single block)."""
    later = [h["seconds"] for h in hist[1:]]
    return sum(later) / len(later) if later else None


def measure(cfgs: list[Config], ds: Dataset) -> dict[str, Any]:
    """One by one, then batched, on the same cells; the row of `main`'s report."""
    plans = [make_plan(c, ds) for c in cfgs]
    t0 = time.perf_counter()
    alone = [run(c, ds).history for c in cfgs]
    alone_wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = batch_lib.run_batch(batch_lib.BatchedSimulation(cfgs, ds, plans))
    batch_wall = time.perf_counter() - t0
    n, rounds = len(cfgs), cfgs[0].rounds
    steady_alone = [_steady(h) for h in alone]
    steady_batch = _steady(res.histories[0])  # every federation's row has the batch's time
    diff = {
        k: max(
            abs(a[k] - b[k])
            for ha, hb in zip(alone, res.histories, strict=True)
            for a, b in zip(ha, hb, strict=True)
            if a[k] is not None
        )
        for k in ("A", "R")
    }

    def mode(wall: float, steady: float | None) -> dict[str, Any]:
        return {
            "wall_s": round(wall, 3),
            "cells_per_hour": round(n / wall * 3600, 1),
            "steady_round_s": None if steady is None else round(steady, 4),
            "steady_cells_per_hour": None if not steady else round(3600 / (steady * rounds) * n, 1),
        }

    one = mode(
        alone_wall,
        None if None in steady_alone else sum(s for s in steady_alone if s is not None),
    )
    both = mode(batch_wall, steady_batch)
    return {
        "defense": cfgs[0].defense,
        "cells": n,
        "rounds": rounds,
        "clients": cfgs[0].clients,
        "model": cfgs[0].model,
        "local_epochs": cfgs[0].epochs,
        "steps_per_epoch": [p.steps_per_epoch for p in plans],
        "one_by_one": one,
        "batched": both,
        "speedup_wall": round(alone_wall / batch_wall, 3),
        "speedup_steady": (
            round(one["steady_round_s"] / both["steady_round_s"], 3)
            if one["steady_round_s"] and both["steady_round_s"]
            else None
        ),
        "max_abs_diff_pct": diff,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="mnist", help="mnist, fashion_mnist or cifar10")
    p.add_argument("--real", action="store_true", help="the real dataset (default: synthetic)")
    p.add_argument("--subsample", type=int, default=2000, help="training images")
    p.add_argument("--n-test", type=int, default=500, help="test images")
    p.add_argument("--defense", nargs="+", default=["fedavg"])
    p.add_argument("--cells", type=int, default=4, help="cells C (seeds 0..C-1)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--model", default="simple_cnn")
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", help="write the report here")
    args = p.parse_args(argv)
    if args.cells < 1:
        raise SystemExit(f"--cells must be >= 1, got {args.cells}")
    if args.real:
        from spmc_jax.data import load_dataset

        ds = load_dataset(args.dataset, fetch=False, log=lambda s: None)
    else:
        from spmc_jax.data.synthetic import make_synthetic

        ds = make_synthetic(args.dataset, n_train=args.subsample, n_test=args.n_test, seed=0)
    from spmc_jax.sweep import _test_subset

    ds = _test_subset(ds, args.n_test)
    rows = []
    for defense in args.defense:
        base = Config(
            dataset=args.dataset,
            defense=defense,
            rounds=args.rounds,
            clients=args.clients,
            model=args.model,
            local_epochs=args.local_epochs,
            batch_size=args.batch_size,
            subsample=args.subsample if args.real else None,
            eval_batch=min(500, args.n_test),
        )
        cfgs = [base.replace(seed=s, gamma=(0.2, 0.3)[s % 2]) for s in range(args.cells)]
        row = measure(cfgs, ds)
        rows.append(row)
        print(
            f"{defense}: {args.cells} cells, one by one {row['one_by_one']['wall_s']:.1f} s "
            f"({row['one_by_one']['cells_per_hour']:.0f} cells/h), batched "
            f"{row['batched']['wall_s']:.1f} s ({row['batched']['cells_per_hour']:.0f} cells/h); "
            f"steady speed-up {row['speedup_steady']}, max |ΔA| {row['max_abs_diff_pct']['A']:.3g}"
        )
    report = {"environment": environment(), "args": vars(args), "rows": rows}
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
