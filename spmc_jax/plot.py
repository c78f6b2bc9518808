"""`python -m spmc_jax.plot RUN_DIR [RUN_DIR ...] --out FILE.png`: compare training runs.

Overlays, per round, the clean accuracy A, the backdoor failure rate R, V = (A + R)/2 and the
attackers' total aggregation weight of several `spmc_jax.train` runs (read from each run's
metrics.jsonl, rounds as it numbers them; a run still going or killed is read as far as it
got), labels each run by the config fields that differ between them, and prints a comparison
table (last evaluated round and last-5-round means). `--weights FILE.png` also draws each
run's per-client weights α in its last round as the deviation from uniform, α − 1/n (in % of
1/n), attackers marked: FedAvg's bars are all 0, a defense that down-weights attackers shows
red bars below 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spmc_jax.cli_help import HelpFormatter

CURVE_KEYS = ("A", "R", "V", "attacker_weight")
TITLES = {
    "A": "clean accuracy A (%)",
    "R": "backdoor failure rate R (%)",
    "V": "V = (A + R) / 2 (%)",
    "attacker_weight": "attackers' total weight",
}
# Config fields that name a run, in label order (only those that differ between runs are used).
LABEL_KEYS = (
    "dataset",
    "defense",
    "attack",
    "gamma",
    "model",
    "protocol",
    "local_epochs",
    "clients",
    "partition",
    "beta",
    "seed",
)
CURVES_SIZE = (11.0, 7.0)  # inches
WEIGHTS_PANEL = (4.4, 3.4)  # inches per run
DPI = 100


@dataclasses.dataclass
class Run:
    """One run directory as read back: its config, rows and attacker ids."""

    path: Path
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    malicious_ids: list[int]
    label: str = ""


def load_run(run_dir: str | Path) -> Run:
    """Read RUN_DIR's config (summary.json, else plan.json) and metrics.jsonl rows.

    A torn last line (a killed run) is skipped.

    Raises:
      ValueError: not a run directory (no config, or no metrics.jsonl row).
    """
    d = Path(run_dir)
    meta = None
    for name in ("summary.json", "plan.json"):
        if (d / name).is_file():
            meta = json.loads((d / name).read_text())
            break
    if meta is None or not (d / "metrics.jsonl").is_file():
        raise ValueError(
            f"{str(d)!r} is not a run directory; accepted: the --out of `python -m "
            "spmc_jax.train` (with plan.json or summary.json and metrics.jsonl)"
        )
    rows = []
    for line in (d / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    if not rows:
        raise ValueError(f"{str(d / 'metrics.jsonl')!r} holds no round yet")
    return Run(d, meta["config"], rows, list(meta["plan"].get("malicious_ids", [])))


def label_runs(runs: Sequence[Run]) -> None:
    """Set each run's label to the config fields that differ between the runs ("spmc
    gamma=0.3"), the directory name when none do (or they tie)."""
    differing = [k for k in LABEL_KEYS if len({json.dumps(r.config.get(k)) for r in runs}) > 1]
    for r in runs:
        parts = []
        for k in differing:
            v = r.config.get(k)
            parts.append(str(v) if k in ("defense", "attack", "dataset", "model") else f"{k}={v}")
        r.label = " ".join(parts) or r.path.name
    labels = [r.label for r in runs]
    for r in runs:
        if labels.count(r.label) > 1:
            r.label = f"{r.label} ({r.path.name})"


def _evaluated(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [h for h in rows if h.get("A") is not None]


def _mean(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(vals) / len(vals) if vals else None


def summary_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Per run: rounds done, last evaluated round's A/R/V, last-5-evaluated-round means and the
    mean attackers' weight over all rounds."""
    out = []
    for r in runs:
        ev = _evaluated(r.rows)
        last = ev[-1] if ev else {}
        tail = ev[-5:]
        out.append(
            {
                "run": r.label,
                "rounds": len(r.rows),
                "last_round": last.get("round"),
                **{k: last.get(k) for k in ("A", "R", "V")},
                **{f"last5_{k}": _mean([h[k] for h in tail]) for k in ("A", "R", "V")},
                "attacker_weight": _mean([h.get("attacker_weight") for h in r.rows]),
            }
        )
    return out


def comparison_table(runs: Sequence[Run]) -> str:
    """A fixed-width text table of `summary_rows`."""

    def f(v: Any, pct: bool = True) -> str:
        if v is None:
            return "–"
        return f"{v:.2f}" if pct else f"{v:.3f}"

    rows = summary_rows(runs)
    head = ["run", "rounds", "A", "R", "V", "A last5", "R last5", "V last5", "att. weight"]
    body = [
        [
            s["run"],
            str(s["rounds"]),
            f(s["A"]),
            f(s["R"]),
            f(s["V"]),
            f(s["last5_A"]),
            f(s["last5_R"]),
            f(s["last5_V"]),
            f(s["attacker_weight"], pct=False),
        ]
        for s in rows
    ]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    note = "A, R, V: last evaluated round; last5: mean of the last 5 evaluated rounds (%)"
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body), note])


def _plain_axis(ax: Any) -> None:
    """Integer round ticks, no offset/scientific tick labels (a 1e-4 wiggle stays small)."""
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fmt = ScalarFormatter(useOffset=False)
    fmt.set_scientific(False)
    ax.yaxis.set_major_formatter(fmt)
    ax.grid(alpha=0.3)


def curves_figure(runs: Sequence[Run], title: str = "") -> Any:
    """A 2 × 2 figure: A, R, V (0-100 %) and the attackers' weight per round, one line per run.

    The attackers' weight panel marks the attackers' share of the clients (FedAvg's value)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=CURVES_SIZE, dpi=DPI, layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    for ax, key in zip(axes, CURVE_KEYS, strict=True):
        for r in runs:
            rows = r.rows if key == "attacker_weight" else _evaluated(r.rows)
            ax.plot(
                [h["round"] for h in rows], [h[key] for h in rows], marker="o", ms=3, label=r.label
            )
        ax.set_title(TITLES[key], fontsize=10)
        ax.set_xlabel("round")
        if key == "attacker_weight":
            shares = {round(len(r.malicious_ids) / r.config.get("clients", 1), 6) for r in runs} - {
                0.0
            }
            for s in sorted(shares):
                ax.axhline(s, color="gray", ls="--", lw=1)
            ax.set_ylim(0, 1)
            if shares:
                ax.text(
                    0.01,
                    max(shares) + 0.02,
                    "dashed: attackers' share of clients (FedAvg)",
                    transform=ax.get_yaxis_transform(),
                    fontsize=8,
                    color="gray",
                )
        else:
            ax.set_ylim(-2, 102)
        _plain_axis(ax)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


# The y range of the weights plot covers at least ±this share of 1/n (%): smaller deviations
# change the aggregate by less than 0.1 % of a client's uniform weight and stay visibly small.
WEIGHTS_MIN_RANGE_PCT = 0.1


def plot_client_weights(
    ax: Any,
    client_ids: Sequence[int],
    weights: Sequence[float],
    malicious_ids: Sequence[int],
    title: str = "",
) -> None:
    """Bars of each client's deviation from the uniform weight, (α_i − 1/n) / (1/n) in %
    (n = clients in the round), attackers in red.

    Uniform weights (FedAvg) give no bars; the axis is symmetric around 0, spans at least
    ±`WEIGHTS_MIN_RANGE_PCT` % and has plain tick labels (no offset, no ×1e-5 factor), so a
    float32-level wiggle is not drawn as a trend.
    """
    import numpy as np

    ids = np.asarray(client_ids)
    w = np.asarray(weights, np.float64)
    n = len(w)
    dev = 100.0 * (w / w.sum() * n - 1.0)  # % of the uniform weight 1/n
    bad = np.isin(ids, np.asarray(malicious_ids, int))
    pos = np.arange(n)
    ax.bar(pos, dev, color=np.where(bad, "tab:red", "tab:blue"))
    ax.axhline(0.0, color="black", lw=0.8)
    lim = max(float(np.abs(dev).max()) * 1.15, WEIGHTS_MIN_RANGE_PCT)
    ax.set_ylim(-lim, lim)
    ax.set_xticks(pos)
    ax.set_xticklabels([str(i) for i in ids], fontsize=8 if n <= 20 else 6)
    ax.set_xlabel("client id (red: attacker)")
    ax.set_ylabel("α − 1/n, % of 1/n")
    from matplotlib.ticker import ScalarFormatter

    fmt = ScalarFormatter(useOffset=False)
    fmt.set_scientific(False)
    ax.yaxis.set_major_formatter(fmt)
    ax.grid(alpha=0.3, axis="y")
    caption = (
        f"1/n = {1 / n:.3g}, largest deviation {np.abs(dev).max():.2g}%\n"
        f"attackers' total weight {w[bad].sum() / w.sum():.4f} (uniform {bad.sum() / n:.4f})"
    )
    ax.set_title((title + "\n" if title else "") + caption, fontsize=9)


def weights_figure(runs: Sequence[Run]) -> Any:
    """One `plot_client_weights` panel per run, for its last round."""
    from matplotlib.figure import Figure

    w, h = WEIGHTS_PANEL
    fig = Figure(figsize=(w * len(runs), h), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    for ax, r in zip(axes, runs, strict=True):
        last = r.rows[-1]
        plot_client_weights(
            ax,
            last["client_ids"],
            last["client_weights"],
            r.malicious_ids,
            f"{r.label}, round {last['round']}",
        )
    return fig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m spmc_jax.plot",
        description=(
            "Overlay A, R, V and the attackers' weight per round of several training runs and "
            "print a comparison table. Runs are labelled by the config fields that differ."
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="--out directories of `spmc_jax.train` runs"
    )
    p.add_argument("--out", required=True, help="PNG file for the curves (default: none; required)")
    p.add_argument(
        "--weights",
        default=None,
        metavar="FILE.png",
        help="also draw each run's last-round client weights as α − 1/n, attackers in red "
        "(default: not drawn)",
    )
    p.add_argument("--title", default="", help="figure title (default: none)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for path in (args.out, args.weights):
            if path is not None and not path.lower().endswith(".png"):
                raise ValueError(f"{path!r}; accepted: a path ending in .png")
        runs = [load_run(d) for d in args.runs]
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    label_runs(runs)
    print(comparison_table(runs))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    curves_figure(runs, args.title).savefig(out, dpi=DPI)
    written = [str(out)]
    if args.weights is not None:
        wpath = Path(args.weights)
        wpath.parent.mkdir(parents=True, exist_ok=True)
        weights_figure(runs).savefig(wpath, dpi=DPI)
        written.append(str(wpath))
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
