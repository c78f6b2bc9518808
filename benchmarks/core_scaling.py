"""Core scaling: how much of the CPU one client's training step already uses.

Runs `round_throughput.py` once per core count c = 1..C (the process pinned to c cores) on
the same K clients and reports, for the sequential per-client loop and the engine, the time
per client-step and the speed-up S(c) = t(1 core) / t(c cores).

Why: on a CPU the vectorized engine can only beat the sequential loop by putting cores to
work that the loop leaves idle (training different clients at the same time instead of one
client on all cores); it cannot make a core do one client's arithmetic faster (batching
clients does not enlarge any matrix product: every client has its own weights). If one
client's step already runs S(C) times faster on C cores than on one, no client-parallel
schedule can beat the loop by more than C / S(C). The script prints that bound.

    python benchmarks/core_scaling.py --json runs/cores.json
    python benchmarks/core_scaling.py --clients 10 --defense spmc

Nothing here asserts anything about time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from round_throughput import write_json  # noqa: E402

from spmc_jax.config import MODELS  # noqa: E402


def run_pinned(cores: int, args: argparse.Namespace) -> dict[str, Any]:
    """One round_throughput.py run pinned to `cores` cores; its JSON row."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        cmd = [
            sys.executable,
            os.path.join(HERE, "round_throughput.py"),
            "--cores", str(cores),
            "--clients", str(args.clients),
            "--defense", args.defense,
            "--model", args.model,
            "--seq-max", str(args.clients),
            "--vmap-max", "0",
            "--repeats", str(args.repeats),
            "--json", out,
        ]  # fmt: skip
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        with open(out) as fh:
            res = json.load(fh)
    return {"environment": res["environment"], "row": res["rows"][0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--defense", default="fedavg")
    p.add_argument("--model", default="simple_cnn", choices=MODELS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-cores", type=int, default=None, help="default: all allowed cores")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    allowed = len(os.sched_getaffinity(0))
    top = min(args.max_cores or allowed, allowed)
    print(
        f"core scaling: {args.clients} clients, {args.defense}, {args.model} batch 64 "
        f"(round_throughput.py defaults), 1..{top} of {allowed} allowed cores, "
        f"load {os.getloadavg()}"
    )
    print(f"{'cores':>5} | {'seq_client ms/step':>18} {'S':>5} | {'engine ms/step':>14} {'S':>5}")
    runs, base = [], None
    for c in range(1, top + 1):
        r = run_pinned(c, args)
        row = r["row"]
        steps = row["client_steps"]
        seq = row["seq_client"]["wall_s"] / steps
        eng = row["engine"]["wall_s"] / steps
        base = base or (seq, eng)
        item = {
            "cores": c,
            "seq_client_s_per_step": seq,
            "engine_s_per_step": eng,
            "speedup_seq_client": base[0] / seq,
            "speedup_engine": base[1] / eng,
            "bound_client_parallel_vs_loop": c / (base[0] / seq),
            "device": r["environment"]["device_kind"],
            "model": row["model"],
        }
        runs.append(item)
        print(
            f"{c:>5} | {1e3 * seq:>18.2f} {item['speedup_seq_client']:>5.2f} | "
            f"{1e3 * eng:>14.2f} {item['speedup_engine']:>5.2f}",
            flush=True,
        )
    last = runs[-1]
    print(
        f"one client's step on {last['cores']} cores runs {last['speedup_seq_client']:.2f}x its "
        f"1-core speed, so training clients in parallel can beat the sequential loop by at most "
        f"{last['bound_client_parallel_vs_loop']:.2f}x on this machine"
    )
    if args.json:
        date = time.strftime("%Y-%m-%d %H:%M:%S")
        write_json(args.json, {"args": vars(args), "date": date, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
