"""Per-round logging of a training run: CSV, TensorBoard, Weights & Biases, live curves, progress.

`RunLogger` receives every row that `spmc_jax.train` appends to metrics.jsonl and mirrors it to

  metrics.csv  one line per round, the same values as metrics.jsonl (lists as JSON text,
               None as an empty field), so a spreadsheet or `pandas.read_csv` reads the run;
  tb/          TensorBoard event files (tensorboardX), one scalar per metric with the round
               number of metrics.jsonl as its step; `tensorboard --logdir OUT/tb`;
  wandb        with `wandb_project`: a Weights & Biases run (optional extra `spmc_jax[wandb]`;
               mode "offline" needs no network or account, `wandb sync` uploads it later);
  curves.png   redrawn after evaluated rounds, so a killed run still has its curves.

`Progress` is the round (or sweep-cell) progress bar: tqdm on stderr, with an ETA, and a
"compiling" note until the first round is back. It prints nothing when stderr is not a
terminal or the CI environment variable is set (logs and CI output stay clean).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO, cast

# Scalars written to TensorBoard / W&B per round (skipped where the row holds None).
SCALAR_KEYS = ("A", "R", "R_excl_target", "V", "attacker_weight", "seconds", "nonfinite")
WANDB_MODES = ("offline", "online")
TB_SUBDIR = "tb"
# A curves.png redraw costs ~0.1-0.3 s: redraw only once this many times its own duration has
# passed since the last one, so plotting never takes more than ~1/PLOT_BUDGET of a fast run.
PLOT_BUDGET = 10.0


def in_ci() -> bool:
    """Whether the CI environment variable is set (GitHub/GitLab/etc. set CI=true)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def interactive(stream: TextIO | None = None) -> bool:
    """Whether a progress display belongs on `stream` (default stderr): a TTY, outside CI."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and not in_ci()


def fmt_duration(seconds: float) -> str:
    """12 s, 3m05s, 2h07m: a short human duration."""
    s = max(round(seconds), 0)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def eta_seconds(done: int, total: int, elapsed: float) -> float | None:
    """Time left at the mean pace so far; None before anything is done."""
    if done <= 0:
        return None
    return elapsed / done * max(total - done, 0)


class Progress:
    """A tqdm bar over rounds or cells with an ETA; silent unless `enabled`.

    Args:
      total: rounds (or cells) in all.
      initial: already done (a resumed run).
      unit: "round" or "cell".
      enabled: draw it (default: `interactive(stream)`).
      stream: where to draw (default stderr).
      compiling: e.g. "round 1": start with the note that it includes compilation.
    """

    def __init__(
        self,
        total: int,
        initial: int = 0,
        unit: str = "round",
        enabled: bool | None = None,
        stream: TextIO | None = None,
        compiling: str | None = None,
    ) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.enabled = interactive(self.stream) if enabled is None else enabled
        self._bar: Any = None
        if self.enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                initial=initial,
                unit=unit,
                desc=None if compiling is None else f"{compiling}: compiling",
                file=self.stream,
                dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} {unit}s [{elapsed}<{remaining}]"
                "{postfix}",
            )

    def compiling(self, what: str = "round 1") -> None:
        """Say that `what` includes XLA compilation (the first block of a run)."""
        if self._bar is not None:
            self._bar.set_description_str(f"{what}: compiling")

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        """Advance by `n`, clear the compiling note, show `postfix` (e.g. the last A/R)."""
        if self._bar is not None:
            self._bar.set_description_str("")
            if postfix is not None:
                self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.update(n)

    def write(self, line: str, file: TextIO | None = None) -> None:
        """Print a log line (default stdout) without tearing the bar."""
        if self._bar is not None:
            self._bar.write(line, file=file or sys.stdout)
        else:
            print(line, file=file or sys.stdout, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- CSV
def _csv_cell(v: Any) -> str:
    """A row value as CSV text: None empty, strings as is, everything else as JSON."""
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    return json.dumps(v)


def read_metrics_csv(path: str | Path) -> list[dict[str, Any]]:
    """metrics.csv back into rows equal to metrics.jsonl's (the inverse of `_csv_cell`)."""

    def parse(s: str) -> Any:
        if s == "":
            return None
        try:
            return json.loads(s)
        except json.JSONDecodeError:
            return s

    with Path(path).open(newline="", encoding="utf-8") as fh:
        return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(fh)]


class _CsvLog:
    """metrics.csv with the columns of the first row (later new keys go to the end)."""

    def __init__(self, path: Path, rows: Sequence[dict[str, Any]]) -> None:
        self.path = path
        self.columns: list[str] = []
        self.rows: list[dict[str, Any]] = []
        for row in rows:
            self.append(row, flush=False)
        self._rewrite()

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(self.columns)
            w.writerows([_csv_cell(r.get(c)) for c in self.columns] for r in self.rows)
        os.replace(tmp, self.path)

    def append(self, row: dict[str, Any], flush: bool = True) -> None:
        self.rows.append(row)
        new = [k for k in row if k not in self.columns]
        self.columns.extend(new)
        if not flush:
            return
        if new:  # the first row, or a new column: rewrite with the (wider) header
            self._rewrite()
            return
        with self.path.open("a", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerow([_csv_cell(row.get(c)) for c in self.columns])


# ----------------------------------------------------------------------------- loggers
def check_wandb(project: str | None, mode: str) -> None:
    """Refuse a W&B request that cannot work, before any compute.

    Raises:
      ValueError: an unknown mode, an empty project, or wandb not installed.
    """
    if mode not in WANDB_MODES:
        raise ValueError(f"--wandb-mode {mode!r}; accepted: {', '.join(WANDB_MODES)}")
    if project is None:
        return
    if not project.strip():
        raise ValueError("--wandb needs a project name, got an empty string")
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        raise ValueError(
            f"--wandb {project}: the wandb package is not installed; accepted: install it "
            "with pip install 'spmc_jax[wandb]' (or pip install wandb), or drop --wandb"
        )


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    out = {k: float(row[k]) for k in SCALAR_KEYS if row.get(k) is not None}
    loss = row.get("loss")
    if isinstance(loss, list) and loss:
        out["mean_client_loss"] = float(sum(loss) / len(loss))
    return out


class RunLogger:
    """Mirror each metrics.jsonl row of a run to metrics.csv, TensorBoard, W&B and curves.png.

    Args:
      out: the run directory.
      config: the run's `Config.to_dict()` (TensorBoard text, W&B config).
      kept: rows already in metrics.jsonl (a resumed run); fresh runs pass [].
      plot: `plot(history, path)` drawing curves.png; None draws nothing.
      tensorboard: write OUT/tb event files.
      wandb_project: W&B project, None for no W&B run.
      wandb_mode: "offline" (no network; `wandb sync` later) or "online".
    """

    def __init__(
        self,
        out: Path,
        config: dict[str, Any],
        kept: Sequence[dict[str, Any]] = (),
        *,
        plot: Callable[[list[dict[str, Any]], Path], None] | None = None,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        wandb_mode: str = "offline",
    ) -> None:
        self.out = Path(out)
        self.history: list[dict[str, Any]] = list(kept)
        self.csv = _CsvLog(self.out / "metrics.csv", kept)
        self._plot = plot
        self._last_plot_end = 0.0
        self._plot_cost = 0.0
        self.tb: Any = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            tb_dir = self.out / TB_SUBDIR
            if not kept and tb_dir.exists():
                shutil.rmtree(tb_dir)  # a fresh run: an earlier run's events would mix in
            # Resuming: purge_step makes TensorBoard drop events of rounds past the checkpoint
            # that a killed run had already written.
            start = kept[-1]["round"] + 1 if kept else None
            # The suffix keeps a resumed writer's file apart from the killed run's even within
            # the same second (the file name's timestamp has 1 s resolution).
            self.tb = SummaryWriter(
                str(tb_dir), purge_step=start, flush_secs=10, filename_suffix=f".r{start or 0}"
            )
            if not kept:
                self.tb.add_text("config", f"```\n{json.dumps(config, indent=1)}\n```", 0)
        self.wandb: Any = None
        if wandb_project is not None:
            import wandb

            self.wandb = wandb.init(
                project=wandb_project,
                dir=str(self.out),
                config=config,
                mode=cast(Any, wandb_mode),  # checked against WANDB_MODES by check_wandb
                name=self.out.name,
                resume="allow" if kept else None,
            )

    def log(self, row: dict[str, Any]) -> None:
        """Record one round's row (as written to metrics.jsonl)."""
        self.history.append(row)
        self.csv.append(row)
        step = int(row["round"])
        scalars = _scalars(row)
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log({"round": step, **scalars}, step=step)
        if row.get("A") is not None and self._plot is not None:
            now = time.perf_counter()
            if now - self._last_plot_end >= PLOT_BUDGET * self._plot_cost:
                self.draw()

    def draw(self) -> None:
        """Redraw curves.png from every row so far (atomically: never a torn file)."""
        if self._plot is None or not any(h.get("A") is not None for h in self.history):
            return
        t0 = time.perf_counter()
        tmp = self.out / "curves.tmp.png"
        self._plot(self.history, tmp)
        os.replace(tmp, self.out / "curves.png")
        self._last_plot_end = time.perf_counter()
        self._plot_cost = self._last_plot_end - t0

    def close(self) -> None:
        """Flush and close every writer (call also when the run fails)."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
