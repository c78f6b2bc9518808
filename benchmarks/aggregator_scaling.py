"""Aggregator scaling: server-rule time per round against the client count n and model size d.

For every (n, d) cell and every rule named in --rules (registry names, default `spmc`):

- `<rule>`: the registered aggregator as the engine calls it,
  `get_aggregator(name, env, inputs_sanitized=True).aggregate` (the round has already
  replaced non-finite rows, so the rule skips its own (n, d) pass), jitted, on a random
  round (client models = a shared base of norm ~14 plus 1e-2 perturbations, the regime
  SPMC's cosines live in); the RoundContext is built from random data too.
- for `spmc` also `margin_contribution` (the O(n·d) closed form itself) and `naive_loo`:
  the same scores computed the naive way, n separate leave-one-out averages (lax.map over
  i, O(n²·d)), then the same softmax and weighted mean. `ratio` = naive / closed form.

Timing: AOT-compiled once (compile time reported separately), one warm-up call, then the
median of --repeats calls, each ended by block_until_ready. Cells are skipped, and the
output says so, when the compiled program's memory (XLA's own memory analysis: arguments,
outputs and temporaries) exceeds --mem-frac of the free memory, or when the estimated
time of a cell (warm-up + repeats) exceeds --naive-budget (naive_loo) / --rule-budget
(other rows). Estimates extrapolate from the largest measured cell of the same row,
as O(n²·d) for naive_loo and unknown registry rules and O(n·d) for the SPMC rows; the
first naive_loo cell is estimated as n times the closed form.

    python benchmarks/aggregator_scaling.py --quick --json runs/agg_quick.json
    python benchmarks/aggregator_scaling.py --n 10 100 1000 10000 --d 100000 1000000
    python benchmarks/aggregator_scaling.py --rules all --synthetic-proxy --n 10 100 --d 100000

Rules that need the server's proxy data are skipped unless --synthetic-proxy gives them a
cost-free stand-in (their rows then time only the rule's own math, as the JSON notes).

Nothing here asserts anything about time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spmc_jax import spmc
from spmc_jax.aggregators import REGISTRY, AggregatorEnv, RoundContext, get_aggregator

BN_FRACTION = 0.05  # the last 5% of coordinates play the BatchNorm statistics (not compared)
SPMC_ROWS = ("margin_contribution", "naive_loo")
LINEAR_ROWS = ("spmc", "margin_contribution")


# --------------------------------------------------------------------------- environment


def free_memory_bytes() -> tuple[int, str]:
    """Free memory of the default device (GPU/TPU: allocator stats; CPU: MemAvailable)."""
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0)), "device allocator"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "/proc/meminfo MemAvailable"
    except OSError:
        pass
    pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(pages), "sysconf available pages"


def param_mask(d: int) -> np.ndarray:
    mask = np.ones(d, bool)
    mask[d - int(d * BN_FRACTION) :] = False
    return mask


# ------------------------------------------------------------------------------- programs


class SyntheticProxy:
    """A cost-free stand-in for the server's proxy-set operations (`ProxyOps`).

    With it, rules that need proxy data time only their own server math; the real cost
    of evaluating/training a model on the proxy set is *not* included.
    """

    def loss_entropy(self, flat: jax.Array) -> tuple[jax.Array, jax.Array]:
        loss = 0.5 * jnp.mean(flat * flat)
        return loss, jnp.log(10.0) * jax.nn.sigmoid(jnp.mean(flat))

    def train(self, flat: jax.Array, key: jax.Array, epochs: int) -> jax.Array:
        return flat * (0.99**epochs) + 1e-3 * jax.random.normal(key, flat.shape, flat.dtype)


def make_data(n: int, d: int) -> Any:
    """A jitted generator key -> (client_flat, global_flat, n_samples) for one cell."""

    @jax.jit
    def gen(key):
        kb, kw, kg, kn = jax.random.split(key, 4)
        base = jax.random.normal(kb, (d,), jnp.float32)
        base = base * (14.0 / jnp.linalg.norm(base))
        w = base + 1e-2 * jax.random.normal(kw, (n, d), jnp.float32)
        g = base + 1e-2 * jax.random.normal(kg, (d,), jnp.float32)
        n_samples = jax.random.randint(kn, (n,), 100, 1000).astype(jnp.float32)
        return w, g, n_samples

    return gen


def naive_loo(mask: np.ndarray, temperature: float = 1.0) -> Callable:
    """SPMC's weights the naive way: n separate leave-one-out means (O(n²·d))."""
    cols = jnp.asarray(mask)
    hi = jax.lax.Precision.HIGHEST

    def run(w, g):
        n = w.shape[0]
        rows = jnp.arange(n)

        def score(i):
            # One leave-one-out average as a matrix-vector product (XLA:CPU's fastest
            # column reduction), so the baseline is not handicapped.
            others = jnp.where(rows == i, 0.0, 1.0 / (n - 1))
            gamma = jnp.matmul(others, w, precision=hi)
            x = jnp.where(cols, w[i], 0.0)
            y = jnp.where(cols, gamma, 0.0)
            return jnp.sum(x * y) / (jnp.linalg.norm(x) * jnp.linalg.norm(y) + spmc.COS_EPS)

        cos = jax.lax.map(score, rows)
        alpha = jax.nn.softmax(cos / temperature)
        return jnp.matmul(alpha, w, precision=hi), alpha

    return run


def programs(
    rule: str, n: int, d: int, gamma: float, synthetic_proxy: bool
) -> dict[str, tuple[Callable, str]]:
    """Row name -> (function of (w, g, n_samples, key), skip reason or '')."""
    mask = param_mask(d)
    out: dict[str, tuple[Callable, str]] = {}
    spec = REGISTRY.get(rule)
    if spec.needs_proxy and not synthetic_proxy:
        out[rule] = (lambda *a: None, "needs proxy data (try --synthetic-proxy)")
    else:
        env = AggregatorEnv(
            n_clients=n,
            num_malicious=math.floor(n * gamma),
            lr=0.01,
            rounds=50,
            param_mask=mask,
            total_clients=n,
            proxy=SyntheticProxy() if spec.needs_proxy else None,
        )
        # As the engine calls it: the round sanitised the client matrix once already.
        agg = get_aggregator(rule, env, inputs_sanitized=True)

        def run_rule(w, g, n_samples, key, agg=agg):
            ctx = RoundContext(
                global_flat=g,
                round=jnp.int32(0),
                key=key,
                n_samples=n_samples,
                valid=jnp.ones((n,), bool),
                client_ids=jnp.arange(n, dtype=jnp.int32),
            )
            new_global, _, info = agg.aggregate(w, agg.init(g), ctx)
            return new_global, info.client_weights

        out[rule] = (run_rule, "")
    if rule == "spmc":
        out["margin_contribution"] = (
            lambda w, g, n_samples, key: spmc.margin_contribution(w, mask),
            "",
        )
        naive = naive_loo(mask)
        out["naive_loo"] = (lambda w, g, n_samples, key: naive(w, g), "")
    return out


# ---------------------------------------------------------------------------------- timing


def memory_need(compiled: Any) -> int | None:
    try:
        ma = compiled.memory_analysis()
    except Exception:  # backends without the analysis
        return None
    if ma is None:
        return None
    return int(
        ma.argument_size_in_bytes
        + ma.output_size_in_bytes
        + ma.temp_size_in_bytes
        - ma.alias_size_in_bytes
    )


def time_calls(fn: Callable, args: tuple, repeats: int) -> list[float]:
    jax.block_until_ready(fn(*args))  # warm-up (not counted)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return times


def estimate(row: str, n: int, d: int, measured: dict, closed_form_s: float | None) -> float | None:
    """Per-call seconds extrapolated from the largest measured cell of `row`."""
    if row in measured:
        n0, d0, t0 = measured[row]
        p = 1 if row in LINEAR_ROWS else 2
        return t0 * (n / n0) ** p * (d / d0)
    if row == "naive_loo" and closed_form_s is not None:
        return closed_form_s * n
    return None


def run_cell(n, d, rules, args, budget_bytes, measured) -> list[dict]:
    rows_out = []
    key = jax.random.key(0)
    gen = make_data(n, d).lower(key).compile()
    # Memory of the generator itself (the matrix plus its random temporaries).
    gen_need = memory_need(gen) or 3 * n * d * 4
    matrix = n * d * 4
    plans = []
    for rule in rules:
        for row, (fn, reason) in programs(rule, n, d, args.gamma, args.synthetic_proxy).items():
            plans.append((rule, row, fn, reason))

    shapes = (
        jax.ShapeDtypeStruct((n, d), jnp.float32),
        jax.ShapeDtypeStruct((d,), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.float32),
        jax.eval_shape(lambda: key),
    )
    compiled_rows = []
    for rule, row, fn, reason in plans:
        rec = {"n": n, "d": d, "rule": rule, "row": row, "matrix_bytes": matrix}
        if REGISTRY.get(rule).needs_proxy and row == rule and not reason:
            rec["note"] = "synthetic proxy: excludes the proxy-set model cost"
        if reason:
            rec.update(status="skipped", reason=reason)
            rows_out.append(rec)
            continue
        t0 = time.perf_counter()
        try:
            compiled = jax.jit(fn).lower(*shapes).compile()
        except Exception as e:  # a rule that cannot run at this size (e.g. n too small)
            rec.update(status="skipped", reason=f"compile failed: {type(e).__name__}: {e}"[:200])
            rows_out.append(rec)
            continue
        rec["compile_s"] = time.perf_counter() - t0
        need = memory_need(compiled)
        rec["memory_bytes"] = need
        need_est = need if need is not None else 3 * matrix
        if max(need_est, gen_need) > budget_bytes:
            rec.update(
                status="skipped",
                reason=f"memory {fmt_bytes(max(need_est, gen_need))} > budget "
                f"{fmt_bytes(budget_bytes)}",
            )
            rows_out.append(rec)
            continue
        compiled_rows.append((rec, compiled))
    if not compiled_rows:
        return rows_out

    w, g, n_samples = gen(key)
    jax.block_until_ready(w)
    call_args = (w, g, n_samples, key)
    closed_form_s = None
    for rec, compiled in compiled_rows:
        row = rec["row"]
        est = estimate(row, n, d, measured, closed_form_s)
        rec["estimated_s"] = est
        budget = args.naive_budget if row == "naive_loo" else args.rule_budget
        if est is not None and est * (args.repeats + 1) > budget:
            rec.update(
                status="skipped",
                reason=f"estimated {est * (args.repeats + 1):.1f} s for warm-up + "
                f"{args.repeats} repeats > budget {budget:g} s",
            )
            rows_out.append(rec)
            continue
        times = time_calls(compiled, call_args, args.repeats)
        rec.update(
            status="measured",
            median_s=statistics.median(times),
            min_s=min(times),
            times_s=times,
        )
        measured[row] = (n, d, rec["median_s"])
        if row == "margin_contribution":
            closed_form_s = rec["median_s"]
        rows_out.append(rec)
    del w, g, n_samples
    return rows_out


# ----------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[10, 100, 1000, 10000])
    p.add_argument("--d", type=float, nargs="+", default=[1e5, 1e6])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--rules", nargs="+", default=["spmc"], help="registry names, or 'all' (default: spmc)"
    )
    p.add_argument("--gamma", type=float, default=0.2, help="attacker fraction for env")
    p.add_argument(
        "--synthetic-proxy",
        action="store_true",
        help="time proxy-data rules with a cost-free stand-in for the proxy model",
    )
    p.add_argument("--naive-budget", type=float, default=60.0, help="seconds per naive cell")
    p.add_argument("--rule-budget", type=float, default=120.0, help="seconds per other cell")
    p.add_argument("--mem-frac", type=float, default=0.6, help="fraction of free memory to use")
    p.add_argument("--json", type=str, default=None, help="write all results to this path")
    p.add_argument(
        "--quick",
        action="store_true",
        help="small grid: n 10 100 1000, d 1e4 1e5, 3 repeats, 20 s naive budget",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.d, args.repeats = [10, 100, 1000], [1e4, 1e5], 3
        args.naive_budget = min(args.naive_budget, 20.0)
    args.d = [int(x) for x in args.d]
    if args.rules == ["all"]:
        args.rules = REGISTRY.names()
    for name in args.rules:
        REGISTRY.get(name)  # ValueError naming the accepted rules
    bad = [x for x in args.n if x < 2] + [x for x in args.d if x < 20]
    if bad or args.repeats < 1 or not 0 < args.mem_frac <= 1:
        p.error("need every n >= 2, every d >= 20, --repeats >= 1 and 0 < --mem-frac <= 1")
    return args


def fmt_bytes(x: float) -> str:
    return f"{x / 2**30:.2f} GiB" if x >= 2**30 else f"{x / 2**20:.1f} MiB"


def fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1e3:.3f} ms" if x < 1 else f"{x:.2f} s"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    free, source = free_memory_bytes()
    budget_bytes = int(args.mem_frac * free)
    header = {
        "devices": [str(dev) for dev in jax.devices()],
        "platform": jax.devices()[0].platform,
        "device_kind": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        "python": sys.version.split()[0],
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "free_memory_bytes": free,
        "free_memory_source": source,
        "memory_budget_bytes": budget_bytes,
        "config": {k: v for k, v in vars(args).items() if k != "json"},
    }
    print(f"devices: {header['devices']}  ({header['device_kind']})")
    print(f"jax {jax.__version__}, python {header['python']}, {os.cpu_count()} CPUs")
    print(
        f"free memory {free / 2**30:.1f} GiB ({source}); budget "
        f"{args.mem_frac:g} x = {budget_bytes / 2**30:.1f} GiB"
    )
    print(
        f"config: n={args.n} d={args.d} rules={args.rules} repeats={args.repeats} "
        f"naive_budget={args.naive_budget:g}s rule_budget={args.rule_budget:g}s"
    )

    results: list[dict] = []
    measured: dict[str, tuple[int, int, float]] = {}
    for n, d in sorted(((n, d) for n in args.n for d in args.d), key=lambda c: c[0] * c[1]):
        rows = run_cell(n, d, args.rules, args, budget_bytes, measured)
        results.extend(rows)
        for r in rows:
            note = r.get("reason", "")
            print(
                f"  n={n:>6} d={d:>8} {r['row']:<20} {r['status']:<8} "
                f"median {fmt_s(r.get('median_s')):>11}  compile {fmt_s(r.get('compile_s')):>11}"
                + (f"  ({note})" if note else ""),
                flush=True,
            )

    ratios = []
    by_cell: dict[tuple[int, int], dict[str, dict]] = {}
    for r in results:
        by_cell.setdefault((r["n"], r["d"]), {})[r["row"]] = r
    for (n, d), rows in sorted(by_cell.items()):
        fast, slow = rows.get("margin_contribution"), rows.get("naive_loo")
        if fast and slow and fast["status"] == slow["status"] == "measured":
            ratios.append(
                {"n": n, "d": d, "naive_over_closed_form": slow["median_s"] / fast["median_s"]}
            )

    print("\nmedian time per call ('-' = skipped, see above)")
    cells = sorted(by_cell)
    row_names = sorted({r["row"] for r in results}, key=lambda x: (x in SPMC_ROWS, x))
    heads = [f"n={n},d={d:.0e}".replace("e+0", "e") for n, d in cells]
    width = max(12, *(len(h) for h in heads))
    print(f"{'':<22}" + "".join(f"{h:>{width + 1}}" for h in heads))
    for name in row_names:
        vals = [
            fmt_s(by_cell[c][name].get("median_s")) if name in by_cell[c] else "" for c in cells
        ]
        print(f"{name:<22}" + "".join(f"{v:>{width + 1}}" for v in vals))
    ratio_of = {(r["n"], r["d"]): r["naive_over_closed_form"] for r in ratios}
    if ratio_of:
        vals = [f"{ratio_of[c]:.1f}x" if c in ratio_of else "-" for c in cells]
        print(f"{'naive / closed form':<22}" + "".join(f"{v:>{width + 1}}" for v in vals))
    skipped = [r for r in results if r["status"] != "measured"]
    print(f"\n{len(results) - len(skipped)} measured, {len(skipped)} skipped")

    report = {**header, "results": results, "ratios": ratios}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
