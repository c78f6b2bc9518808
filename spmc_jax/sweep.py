"""`python -m spmc_jax.sweep`: run a grid of federations and render the paper's Table 2.

A sweep is a grid of cells (dataset × defense × γ × seed, under one protocol), each a full
`spmc_jax.engine.run`. Outputs in `--out DIR`:

  results.jsonl  one tidy row per (cell, round): dataset, defense, gamma, seed, protocol,
                 attack, round, A, R, R_excl_target, V, seconds, attacker_weight, …
  table.md       last-5-round means in the paper's layout (one table per γ, methods as rows,
                 datasets as columns, "A / R / V", ↑/↓ against FedAvg, best V in bold; a
                 cell whose model stayed at chance accuracy is marked ⚠ and never bold), the
                 published numbers on the line under each method, and a per-cell timing table
  curves.png     the paper's Figure 6 layout: A and R per round for every defense, per γ
  sweep.json     the grid, the base configuration, the environment and per-cell timings
  cells/<id>.jsonl, cells/<id>.json
                 a cell's rows and, written atomically once it finished, its summary: the
                 summary is the "done" marker, so a restarted sweep skips finished cells and
                 reruns a killed one from scratch, or with --checkpoint-every N from its
                 latest checkpoint in cells/<id>.ckpt (results.jsonl is rebuilt from finished
                 cells only, so it never holds duplicate or partial rows)
  cells/batch-<hash>.ckpt
                 with --cell-batch N > 1, cells that share a program run as one batch
                 (`spmc_jax.batch`: federations on an axis, the same numbers); its stacked
                 state is checkpointed here, so a killed batch resumes mid-way
  .jax_cache/    JAX's persistent compilation cache: cells whose programs are identical (same
                 shapes and static configuration, e.g. FedAvg at γ 0.2 and 0.3) and resumed or
                 repeated sweeps load the compiled program instead of recompiling it

Presets are data (`PRESETS`): a grid plus `Config` overrides; command-line flags override them.
On CPU the command line splits the host into one JAX device per allowed core (`--cpu-devices`),
so each cell's clients train one per core, as `python -m spmc_jax.train` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import importlib.resources
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Protocol

from spmc_jax.cli_help import HelpFormatter
from spmc_jax.config import DATASETS, MODELS, PROTOCOLS, Config
from spmc_jax.data.types import Dataset
from spmc_jax.train import fmt_pct as _fmt
from spmc_jax.train import nonfinite_line, round_line

# The paper's Table 2: rows (methods) and columns (datasets) in its order.
PAPER_DEFENSES = (
    "fedavg", "dnc", "sageflow", "bulyan", "rfa", "rlr", "crfl", "foolsgold", "rsa",
    "finetuning", "spmc",
)  # fmt: skip
PAPER_DATASETS = ("fashion_mnist", "cifar10", "mnist")
PAPER_GAMMAS = (0.2, 0.3)

# A grid's `defenses` given as this word (preset or --defenses) means every registered rule.
ALL_DEFENSES = "all"


def resolve_defenses(names: Sequence[str] | str) -> tuple[str, ...]:
    """`names`, with the word "all" (alone or among them) replaced by every registered rule."""
    if isinstance(names, str):
        names = (names,)
    if ALL_DEFENSES not in names:
        return tuple(names)
    from spmc_jax.aggregators import REGISTRY

    out: list[str] = []
    for n in names:
        out.extend(REGISTRY.names() if n == ALL_DEFENSES else [n])
    return tuple(out)


PRESETS: dict[str, dict[str, Any]] = {
    "table2": {
        "description": "the paper's Table 2 grid: 11 methods x 3 datasets x gamma 0.2/0.3, "
        "50 rounds, full data, attack 'base', seed 0",
        "grid": {
            "datasets": PAPER_DATASETS,
            "defenses": PAPER_DEFENSES,
            "gammas": PAPER_GAMMAS,
            "seeds": (0,),
        },
        "config": {"rounds": 50, "attack": "base", "subsample": None},
        # The reference's CIFAR-10 config names ResNet-10 (spmc_reference.md §1.1; §6.3 notes
        # that its Grad-CAM script loads a SimpleCNN checkpoint, so `--model simple_cnn` is
        # the other reading).
        "dataset_config": {"cifar10": {"model": "resnet10"}},
        "test_subsample": None,
    },
    "smoke": {
        "description": "a CPU-sized check of the whole pipeline (a few minutes on 2 cores) in "
        "which FedAvg's backdoor implants: FedAvg and SPMC on a 6,000-image MNIST slice, the "
        "MLP, 10 clients, gamma 0.3, 12 rounds, 3 local epochs for both, 2,000 test images",
        "grid": {
            "datasets": ("mnist",),
            "defenses": ("fedavg", "spmc"),
            "gammas": (0.3,),
            "seeds": (0,),
        },
        # Departures from the paper's protocol, each needed for the backdoor to implant in a
        # dozen CPU-cheap rounds (benchmarks/RESULTS.md, issue #17): a 6,000-image slice, the
        # MLP (the SimpleCNN barely learns in so few SGD steps), 12 rounds, and 3 local epochs
        # for FedAvg and SPMC alike (paper: 1 and 10). gamma 0.3 is the paper's other ratio
        # (3 attackers of 10). FedAvg's last-5 R_excl_target is 10.5 (implanted) with A 83.
        "config": {
            "rounds": 12,
            "subsample": 6000,
            "clients": 10,
            "local_epochs": 3,
            "model": "mlp",
        },
        "dataset_config": {},
        # Evaluating on all 10,000 test images (clean + triggered) costs more CPU per round
        # than the training of these small rounds; the header of table.md says the test set is
        # cut.
        "test_subsample": 2000,
    },
    "demo": {
        "description": "a CPU-sized run where FedAvg's backdoor implants (about 10 minutes on 2 "
        "cores): FedAvg, DnC, RFA, RLR and SPMC on a 12,000-image MNIST slice, the MLP, "
        "10 clients, 50 rounds, gamma 0.2, paper protocol (config.PRESETS['demo'])",
        "grid": {
            "datasets": ("mnist",),
            "defenses": ("fedavg", "dnc", "rfa", "rlr", "spmc"),
            "gammas": (0.2,),
            "seeds": (0,),
        },
        # = config.PRESETS["demo"] (tests check it) but the protocol, which is the sweep's
        # --protocol (default paper, as there).
        "config": {
            "dataset": "mnist",
            "subsample": 12000,
            "clients": 10,
            "rounds": 50,
            "model": "mlp",
        },
        "dataset_config": {},
        # A 2,000-image stratified test slice, as in smoke: evaluation dominates tiny rounds.
        "test_subsample": 2000,
    },
    "zoo": {
        "description": "every registered defense against the chosen --attack (default: the "
        "reference backdoor) on a CPU-sized MNIST run where FedAvg's backdoor implants: the "
        "MLP, a 6,000-image slice, 10 clients, gamma 0.3, 20 rounds of 2 local epochs, fair "
        "protocol",
        "grid": {
            "datasets": ("mnist",),
            "defenses": ALL_DEFENSES,  # resolved from the registry when the spec is built
            "gammas": (0.3,),
            "seeds": (0,),
        },
        # 20 rounds at gamma 0.3 (the paper's other ratio): FedAvg's R_excl_target falls
        # below 20 from round 11 (last-5 mean 4.5, A 85; benchmarks/RESULTS.md, issue #17).
        # At gamma 0.2 and 5 rounds it never implanted.
        "config": {
            "subsample": 6000,
            "clients": 10,
            "rounds": 20,
            "local_epochs": 2,
            "model": "mlp",
        },
        "dataset_config": {},
        "test_subsample": 2000,
        # Every rule as its paper defines it (the reference's quirks are for Table 2 only).
        "protocol": "fair",
    },
}

# Config fields that may differ between a finished cell and its rerun without changing results.
_IRRELEVANT_FIELDS = ("out", "data_dir", "fetch")


class DatasetLoader(Protocol):
    """`loader(name, data_dir=..., fetch=...) -> Dataset` (the hook tests replace)."""

    def __call__(self, name: str, *, data_dir: str | None, fetch: bool) -> Dataset: ...


# ----------------------------------------------------------------------------- the grid
class Cell(NamedTuple):
    """One point of the grid; `id` names its files."""

    dataset: str
    defense: str
    gamma: float
    seed: int
    protocol: str

    @property
    def id(self) -> str:
        return f"{self.dataset}-{self.defense}-g{self.gamma:g}-s{self.seed}-{self.protocol}"


def _dedupe(xs: Iterable[Any]) -> tuple[Any, ...]:
    return tuple(dict.fromkeys(xs))


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """A grid of cells and the configuration every cell shares.

    Attributes:
      preset: the preset it came from (for the record).
      datasets, defenses, gammas, seeds: the grid axes (cells are their product).
      protocol: 'paper' or 'fair' (see `Config`), shared by every cell.
      base: the shared `Config`; each cell replaces dataset, defense, gamma, seed, protocol.
      test_subsample: evaluate on a class-stratified subset of this many test images
        (None: the full test set).
      dataset_config: per-dataset `Config` overrides (e.g. CIFAR-10's model), applied over
        `base`.
    """

    preset: str
    datasets: tuple[str, ...]
    defenses: tuple[str, ...]
    gammas: tuple[float, ...]
    seeds: tuple[int, ...]
    protocol: str
    base: Config
    test_subsample: int | None = None
    dataset_config: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def cells(self) -> list[Cell]:
        """Every cell, dataset-major (one dataset load serves all its cells)."""
        return [
            Cell(d, f, g, s, self.protocol)
            for d in self.datasets
            for f in self.defenses
            for g in self.gammas
            for s in self.seeds
        ]

    def config(self, cell: Cell) -> Config:
        return self.base.replace(
            **self.dataset_config.get(cell.dataset, {}),
            dataset=cell.dataset,
            defense=cell.defense,
            gamma=cell.gamma,
            seed=cell.seed,
            protocol=cell.protocol,
            out=None,
        )

    def validate(self) -> SweepSpec:
        """Validate every cell's Config before any compute (ValueError names bad values)."""
        for axis in ("datasets", "defenses", "gammas", "seeds"):
            if not getattr(self, axis):
                raise ValueError(f"--{axis} is empty; give at least one value")
        if self.test_subsample is not None and self.test_subsample < 10:
            raise ValueError(f"--test-subsample must be >= 10, got {self.test_subsample}")
        for cell in self.cells():
            self.config(cell).validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "grid": {
                "datasets": list(self.datasets),
                "defenses": list(self.defenses),
                "gammas": list(self.gammas),
                "seeds": list(self.seeds),
                "protocol": self.protocol,
            },
            "test_subsample": self.test_subsample,
            "dataset_config": self.dataset_config,
            "base_config": self.base.to_dict(),
            "cells": [c.id for c in self.cells()],
        }


def make_spec(
    preset: str,
    *,
    datasets: Sequence[str] | None = None,
    defenses: Sequence[str] | None = None,
    gammas: Sequence[float] | None = None,
    seeds: Sequence[int] | None = None,
    protocol: str | None = None,
    test_subsample: int | str | None = "preset",
    **config: Any,
) -> SweepSpec:
    """Build a `SweepSpec` from a preset; arguments that are not None override it.

    Args:
      preset: a key of `PRESETS`.
      datasets, defenses, gammas, seeds: grid axes (duplicates dropped, order kept).
      protocol: 'paper' or 'fair' (default: the preset's `protocol`, else 'paper').
      test_subsample: test images to evaluate on; None = all; "preset" = the preset's value.
      **config: `Config` field overrides (a value of None keeps the preset's), except
        `subsample`, which is always applied when given ("full" → None). An override also
        replaces the preset's per-dataset value of that field.

    Raises:
      ValueError: unknown preset or Config field (naming the accepted ones).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; accepted: {', '.join(PRESETS)}")
    p = PRESETS[preset]
    fields = {f.name for f in dataclasses.fields(Config)}
    overrides = dict(p["config"])
    per_dataset = {d: dict(o) for d, o in p.get("dataset_config", {}).items()}
    for key, value in config.items():
        if key not in fields:
            raise ValueError(f"unknown Config field {key!r}; accepted: {', '.join(sorted(fields))}")
        if key == "subsample" and value is not None:
            overrides[key] = None if value == "full" else value
        elif value is not None:
            overrides[key] = value
        else:
            continue
        for o in per_dataset.values():
            o.pop(key, None)
    grid = p["grid"]
    if test_subsample == "preset":
        test_n = p["test_subsample"]
    else:
        test_n = None if test_subsample is None else int(test_subsample)
    return SweepSpec(
        preset=preset,
        datasets=_dedupe(datasets or grid["datasets"]),
        defenses=_dedupe(resolve_defenses(defenses or grid["defenses"])),
        gammas=_dedupe(float(g) for g in (gammas or grid["gammas"])),
        seeds=_dedupe(int(s) for s in (seeds if seeds is not None else grid["seeds"])),
        protocol=protocol or p.get("protocol", "paper"),
        base=Config(**overrides),
        test_subsample=test_n,
        dataset_config={d: o for d, o in per_dataset.items() if o},
    )


def _config_key(cfg: Config, test_subsample: int | None) -> dict[str, Any]:
    """What must match for a finished cell to count as this cell's result."""
    d = cfg.to_dict()
    for k in _IRRELEVANT_FIELDS:
        d.pop(k, None)
    d["test_subsample"] = test_subsample
    return json.loads(json.dumps(d))  # tuples -> lists, so it compares equal to a reloaded one


# ----------------------------------------------------------------------------- published data
def load_published() -> dict[str, Any]:
    """The paper's Table 2 as data (spmc_jax/resources/paper_results.json).

    Returns the JSON document; `rows` holds one dict per (gamma, method, dataset) with A, R, V.
    """
    text = (
        importlib.resources.files("spmc_jax")
        .joinpath("resources/paper_results.json")
        .read_text(encoding="utf-8")
    )
    return json.loads(text)


def published_lookup(doc: dict[str, Any]) -> dict[tuple[float, str, str], dict[str, float]]:
    """(gamma, method, dataset) -> {"A", "R", "V"}."""
    return {
        (float(r["gamma"]), r["method"], r["dataset"]): {k: r[k] for k in ("A", "R", "V")}
        for r in doc["rows"]
    }


# ----------------------------------------------------------------------------- files
def _write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file + rename, so a kill never leaves a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _cell_paths(out: Path, cell: Cell) -> tuple[Path, Path]:
    d = out / "cells"
    return d / f"{cell.id}.jsonl", d / f"{cell.id}.json"


def _read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def load_finished(out: Path, spec: SweepSpec) -> dict[str, dict[str, Any]]:
    """Summaries of the grid's finished cells in `out` (cell id -> summary).

    A cell is finished when its summary exists, parses, and its rows file holds the number
    of rows the summary records; anything else (a killed cell) is rerun from scratch.

    Raises:
      ValueError: a finished cell was run with a different configuration (rounds, attack,
        subsample, …): reusing it would mix two experiments in one table.
    """
    done: dict[str, dict[str, Any]] = {}
    for cell in spec.cells():
        rows_path, summary_path = _cell_paths(out, cell)
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
            complete = len(_read_rows(rows_path)) == summary["rows"]
        except (OSError, ValueError, KeyError):
            continue
        if not complete:
            continue
        want = _config_key(spec.config(cell), spec.test_subsample)
        have = summary.get("config_key")
        if have != want:
            have = have or {}
            diff = sorted(k for k in set(want) | set(have) if have.get(k) != want.get(k))
            shown = ", ".join(f"{k}: {have.get(k)!r} -> {want.get(k)!r}" for k in diff[:6])
            raise ValueError(
                f"{summary_path} was run with another configuration ({shown}); use a new --out "
                f"or delete {out / 'cells'} to rerun"
            )
        done[cell.id] = summary
    return done


def rebuild_results(out: Path, spec: SweepSpec, done: dict[str, dict[str, Any]]) -> list[dict]:
    """Rewrite results.jsonl from the finished cells, in grid order; returns the rows."""
    rows: list[dict[str, Any]] = []
    for cell in spec.cells():
        if cell.id in done:
            rows.extend(_read_rows(_cell_paths(out, cell)[0]))
    _write_atomic(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return rows


# ----------------------------------------------------------------------------- compile meter
class _CompileMeter:
    """Sums JAX's compile-time monitoring events (`jax.monitoring`) between snapshots."""

    EVENTS: ClassVar[dict[str, str]] = {
        "/jax/core/compile/jaxpr_trace_duration": "trace_s",
        "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
        # Includes the persistent-cache lookup: on a hit this is the load time.
        "/jax/core/compile/backend_compile_duration": "backend_compile_s",
        "/jax/compilation_cache/compile_time_saved_sec": "compile_saved_s",
    }
    COUNTS: ClassVar[dict[str, str]] = {
        "/jax/compilation_cache/cache_hits": "cache_hits",
        "/jax/compilation_cache/cache_misses": "cache_misses",
        "/jax/compilation_cache/compile_requests_use_cache": "cache_requests",
    }

    def __init__(self) -> None:
        self.totals: dict[str, float] = dict.fromkeys(
            [*self.EVENTS.values(), *self.COUNTS.values()], 0.0
        )

    def _duration(self, event: str, duration_secs: float, **_: str | int) -> None:
        if event in self.EVENTS:
            self.totals[self.EVENTS[event]] += duration_secs

    def _event(self, event: str, **_: str | int) -> None:
        if event in self.COUNTS:
            self.totals[self.COUNTS[event]] += 1

    def __enter__(self) -> _CompileMeter:
        import jax.monitoring as mon

        mon.register_event_duration_secs_listener(self._duration)
        mon.register_event_listener(self._event)
        return self

    def __exit__(self, *exc: object) -> None:
        import jax.monitoring as mon

        mon.unregister_event_duration_listener(self._duration)
        mon.unregister_event_listener(self._event)

    def snapshot(self) -> dict[str, float]:
        return dict(self.totals)

    @staticmethod
    def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
        return {k: round(after[k] - before[k], 3) for k in after}


def enable_jax_cache(path: Path) -> str:
    """Turn on JAX's persistent compilation cache in `path` (if none is configured yet).

    The thresholds are lowered to zero so that every program is cached: the round and the
    evaluator dominate, but the many small programs (init, resize, PRNG) add up on CPU.
    JAX initialises the cache at the process's first compilation, so this only takes effect
    when called before it (true for the CLI); `sweep.json` records whether it was used.

    Returns the cache directory in effect.
    """
    import jax

    current = getattr(jax.config, "jax_compilation_cache_dir", None)
    if current:  # the user's own (e.g. JAX_COMPILATION_CACHE_DIR) wins
        return str(current)
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return str(path)


# ----------------------------------------------------------------------------- running
def _test_subset(ds: Dataset, n: int | None) -> Dataset:
    """The dataset with a class-stratified subset of `n` test images (seed 0, all cells)."""
    if n is None or n >= len(ds.y_test):
        return ds
    from spmc_jax.data.partition import stratified_subsample

    idx = stratified_subsample(ds.y_test, n, seed=0)
    return dataclasses.replace(ds, x_test=ds.x_test[idx], y_test=ds.y_test[idx])


def _default_loader(log: Callable[[str], object]) -> DatasetLoader:
    def load(name: str, *, data_dir: str | None, fetch: bool) -> Dataset:
        from spmc_jax.data import load_dataset

        return load_dataset(name, data_dir=data_dir, fetch=fetch, log=log)

    return load


def tidy_row(cell: Cell, cfg: Config, h: dict[str, Any]) -> dict[str, Any]:
    """One results.jsonl row from an engine history row."""
    return {
        "cell": cell.id,
        "dataset": cell.dataset,
        "defense": cell.defense,
        "gamma": cell.gamma,
        "seed": cell.seed,
        "protocol": cell.protocol,
        "attack": cfg.attack,
        "local_epochs": cfg.epochs,
        "round": h["round"],
        "A": h["A"],
        "R": h["R"],
        "R_excl_target": h["R_excl_target"],
        "V": h["V"],
        "seconds": h["seconds"],
        "attacker_weight": h["attacker_weight"],
        "nonfinite": h.get("nonfinite", 0),
        "nonfinite_ids": h.get("nonfinite_ids", []),
    }


def _summary(
    cell: Cell,
    cfg: Config,
    plan: Any,
    hist: list[dict[str, Any]],
    n_rows: int,
    start: int,
    sim: Any,
    timing: dict[str, Any],
    test_subsample: int | None,
    n_train_full: int,
    n_test_full: int,
) -> dict[str, Any]:
    """A finished cell's summary (cells/<id>.json), from its history and timings."""
    from spmc_jax.metrics import last_k_means, learned

    later = [h["seconds"] for h in hist[1:]]
    final = last_k_means(hist)
    return {
        "cell": cell.id,
        **cell._asdict(),
        "attack": cfg.attack,
        "local_epochs": plan.epochs,
        "rows": n_rows,
        "resumed_from_round": start or None,
        "last5": final,
        **learned(final["A"], sim.ds.num_classes),
        "mean_attacker_weight": float(sum(h["attacker_weight"] for h in hist) / len(hist)),
        "r_trigger": sim.r_trigger,
        "conv_impl": sim.conv_impl,
        "cpu_dot_fusion": sim.cpu_dot_fusion,
        "defense_options_received": sim.defense_opts,  # what the rule was built with
        "data": {
            "name": plan.dataset,
            "source": plan.dataset_source,
            "n_train_full": n_train_full,
            "n_train": plan.n_train,
            "n_test_full": n_test_full,
            "n_test": plan.n_test,
            "test_subsample": test_subsample,
        },
        "plan": {
            "num_params": plan.num_params,
            "steps_per_epoch": plan.steps_per_epoch,
            "malicious_ids": [int(i) for i in plan.malicious.nonzero()[0]],
            "memory_estimate_bytes": plan.memory["total"],
        },
        "timing": {
            **timing,
            # The first round's block includes compiling the round and the evaluator.
            "first_round_s": round(hist[0]["seconds"], 3),
            "later_round_s": round(sum(later) / len(later), 3) if later else None,
        },
        "config": cfg.to_dict(),
        "config_key": _config_key(cfg, test_subsample),
        "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def run_cell(
    cell: Cell,
    cfg: Config,
    ds: Dataset,
    out: Path,
    *,
    meter: _CompileMeter,
    n_train_full: int,
    n_test_full: int,
    test_subsample: int | None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    log: Callable[[str], object] = print,
    quiet: bool = False,
    checkpoint_every: int = 0,
    deadline: Deadline | None = None,
) -> dict[str, Any]:
    """Train one cell, streaming its rows to cells/<id>.jsonl, then write its summary.

    With `checkpoint_every` N > 0 the cell's run state is saved to cells/<id>.ckpt after each
    evaluation block ending on a multiple of N; a cell killed mid-way then resumes from its
    latest checkpoint (same numbers as an uninterrupted run) instead of from round 1. The
    checkpoints are deleted once the cell has finished. With a `deadline`, a block after
    which the next one would not finish in time saves a checkpoint and raises
    `SweepStopped`.

    Returns the summary (also written atomically to cells/<id>.json, the "done" marker).
    """
    from spmc_jax import checkpoint as ckpt_lib
    from spmc_jax.engine import Simulation, device_memory_bytes, make_plan, run

    rows_path, summary_path = _cell_paths(out, cell)
    t0, c0, m0 = time.perf_counter(), time.process_time(), meter.snapshot()
    plan = make_plan(cfg, ds)
    avail = device_memory_bytes()
    est = plan.memory["total"]
    if avail and est > 0.9 * avail:
        raise ValueError(
            f"cell {cell.id}: estimated memory {est / 2**30:.1f} GiB exceeds the device's "
            f"{avail / 2**30:.1f} GiB; set client_chunk (--client-chunk in spmc_jax.train)"
        )
    sim = Simulation(cfg, ds, plan)
    build_s = time.perf_counter() - t0
    ckpt_dir = rows_path.with_suffix(".ckpt")
    client_devices = 1 if sim.mesh is None else sim.mesh.size
    state, start, kept = None, 0, []
    # Any complete checkpoint is resumed (also one a time-limit stop left behind).
    meta = ckpt_lib.latest_metadata(ckpt_dir)
    if meta is not None:
        try:
            ckpt_lib.check_resume(meta, cfg.to_dict(), client_devices)
            rows_so_far = ckpt_lib.completed_rows(rows_path, int(meta["rounds_done"]))
        except ValueError as err:
            log(f"    checkpoint not used ({err}); the cell starts from round 1")
            rows_so_far = None
        if rows_so_far is not None:
            start, kept = int(meta["rounds_done"]), rows_so_far
            with ckpt_lib.Checkpointer(ckpt_dir) as reader:
                state, _ = reader.restore(sim.init_state(), start)
            log(f"    resuming after round {start} from {ckpt_dir}")
    if start == 0:
        ckpt_lib.clear(ckpt_dir)  # stale or unusable: this attempt starts afresh
    saving = checkpoint_every > 0 or deadline is not None
    ckpt = ckpt_lib.Checkpointer(ckpt_dir) if saving else None
    block_start = [time.perf_counter()]

    def on_checkpoint(st: Any, rounds_done: int) -> None:
        now = time.perf_counter()
        block_s, block_start[0] = now - block_start[0], now
        if rounds_done >= cfg.rounds or ckpt is None:
            return
        stop = deadline is not None and deadline.too_late(block_s)
        if stop or (checkpoint_every > 0 and rounds_done % checkpoint_every == 0):
            ckpt.save(st, rounds_done, cfg.to_dict(), client_devices)
        if stop:
            raise SweepStopped(f"{cell.id}: stopped after round {rounds_done} (time limit)")

    rows: list[dict[str, Any]] = list(kept)
    # "w": a killed earlier attempt's rows past its checkpoint (or all of them) are discarded.
    with rows_path.open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in kept)

        def on_round(h: dict[str, Any]) -> None:
            row = tidy_row(cell, cfg, h)
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            rows.append(row)
            if on_row is not None:
                on_row(row)
            if not quiet and row["A"] is not None:
                log("    " + round_line(row, cfg.rounds))
            warn = nonfinite_line(h, cfg.rounds)
            if warn is not None:
                log("    " + warn)

        try:
            result = run(
                cfg,
                ds,
                on_round=on_round,
                sim=sim,
                state=state,
                start_round=start,
                history=kept,  # tidy rows carry every key the summary reads
                on_checkpoint=on_checkpoint,
            )
        finally:
            if ckpt is not None:
                ckpt.close()  # waits for an in-flight save, also when the run is killed
        fh.flush()
        os.fsync(fh.fileno())
    ckpt_lib.clear(ckpt_dir)  # finished: the summary below is the cell's record
    timing = {
        "wall_s": round(time.perf_counter() - t0, 3),
        "cpu_s": round(time.process_time() - c0, 3),
        "build_s": round(build_s, 3),
        **_CompileMeter.delta(meter.snapshot(), m0),
    }
    summary = _summary(
        cell, cfg, plan, result.history, len(rows), start, sim, timing, test_subsample,
        n_train_full, n_test_full,
    )  # fmt: skip
    summary["cell_batch"] = [cell.id]  # the cells of its program: itself alone
    summary["client_devices"] = client_devices  # devices the clients were sharded over
    summary["device_placement"] = sim.device_placement()  # which device trained which client
    _write_atomic(summary_path, json.dumps(summary, indent=1))
    return summary


def cells_progress(done: int, total: int, ran: Sequence[str], t0: float) -> str:
    """'3/8 cells done, ETA 4m10s': the ETA at the mean wall time of the cells this invocation
    ran (resumed cells cost nothing), '…ETA after the first cell' before one has finished."""
    from spmc_jax.reporting import eta_seconds, fmt_duration

    eta = eta_seconds(len(ran), len(ran) + total - done, time.perf_counter() - t0)
    left = "ETA after the first cell" if eta is None else f"ETA {fmt_duration(eta)}"
    return f"{done}/{total} cells done, {left}"


class SweepStopped(Exception):
    """The sweep stopped before its time limit; rerunning it with the same --out resumes."""


class Deadline:
    """A wall-clock limit: `too_late(s)` when `s` more seconds would pass it."""

    def __init__(self, seconds: float) -> None:
        if not seconds > 0:
            raise ValueError(f"--time-limit must be > 0 seconds, got {seconds}")
        self.seconds = seconds
        self.end = time.perf_counter() + seconds

    def too_late(self, next_seconds: float) -> bool:
        return time.perf_counter() + next_seconds > self.end


def _batch_dir(out: Path, cells: Sequence[Cell]) -> Path:
    """cells/batch-<hash>.ckpt: the checkpoints of exactly this batch of cells."""
    h = hashlib.sha1("\n".join(c.id for c in cells).encode()).hexdigest()[:12]
    return out / "cells" / f"batch-{h}.ckpt"


def run_cell_batch(
    cells: Sequence[Cell],
    cfgs: Sequence[Config],
    ds: Dataset,
    out: Path,
    *,
    meter: _CompileMeter,
    n_train_full: int,
    n_test_full: int,
    test_subsample: int | None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    log: Callable[[str], object] = print,
    quiet: bool = False,
    checkpoint_every: int = 0,
    deadline: Deadline | None = None,
) -> list[dict[str, Any]]:
    """Train cells that share a program as one batch (`spmc_jax.batch`); like `run_cell`.

    Each cell streams its rows to cells/<id>.jsonl and gets its summary once the batch is
    done. The batch's stacked state is checkpointed to cells/batch-<hash>.ckpt (every
    `checkpoint_every` rounds, and when stopping before the `deadline`); a rerun of the same
    batch resumes from it when every cell's configuration and rows still match.

    Returns the cells' summaries (timings: the batch's wall and CPU time split evenly).
    """
    from spmc_jax import batch as batch_lib
    from spmc_jax import checkpoint as ckpt_lib
    from spmc_jax.engine import make_plan

    t0, c0, m0 = time.perf_counter(), time.process_time(), meter.snapshot()
    plans = [make_plan(c, ds) for c in cfgs]
    bsim = batch_lib.BatchedSimulation(cfgs, ds, plans)
    build_s = time.perf_counter() - t0
    ckpt_dir = _batch_dir(out, cells)
    paths = [_cell_paths(out, c) for c in cells]
    rounds = cfgs[0].rounds
    ckpt_config = {"cells": {c.id: cfg.to_dict() for c, cfg in zip(cells, cfgs, strict=True)}}
    states: Any = None
    start = 0
    kept: list[list[dict[str, Any]]] = [[] for _ in cells]
    meta = ckpt_lib.latest_metadata(ckpt_dir)
    if meta is not None:
        done = int(meta["rounds_done"])
        stored = meta["config"].get("cells", {})
        diffs = {
            c.id: ckpt_lib.config_diff(stored[c.id], cfg.to_dict(), done)
            for c, cfg in zip(cells, cfgs, strict=True)
            if c.id in stored
        }
        rows_so_far = [ckpt_lib.completed_rows(p[0], done) for p in paths]
        if set(stored) != {c.id for c in cells} or any(diffs.values()):
            log(f"    batch checkpoint not used (other cells or configuration: {diffs})")
        elif any(r is None for r in rows_so_far):
            log("    batch checkpoint not used (a cell's rows are missing)")
        else:
            start, kept = done, [r or [] for r in rows_so_far]
            with ckpt_lib.Checkpointer(ckpt_dir) as reader:
                states, _ = reader.restore(bsim.init_states(), start)
            log(f"    resuming the batch after round {start} from {ckpt_dir}")
    if start == 0:
        ckpt_lib.clear(ckpt_dir)
    ckpt = ckpt_lib.Checkpointer(ckpt_dir) if checkpoint_every > 0 or deadline else None
    rows: list[list[dict[str, Any]]] = [list(k) for k in kept]
    handles = [p[0].open("w", encoding="utf-8") for p in paths]
    try:
        for fh, k in zip(handles, kept, strict=True):
            fh.writelines(json.dumps(row) + "\n" for row in k)

        def on_round(f: int, h: dict[str, Any]) -> None:
            row = tidy_row(cells[f], cfgs[f], h)
            handles[f].write(json.dumps(row) + "\n")
            handles[f].flush()
            rows[f].append(row)
            if on_row is not None:
                on_row(row)
            if not quiet and row["A"] is not None:
                log(f"    {cells[f].id} " + round_line(row, rounds))
            warn = nonfinite_line(h, rounds)
            if warn is not None:
                log(f"    {cells[f].id} {warn}")

        def on_checkpoint(st: Any, rounds_done: int, block_s: float) -> None:
            if rounds_done >= rounds or ckpt is None:
                return
            stop = deadline is not None and deadline.too_late(block_s)
            if stop or (checkpoint_every > 0 and rounds_done % checkpoint_every == 0):
                ckpt.save(st, rounds_done, ckpt_config, 1)
            if stop:
                raise SweepStopped(
                    f"batch of {len(cells)} cells stopped after round {rounds_done} (time limit)"
                )

        try:
            result = batch_lib.run_batch(
                bsim,
                on_round,
                states=states,
                start_round=start,
                histories=kept,
                on_checkpoint=on_checkpoint,
            )
        finally:
            if ckpt is not None:
                ckpt.close()
        for fh in handles:
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        for fh in handles:
            fh.close()
    ckpt_lib.clear(ckpt_dir)
    n = len(cells)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    compile_ = _CompileMeter.delta(meter.snapshot(), m0)
    summaries = []
    for f, cell in enumerate(cells):
        timing = {
            "wall_s": round(wall / n, 3),
            "cpu_s": round(cpu / n, 3),
            "build_s": round(build_s / n, 3),
            **{k: round(v / n, 3) for k, v in compile_.items()},
            "batch": {"cells": n, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3)},
        }
        summary = _summary(
            cell, cfgs[f], plans[f], result.histories[f], len(rows[f]), start, bsim.sim,
            timing, test_subsample, n_train_full, n_test_full,
        )  # fmt: skip
        summary["cell_batch"] = [c.id for c in cells]
        summary["client_devices"] = 1  # a batch runs on one device
        _write_atomic(paths[f][1], json.dumps(summary, indent=1))
        summaries.append(summary)
    return summaries


@dataclasses.dataclass
class SweepResult:
    """What `run_sweep` did: cell ids it ran and skipped, and every finished cell's summary."""

    out: Path
    ran: list[str]
    skipped: list[str]
    summaries: dict[str, dict[str, Any]]
    stopped: bool = False  # stopped before the time limit; rerun to finish


def auto_cell_batch(cfg: Config, ds: Dataset) -> int:
    """`--cell-batch` default: as many federations like `cfg` as the memory estimate fits on
    an accelerator (at most 64). 1 on CPU, where a batch computes no faster than its cells
    one after another (benchmarks/RESULTS.md, "Sweep throughput": 0.66-0.90x per round
    once compiled), and when a client mesh shards the clients (batches run on one device)."""
    import jax

    from spmc_jax import sharding as sharding_lib
    from spmc_jax.batch import max_cell_batch
    from spmc_jax.engine import make_plan

    if jax.default_backend() == "cpu":
        return 1
    if sharding_lib.resolve_device_count(cfg.devices, math.gcd(cfg.n_per_round, cfg.clients)) > 1:
        return 1
    fits = max_cell_batch(make_plan(cfg, ds))
    return 64 if fits is None else min(fits, 64)


def run_sweep(
    spec: SweepSpec,
    out: str | os.PathLike,
    *,
    dataset_loader: DatasetLoader | None = None,
    jax_cache: bool = True,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    log: Callable[[str], object] = print,
    quiet: bool = False,
    checkpoint_every: int = 0,
    cell_batch: int | None = 1,
    time_limit: float | None = None,
) -> SweepResult:
    """Run every unfinished cell of `spec` into `out`, then render the table and figure.

    Args:
      spec: the grid (validated here before any compute).
      out: output directory (created; an existing one is resumed).
      dataset_loader: `loader(name, data_dir=, fetch=) -> Dataset`, called once per dataset
        that has unfinished cells (default: `spmc_jax.data.load_dataset`).
      jax_cache: enable JAX's persistent compilation cache in `out/.jax_cache`.
      on_row: called with every results row as it is produced.
      log: progress printer.
      quiet: no per-round lines.
      checkpoint_every: N > 0 saves each running cell's state every N rounds, so a killed
        sweep resumes its interrupted cell mid-way (see `run_cell`); 0 reruns it from round 1.
      cell_batch: how many cells sharing a program run as one batch (`spmc_jax.batch`);
        1 = one by one; None = as many as the memory estimate fits (per dataset).
        Batches are formed from the whole grid (same-program cells in grid order), so a
        resumed sweep forms the same batches and finds their checkpoints.
      time_limit: seconds; the sweep stops (checkpointing the running cell or batch) when the
        next evaluation block or cell would end past it, and returns `stopped=True`.
    """
    from spmc_jax.batch import group_batches
    from spmc_jax.runinfo import environment

    spec.validate()
    if cell_batch is not None and cell_batch < 1:
        raise ValueError(f"--cell-batch must be >= 1 (1 = one by one), got {cell_batch}")
    deadline = Deadline(time_limit) if time_limit is not None else None
    out = Path(out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    cache_dir = enable_jax_cache(out / ".jax_cache") if jax_cache else None
    done = load_finished(out, spec)
    loader = dataset_loader or _default_loader(log)
    cells = spec.cells()
    todo = [c for c in cells if c.id not in done]
    skipped = [c.id for c in cells if c.id in done]
    env = environment()
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    record = {
        **spec.to_dict(),
        "environment": env,
        "started_at": started,
        "jax_cache_dir": cache_dir,
        "status": "running",
    }
    _write_atomic(out / "sweep.json", json.dumps(record, indent=1))
    log(
        f"sweep {spec.preset} ({spec.protocol} protocol): {len(cells)} cells, "
        f"{len(skipped)} already finished, {len(todo)} to run -> {out}"
    )
    ran: list[str] = []
    stopped, first_block_s = False, 0.0  # the longest first block seen (compile included)
    t0, c0 = time.perf_counter(), time.process_time()
    with _CompileMeter() as meter:
        for name in spec.datasets:
            pending = [c for c in todo if c.dataset == name]
            if not pending or stopped:
                continue
            t_load = time.perf_counter()
            raw = loader(name, data_dir=spec.base.data_dir, fetch=spec.base.fetch)
            ds = _test_subset(raw, spec.test_subsample)
            log(
                f"{name}: {len(raw.y_train):,} train / {len(raw.y_test):,} test images "
                f"({raw.source}) loaded in {time.perf_counter() - t_load:.1f} s"
            )
            size = cell_batch or auto_cell_batch(spec.config(pending[0]), ds)
            grid = [c for c in cells if c.dataset == name]
            groups = [
                [grid[i] for i in g if grid[i].id not in done]
                for g in group_batches([spec.config(c) for c in grid], size)
            ]
            for group in (g for g in groups if g):
                # Every call makes progress: the check starts after this call's first cell.
                if deadline is not None and ran and deadline.too_late(first_block_s):
                    stopped = True
                    break
                cfgs = [spec.config(c) for c in group]
                k = cells.index(group[0]) + 1
                what = (
                    group[0].id
                    if len(group) == 1
                    else f"batch of {len(group)}: " + ", ".join(c.id for c in group)
                )
                log(
                    f"[{k}/{len(cells)}] {what}: {cfgs[0].epochs} local epoch(s), "
                    f"{cfgs[0].rounds} rounds; {cells_progress(len(done), len(cells), ran, t0)}"
                )
                kw: dict[str, Any] = dict(
                    meter=meter,
                    n_train_full=len(raw.y_train),
                    n_test_full=len(raw.y_test),
                    test_subsample=spec.test_subsample,
                    on_row=on_row,
                    log=log,
                    quiet=quiet,
                    checkpoint_every=checkpoint_every,
                    deadline=deadline,
                )
                try:
                    if len(group) == 1:
                        finished = [run_cell(group[0], cfgs[0], ds, out, **kw)]
                    else:
                        finished = run_cell_batch(group, cfgs, ds, out, **kw)
                except SweepStopped as err:
                    log(f"    {err}; rerun with the same --out to continue")
                    stopped = True
                    break
                for summary in finished:
                    done[summary["cell"]] = summary
                    ran.append(summary["cell"])
                    t = summary["timing"]
                    first_block_s = max(first_block_s, t["first_round_s"])
                    m = summary["last5"]
                    log(
                        f"    {summary['cell']} done in {t['wall_s']:.1f} s (CPU "
                        f"{t['cpu_s']:.1f} s; compile {t['backend_compile_s']:.1f} s, trace+lower "
                        f"{t['trace_s'] + t['lower_s']:.1f} s, cache hits {t['cache_hits']:.0f}): "
                        f"A {_fmt(m['A'])}  R {_fmt(m['R'])}  V {_fmt(m['V'])}"
                    )
                # Keep results.jsonl and table.md current, so a long sweep can be read mid-way.
                rebuild_results(out, spec, done)
                write_table(out, spec, done, env)
            del raw, ds
        cache_used = meter.totals["cache_requests"] > 0
    rows = rebuild_results(out, spec, done)
    write_table(out, spec, done, env)
    plot_sweep_curves(
        rows,
        out / "curves.png",
        spec,
        not_learned={(s["defense"], s["gamma"]) for s in done.values() if not _learned(s)},
    )
    record.update(
        status="stopped (time limit)" if stopped else "finished",
        finished_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        ran=ran,
        skipped=skipped,
        jax_cache_used=cache_used if ran else None,
        wall_s=round(time.perf_counter() - t0, 3),
        cpu_s=round(time.process_time() - c0, 3),
        cell_timing={cid: done[cid]["timing"] for cid in (c.id for c in cells) if cid in done},
    )
    _write_atomic(out / "sweep.json", json.dumps(record, indent=1))
    log(
        f"wrote {out / 'results.jsonl'}, {out / 'table.md'}, {out / 'curves.png'}, "
        f"{out / 'sweep.json'} ({record['wall_s']:.1f} s, CPU {record['cpu_s']:.1f} s)"
    )
    return SweepResult(out, ran, skipped, done, stopped)


# ----------------------------------------------------------------------------- table
def _learned(summary: Mapping[str, Any]) -> bool:
    """A cell summary's `learned` flag (summaries written before it existed count as learned)."""
    return bool(summary.get("learned", True))


# The undefended attack "implanted" when FedAvg's last-5-round R_excl_target (100 − attack
# success on triggered non-target images) is below this, i.e. attack success >= 80 %.
IMPLANTED_R_EXCL = 20.0


def _implanted(group: Sequence[Mapping[str, Any]]) -> bool | None:
    """Whether FedAvg's backdoor implanted in these cells (seeds averaged); None: no cells."""
    r = _mean(s["last5"].get("R_excl_target") for s in group)
    return None if r is None else r < IMPLANTED_R_EXCL


def _mean(xs: Iterable[float | None]) -> float | None:
    vals = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(vals) / len(vals) if vals else None


def _row_order(defenses: Sequence[str]) -> list[str]:
    """The paper's methods in its order, then any other defense in grid order."""
    return [d for d in PAPER_DEFENSES if d in defenses] + [
        d for d in defenses if d not in PAPER_DEFENSES
    ]


def _col_order(datasets: Sequence[str]) -> list[str]:
    return [d for d in PAPER_DATASETS if d in datasets] + [
        d for d in datasets if d not in PAPER_DATASETS
    ]


def _arrow(v: float | None, ref: float | None) -> str:
    """↑/↓ when `v` differs from the FedAvg value `ref` at the table's 2-decimal precision."""
    if v is None or ref is None or round(v, 2) == round(ref, 2):
        return ""
    return "↑" if v > ref else "↓"


def _cell_text(
    m: Mapping[str, float | None] | None,
    ref: Mapping[str, float | None] | None,
    bold_v: bool,
    dead: bool = False,
) -> str:
    """ "A / R / V" with arrows against `ref`; bold V when `bold_v`; ⚠ first when `dead`
    (the model stayed at chance: never bold)."""
    if m is None:
        return "–"
    bold_v = bold_v and not dead
    parts = []
    for key in ("A", "R", "V"):
        v = m.get(key)
        s = _fmt(v, 0)
        if key == "V" and bold_v and v is not None:
            s = f"**{s}**"
        parts.append(s + (_arrow(v, ref.get(key)) if ref is not None else ""))
    return ("⚠ " if dead else "") + " / ".join(parts)


def _implant_text(implanted: bool | None, group: Sequence[Mapping[str, Any]]) -> str:
    """FedAvg's implant status in one column: yes / no † with its R excl. target, or –."""
    if implanted is None:
        return "– (no FedAvg cell)"
    r = _fmt(_mean(s["last5"].get("R_excl_target") for s in group), 1).strip()
    return f"yes (R excl. target {r})" if implanted else f"no † (R excl. target {r})"


def _best(values: dict[str, float | None]) -> set[str]:
    vals = {k: round(v, 2) for k, v in values.items() if v is not None}
    if not vals:
        return set()
    top = max(vals.values())
    return {k for k, v in vals.items() if v == top}


def _data_lines(spec: SweepSpec, summaries: list[dict[str, Any]]) -> list[str]:
    from spmc_jax.data.sources import CIFAR10_JPEG_LABEL

    lines = []
    for name in _col_order(spec.datasets):
        s = next((x for x in summaries if x["dataset"] == name), None)
        if s is None:
            continue
        d = s["data"]
        train = (
            f"{d['n_train']:,} train images (stratified subsample of {d['n_train_full']:,})"
            if d["n_train"] < d["n_train_full"]
            else f"full train set ({d['n_train']:,})"
        )
        test = (
            f"{d['n_test']:,} test images (stratified subsample of {d['n_test_full']:,})"
            if d["n_test"] < d["n_test_full"]
            else f"full test set ({d['n_test']:,})"
        )
        label = f"{CIFAR10_JPEG_LABEL}, " if CIFAR10_JPEG_LABEL in d["source"] else ""
        lines.append(f"  - {_dataset_name(name)}: {label}{train}, {test}; source `{d['source']}`")
    return lines


_DATASET_NAMES = {"fashion_mnist": "FashionMNIST", "cifar10": "CIFAR-10", "mnist": "MNIST"}


def _dataset_name(name: str) -> str:
    return _DATASET_NAMES.get(name, name)


def render_table(
    spec: SweepSpec,
    summaries: dict[str, dict[str, Any]],
    env: dict[str, Any],
    published: dict[str, Any] | None = None,
) -> str:
    """table.md: the paper's Table 2 layout for this sweep, the published numbers under it.

    Per γ one table: rows = methods (paper order), columns = datasets (paper order), each
    cell "A / R / V" as last-5-round means (averaged over seeds), ↑/↓ against FedAvg in the
    same column, the best V per column in bold; under each method, in italics, the
    published numbers rendered the same way (arrows against the published FedAvg).
    """
    from spmc_jax.metrics import CHANCE_MARGIN

    published = published or load_published()
    pub = published_lookup(published)
    names = published.get("method_names", {})
    order = {c.id: i for i, c in enumerate(spec.cells())}
    done = sorted(
        (s for s in summaries.values() if s["cell"] in order), key=lambda s: order[s["cell"]]
    )
    cfg = spec.base.replace(protocol=spec.protocol)
    epochs = ", ".join(
        f"{names.get(d, d)} {cfg.replace(defense=d).epochs}" for d in _row_order(spec.defenses)
    )
    if spec.protocol == "paper":
        proto = "paper (as the reference ran Table 2: baselines 1 local epoch, SPMC 10)"
    else:
        proto = "fair (every method the same number of local epochs)"
    if spec.base.local_epochs is not None:
        proto += f"; overridden: every method {spec.base.local_epochs} local epoch(s)"
    pk = env.get("packages", {})
    pkgs = ", ".join(f"{k} {v}" for k, v in pk.items() if v)
    dev = env.get("device", {})
    seeds = ", ".join(str(s) for s in spec.seeds)
    b = spec.base
    models = ", ".join(
        f"{_dataset_name(d)} {spec.config(Cell(d, 'fedavg', 0.0, 0, spec.protocol)).model}"
        for d in _col_order(spec.datasets)
    )
    lines = [
        f"# SPMC sweep `{spec.preset}`: Table 2 layout",
        "",
        f"- protocol: **{proto}**; local epochs run: {epochs}",
        f"- rounds: {b.rounds}; A, R, V = means over the last "
        f"{min(5, -(-b.rounds // b.eval_every))} evaluated rounds"
        + (f" (mean over seeds {seeds})" if len(spec.seeds) > 1 else ""),
        f"- model: {models}; attack: `{b.attack}`; γ: "
        f"{', '.join(f'{g:g}' for g in spec.gammas)}; clients: "
        f"{b.clients} ({b.n_per_round}/round), {b.partition} partition (β {b.beta:g}); "
        f"seeds: {seeds}",
        "- data: "
        + ("full" if b.subsample is None else f"subsample {b.subsample:,}")
        + " train, "
        + ("full" if spec.test_subsample is None else f"subsample {spec.test_subsample:,}")
        + " test",
        *_data_lines(spec, done),
        f"- date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}; "
        f"device: {dev.get('backend', '?')} ({dev.get('device_kind', '?')} × "
        f"{dev.get('device_count', '?')}); git {env.get('git_commit')}",
        f"- packages: {pkgs}; python {env.get('python')}",
        f"- cells finished: {len(done)} of {len(spec.cells())}",
        "",
        "Each cell: A / R / V (%). ↑/↓: higher/lower than FedAvg in the same column. "
        "**Bold**: best V in the column among models that learned. ⚠: the model stayed at "
        f"chance accuracy (A within {CHANCE_MARGIN:g} points of 100/classes; `learned: false` "
        "in its cell "
        "summary): its R = 100 only means it predicts nothing, so it is never bold. "
        f"†: FedAvg's backdoor did not implant in this γ/dataset (its R excl. target ≥ "
        f"{IMPLANTED_R_EXCL:g}, i.e. attack success < {100 - IMPLANTED_R_EXCL:g} %): a high R "
        "there shows nothing about the defense (the line under each table gives FedAvg's "
        "R excl. target). "
        "R = 100 − attack success rate on all triggered test "
        "images (the reference's definition, target class included; `R_excl_target` in "
        "results.jsonl excludes it). The *published* line under each method is the paper's "
        f"{published.get('table', 'Table 2')} ({published.get('reporting', '')}).",
    ]
    cols = _col_order(spec.datasets)
    rows = _row_order(spec.defenses)
    for g in spec.gammas:
        ours: dict[tuple[str, str], dict[str, float | None]] = {}
        dead: set[tuple[str, str]] = set()
        for d in rows:
            for ds in cols:
                group = [
                    s for s in done if s["defense"] == d and s["dataset"] == ds and s["gamma"] == g
                ]
                if group:
                    ours[d, ds] = {k: _mean(s["last5"][k] for s in group) for k in ("A", "R", "V")}
                    if not all(_learned(s) for s in group):
                        dead.add((d, ds))
        fedavg = {
            ds: [s for s in done if (s["defense"], s["dataset"], s["gamma"]) == ("fedavg", ds, g)]
            for ds in cols
        }
        implanted = {ds: _implanted(fedavg[ds]) for ds in cols}
        theirs = {(d, ds): pub[g, d, ds] for d in rows for ds in cols if (g, d, ds) in pub}
        best_ours = {
            ds: _best({d: v["V"] for (d, c), v in ours.items() if c == ds and (d, c) not in dead})
            for ds in cols
        }
        best_pub = {
            ds: _best({d: theirs[d, ds]["V"] for d in rows if (d, ds) in theirs}) for ds in cols
        }
        lines += [
            "",
            f"## γ = {g:g}",
            "",
            "| method | " + " | ".join(_dataset_name(c) for c in cols) + " |",
            "|---" * (len(cols) + 1) + "|",
        ]
        for d in rows:
            cells = [
                _cell_text(
                    ours.get((d, ds)),
                    None if d == "fedavg" else ours.get(("fedavg", ds)),
                    d in best_ours[ds],
                    dead=(d, ds) in dead,
                )
                + (" †" if implanted[ds] is False and (d, ds) in ours else "")
                for ds in cols
            ]
            lines.append(f"| {names.get(d, d)} | " + " | ".join(cells) + " |")
            if any((d, ds) in theirs for ds in cols):
                pcells = []
                for ds in cols:
                    t = _cell_text(
                        theirs.get((d, ds)),
                        None if d == "fedavg" else theirs.get(("fedavg", ds)),
                        d in best_pub[ds],
                    )
                    pcells.append("–" if t == "–" else f"*{t}*")
                lines.append("| *published* | " + " | ".join(pcells) + " |")
        lines += [
            "",
            "FedAvg's backdoor implanted (R excl. target < "
            f"{IMPLANTED_R_EXCL:g}) at γ = {g:g}: "
            + "; ".join(
                f"{_dataset_name(ds)} {_implant_text(implanted[ds], fedavg[ds])}" for ds in cols
            ),
        ]
    lines += [
        "",
        "## Cells",
        "",
        "| cell | local epochs | R excl. target | attackers' weight | wall s | CPU s | "
        "compile s | trace+lower s | cache hits | s/round after the first |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in done:
        t = s["timing"]
        later = "–" if t.get("later_round_s") is None else f"{t['later_round_s']:.2f}"
        r_excl = _fmt(s["last5"]["R_excl_target"], 1).strip()
        lines.append(
            f"| {s['cell']} | {s['local_epochs']} | {r_excl} | "
            f"{s['mean_attacker_weight']:.3f} | {t['wall_s']:.1f} | {t['cpu_s']:.1f} | "
            f"{t['backend_compile_s']:.1f} | {t['trace_s'] + t['lower_s']:.1f} | "
            f"{t['cache_hits']:.0f} | {later} |"
        )
    lines += [
        "",
        "compile s: XLA compile wall time (on a persistent-cache hit, the load time); "
        "trace+lower: JAX tracing and lowering, paid by every cell.",
    ]
    if published.get("best_v"):
        lines += [
            "",
            f"Published bold: {published['best_v']}; the *published* lines here bold "
            "the largest V.",
        ]
    if published.get("inconsistencies"):
        lines += [
            "",
            "Published rows where V ≠ (A + R)/2 in the paper itself: "
            + "; ".join(published["inconsistencies"])
            + ".",
        ]
    return "\n".join(lines) + "\n"


def write_table(
    out: Path, spec: SweepSpec, done: dict[str, dict[str, Any]], env: dict[str, Any]
) -> None:
    _write_atomic(out / "table.md", render_table(spec, done, env))


# ----------------------------------------------------------------------------- figure
def plot_sweep_curves(
    rows: list[dict[str, Any]],
    path: Path,
    spec: SweepSpec,
    not_learned: set[tuple[str, float]] | frozenset[tuple[str, float]] = frozenset(),
) -> str | None:
    """The paper's Figure 6 layout: per γ (a row), A and R per round, one line per defense.

    The dataset is CIFAR-10 when the grid has it (as in the paper), else the grid's first
    dataset; values are averaged over seeds. Rounds are numbered from 1 (integer ticks).
    A (defense, γ) in `not_learned` (a cell stayed at chance accuracy) is drawn dashed and
    its legend entry says "chance level". Returns the dataset plotted (None: no rows).
    """
    # A bare Figure, not pyplot: no global backend switch (a notebook keeps its own) and no
    # figure left registered in pyplot's state.
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    dataset = "cifar10" if "cifar10" in spec.datasets else spec.datasets[0]
    rows = [r for r in rows if r["dataset"] == dataset and r["A"] is not None]
    if not rows:
        return None
    names = load_published().get("method_names", {})
    defenses = _row_order(spec.defenses)
    n_g = len(spec.gammas)
    fig = Figure(figsize=(9.0, 3.0 * n_g + 0.8))
    axes = fig.subplots(n_g, 2, squeeze=False)
    colors = [matplotlib.colormaps["tab10"](i) for i in range(10)]  # 10 baselines, SPMC in black
    for gi, g in enumerate(spec.gammas):
        for ki, key in enumerate(("A", "R")):
            ax = axes[gi, ki]
            for di, d in enumerate(defenses):
                by_round: dict[int, list[float]] = {}
                for r in rows:
                    if r["defense"] == d and r["gamma"] == g and r[key] is not None:
                        by_round.setdefault(r["round"], []).append(r[key])
                if not by_round:
                    continue
                xs = sorted(by_round)
                ys = [sum(by_round[x]) / len(by_round[x]) for x in xs]
                spmc = d == "spmc"
                dead = (d, g) in not_learned
                ax.plot(
                    xs,  # rows are numbered from 1
                    ys,
                    label=names.get(d, d) + (" (⚠ chance level)" if dead else ""),
                    ls="--" if dead else "-",
                    color="black" if spmc else colors[di % len(colors)],
                    lw=2.2 if spmc else 1.2,
                    marker="o" if len(xs) < 10 else None,
                    ms=3,
                    zorder=3 if spmc else 2,
                )
            dashed = any((d, g) in not_learned for d in defenses)
            ax.set_title(
                f"{key} per round, γ = {g:g}" + (" (dashed: ⚠ chance level)" if dashed else ""),
                fontsize=10,
            )
            ax.set_ylim(-3, 103)  # the paper's fixed 0-100 % scale, comparable across panels
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("round")
            ax.set_ylabel(f"{key} (%)")
            ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False
    )
    fig.suptitle(
        f"{_dataset_name(dataset)}, attack {spec.base.attack}, {spec.protocol} protocol",
        fontsize=10,
    )
    legend_in = 0.1 + 0.2 * math.ceil(len(labels) / 6)  # inches below the panels
    fig.tight_layout(rect=(0, legend_in / (3.0 * n_g + 0.8), 1, 1))
    fig.savefig(path, dpi=110)
    return dataset


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m spmc_jax.sweep",
        description=(
            "Run a grid of federations (datasets x defenses x gamma x seeds) and render the "
            "SPMC paper's Table 2 layout with the published numbers side by side. Resumable: "
            "rerunning with the same --out skips finished cells. Presets: "
            + "; ".join(f"{k}: {v['description']}" for k, v in PRESETS.items())
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--preset", help=f"the grid to run, one of {', '.join(PRESETS)} (default: none; required)"
    )
    p.add_argument(
        "--out",
        help="output directory; an existing one is resumed (default: none; required)",
    )
    p.add_argument(
        "--protocol",
        default=None,
        help=f"{'/'.join(PROTOCOLS)}: paper = SPMC 10 local epochs, baselines 1 (as the "
        "reference ran Table 2); fair = every method 10 (default: the preset's, else paper)",
    )
    p.add_argument(
        "--datasets",
        nargs="+",
        metavar="NAME",
        help=f"datasets to run, from {', '.join(DATASETS)} (default: the preset's)",
    )
    p.add_argument(
        "--defenses",
        nargs="+",
        metavar="NAME",
        help="defenses to run, or 'all' for every registered rule; 'python -m spmc_jax.train "
        "--defense help' lists them (default: the preset's)",
    )
    p.add_argument(
        "--gammas",
        nargs="+",
        type=float,
        metavar="G",
        help="malicious ratios to run (default: the preset's)",
    )
    p.add_argument(
        "--seeds", nargs="+", type=int, metavar="S", help="seeds to run (default: the preset's)"
    )
    p.add_argument("--rounds", type=int, help="rounds per cell (default: the preset's)")
    p.add_argument(
        "--subsample",
        help="N training images (class-stratified) or 'full' (default: the preset's)",
    )
    p.add_argument(
        "--test-subsample",
        help="N test images (class-stratified) or 'full' (default: the preset's)",
    )
    p.add_argument("--clients", type=int, help="registered clients N (default: the preset's)")
    p.add_argument(
        "--local-epochs",
        type=int,
        help="local epochs for every method, overriding --protocol (default: as --protocol says)",
    )
    p.add_argument(
        "--attack", help="attack name(s) joined by '+' (default: the preset's, else base)"
    )
    p.add_argument(
        "--model", help=f"one of {', '.join(MODELS)} (default: the preset's, else simple_cnn)"
    )
    p.add_argument(
        "--batch-size", type=int, help="local SGD mini-batch size (default: the preset's, else 64)"
    )
    p.add_argument(
        "--cpu-dot-fusion",
        help="auto/ynn/off: XLA:CPU's YNNPACK dot fusion, as spmc_jax.train --cpu-dot-fusion "
        "(default: auto; off reproduces figures measured before it became the default)",
    )
    p.add_argument(
        "--data-dir",
        help="directory holding the dataset files (default: as spmc_jax.train --data-dir)",
    )
    p.add_argument(
        "--no-fetch", action="store_true", help="fail instead of fetching a missing dataset"
    )
    p.add_argument(
        "--no-jax-cache",
        action="store_true",
        help="do not use JAX's persistent compilation cache in OUT/.jax_cache",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the grid, list its cells (finished or not) and exit",
    )
    p.add_argument(
        "--list-presets", action="store_true", help="list the presets with their grids and exit"
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="N",
        help="save the running cell's state every N rounds, so a killed sweep resumes that "
        "cell mid-way (same numbers) instead of from round 1; 0 = off",
    )
    p.add_argument(
        "--quiet", action="store_true", help="print no per-round lines, only one line per cell"
    )
    p.add_argument(
        "--cell-batch",
        default="auto",
        metavar="N",
        help="run up to N cells that share a program (same dataset and method; seeds and, "
        "where no program reads the attacker count, gammas differ) as one batched program: "
        "same numbers as one by one; 'auto' (default): as many as the memory estimate fits "
        "on an accelerator, 1 on CPU (no faster there once compiled); 1 = one by one",
    )
    p.add_argument(
        "--cpu-devices",
        type=int,
        default=None,
        metavar="N",
        help="split the host CPU into N JAX devices so each cell's clients train on them in "
        "parallel (as spmc_jax.train --cpu-devices); 1 keeps one device (default: one per "
        "allowed core from the command line unless --cell-batch is above 1, whose batches "
        "run on one device)",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        metavar="SECONDS",
        help="stop (checkpointing the running cell or batch) before this many seconds have "
        "passed; exit code 3 = unfinished, rerun with the same --out to continue "
        "(default: no limit)",
    )
    return p


STOPPED_EXIT_CODE = 3  # main's exit code when --time-limit stopped the sweep before its end


def _cell_batch(value: str) -> int | None:
    """'auto' -> None, else an integer >= 1."""
    if value == "auto":
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"--cell-batch expects 'auto' or an integer >= 1, got {value!r}")
    return n


def _split(values: Sequence[str] | None) -> list[str] | None:
    """`--defenses a b,c` -> [a, b, c]."""
    if values is None:
        return None
    return [v for item in values for v in item.split(",") if v]


def _apply_cpu_devices(n: int | None, cell_batch: int | None, *, cli: bool) -> None:
    """Set the CPU split (`--cpu-devices`), or from the command line its default: one device
    per allowed core (`sharding.default_cpu_device_count`), so each cell's clients train one
    per core, except with --cell-batch above 1 (a batch runs on one device)."""
    from spmc_jax.sharding import default_cpu_device_count, set_cpu_devices

    batched = cell_batch is not None and cell_batch > 1
    if n is not None and n > 1 and batched:
        raise ValueError(
            f"--cpu-devices {n} with --cell-batch {cell_batch}: a cell batch runs on one "
            "device; accepted: --cpu-devices 1, or --cell-batch 1 or auto"
        )
    if n is None and cli and not batched:
        n = default_cpu_device_count()
    if n is not None:
        set_cpu_devices(n)


def _count(flag: str, value: str | None) -> int | str | None:
    """'full' -> None, digits -> int, absent -> 'keep'."""
    if value is None:
        return "keep"
    if value.lower() in ("full", "none"):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{flag} expects an integer or 'full', got {value!r}") from None


def spec_from_args(args: argparse.Namespace) -> SweepSpec:
    """The SweepSpec of parsed command-line arguments (validated)."""
    if not args.preset:
        raise ValueError(f"--preset is required; accepted: {', '.join(PRESETS)}")
    if not args.out:
        raise ValueError("--out DIR is required")
    sub = _count("--subsample", args.subsample)
    test_sub = _count("--test-subsample", args.test_subsample)
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise ValueError(f"--data-dir {args.data_dir!r} is not a readable directory")
    return make_spec(
        args.preset,
        datasets=_split(args.datasets),
        defenses=_split(args.defenses),
        gammas=args.gammas,
        seeds=args.seeds,
        protocol=args.protocol,
        test_subsample="preset" if test_sub == "keep" else test_sub,
        subsample=None if sub == "keep" else ("full" if sub is None else sub),
        rounds=args.rounds,
        clients=args.clients,
        local_epochs=args.local_epochs,
        attack=args.attack,
        model=args.model,
        batch_size=args.batch_size,
        cpu_dot_fusion=args.cpu_dot_fusion,
        data_dir=args.data_dir,
        fetch=False if args.no_fetch else None,
    ).validate()


def list_presets() -> str:
    lines = []
    for name, p in PRESETS.items():
        grid = ", ".join(f"{k}={','.join(str(x) for x in v)}" for k, v in p["grid"].items())
        cfg = ", ".join(f"{k}={v}" for k, v in p["config"].items())
        for d, o in p.get("dataset_config", {}).items():
            cfg += "; " + ", ".join(f"{d}: {k}={v}" for k, v in o.items())
        lines += [
            f"{name}: {p['description']}",
            f"  grid: {grid}",
            f"  config: {cfg}; test_subsample={p['test_subsample']}",
        ]
    return "\n".join(lines)


def main(
    argv: list[str] | None = None,
    dataset_loader: DatasetLoader | None = None,
    jax_cache: bool = True,
    *,
    cli: bool = False,
) -> int:
    """The CLI. `dataset_loader` replaces the dataset loading (tests); `cli=True` (the
    `python -m` entry point) also applies the command line's CPU split (`--cpu-devices`'s
    default), which must precede the backend's start; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.list_presets:
        print(list_presets())
        return 0
    from spmc_jax.data.sources import DatasetNotFoundError

    try:
        spec = spec_from_args(args)
        cell_batch = _cell_batch(args.cell_batch)
        _apply_cpu_devices(args.cpu_devices, cell_batch, cli=cli)
        from spmc_jax.compile_options import resolve_cpu_dot_fusion

        # One setting for every cell (each resolves it for its own model): an explicit "ynn"
        # that cannot apply here is an error before any cell runs.
        for c in spec.cells()[:1]:
            resolve_cpu_dot_fusion(spec.config(c).cpu_dot_fusion)
        if args.time_limit is not None and not args.time_limit > 0:
            raise ValueError(f"--time-limit must be > 0 seconds, got {args.time_limit}")
        if args.checkpoint_every < 0:
            raise ValueError(
                f"--checkpoint-every must be >= 0 (0 = off), got {args.checkpoint_every}"
            )
        out = Path(args.out)
        if args.dry_run:
            done = load_finished(out, spec) if out.is_dir() else {}
            for c in spec.cells():
                print(
                    f"{'done' if c.id in done else 'todo'}  {c.id}  "
                    f"({spec.config(c).epochs} local epochs)"
                )
            print(f"dry run: {len(spec.cells())} cells, {len(done)} finished")
            return 0
        result = run_sweep(
            spec,
            out,
            dataset_loader=dataset_loader,
            jax_cache=jax_cache and not args.no_jax_cache,
            quiet=args.quiet,
            log=lambda s: print(s, flush=True),
            checkpoint_every=args.checkpoint_every,
            cell_batch=cell_batch,
            time_limit=args.time_limit,
        )
    except (ValueError, DatasetNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return STOPPED_EXIT_CODE if result.stopped else 0


if __name__ == "__main__":
    sys.exit(main(cli=True))
