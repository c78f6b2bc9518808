"""Federations on an axis: many cells of a sweep trained by one jitted program.

A federation's round is a pure function `Simulation._round(state, data, r)` of its state
(global model, aggregator state, teachers, PRNG key) and its data (partition, attacker mask,
poison flags, images); everything else is static configuration. Cells whose static
configuration is the same (`batch_key`: the same dataset, rule, attack, model and protocol;
seeds and, where no program reads the attacker count, γ may differ) therefore run as
`vmap(_round)` over a leading federation axis, each with its own key, partition, attacker
mask, state and teachers, inside one `lax.scan` over rounds: one compiled program per batch.

Results equal each cell run alone (`engine.run`) up to float32 summation order:

* every per-federation input is the one the cell builds alone (`make_plan` with its seed and
  γ, the same poison draw and model initialisation);
* shapes are padded to the batch's maximum (client index rows to the widest partition,
  local steps to the most batches per epoch). Padding changes no random draw: a client's
  epoch order draws one uniform per index slot, and under JAX's partitionable threefry
  (`jax_threefry_partitionable`, the default since JAX 0.5) the first `max_samples` draws do
  not depend on how many slots follow, so the valid samples' order is the alone run's;
  steps past a client's own batches are masked no-ops. `BatchedSimulation` refuses padding
  when that flag is off;
* images a batch shares (the same training set, the test set) are stored once and broadcast
  (`in_axes=None`), so B federations cost B × the per-federation memory, not B × the data.

`max_cell_batch` sizes a batch from the plan's memory estimate; `run_batch` is `engine.run`
for a batch (same evaluation blocks, same history rows per cell).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spmc_jax.aggregators import REGISTRY as AGGREGATORS
from spmc_jax.attacks import REGISTRY as ATTACKS
from spmc_jax.attacks import split_names
from spmc_jax.client import ClientData
from spmc_jax.config import Config
from spmc_jax.data.types import INPUT_SHAPE, Dataset
from spmc_jax.engine import (
    Plan,
    RunState,
    SimData,
    Simulation,
    _resized,
    _subsample,
    _to_host,
    attacker_ranks,
    block_rows,
    make_plan,
    poison_draw,
)

# Attacks whose construction reads `AttackEnv.num_malicious` (⌊n·γ⌋): cells with different
# attacker counts cannot share their program. tests/test_batch.py checks this list against
# the attack sources.
ATTACKS_READING_NUM_MALICIOUS = frozenset({"alie", "alter_min", "dba", "fang_krum", "scaling"})

# Config fields that are per-federation inputs of a batch (not part of its program).
PER_FEDERATION_FIELDS = ("seed", "gamma")
_IGNORED_FIELDS = ("out", "data_dir", "fetch")


def batch_key(cfg: Config) -> str:
    """The static configuration of a cell's program: cells with equal keys can share a batch.

    Seeds always may differ. γ may differ unless the rule (`needs_num_malicious`, e.g. Krum,
    Bulyan, DnC) or an attack (`ATTACKS_READING_NUM_MALICIOUS`) builds its program from the
    attacker count; then the count is part of the key (γ values with the same ⌊n·γ⌋ still
    batch together).
    """
    d = cfg.to_dict()
    for k in (*PER_FEDERATION_FIELDS, *_IGNORED_FIELDS):
        d.pop(k)
    derived = d["derived"]
    if not AGGREGATORS.get(cfg.defense).needs_num_malicious:
        derived.pop("defense_assumed_malicious")
    if not ATTACKS_READING_NUM_MALICIOUS & set(split_names(cfg.attack)):
        derived.pop("num_malicious")
    if reads_attacker_data(cfg):
        # The hook's server-side sample of the attackers' images is built per federation on
        # the host (Simulation._attacker_sample): such a cell runs alone.
        d["alone"] = [cfg.seed, cfg.gamma]
    return json.dumps(d, sort_keys=True, default=str)


def reads_attacker_data(cfg: Config) -> bool:
    """Whether a training-time attack of `cfg` optimises its trigger on the attackers' data
    each round (attack kind "client_data": A3FL, IBA)."""
    return any(ATTACKS.get(n).kind == "client_data" for n in split_names(cfg.attack))


def group_batches(cfgs: Sequence[Config], size: int) -> list[list[int]]:
    """Indices of `cfgs` split into batches of at most `size` cells with equal `batch_key`,
    in order of first appearance (cells keep their relative order inside a batch).

    Raises:
      ValueError: `size` < 1.
    """
    if size < 1:
        raise ValueError(f"cell batch size {size}; accepted: an integer >= 1")
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(cfgs):
        groups.setdefault(batch_key(c), []).append(i)
    return [g[j : j + size] for g in groups.values() for j in range(0, len(g), size)]


def max_cell_batch(plan: Plan) -> int | None:
    """How many federations like `plan`'s fit the device memory budget at once.

    Per federation: the plan's estimate without its data (client training, the client
    matrices, SPMC's teachers); the data is counted once (shared by the batch). None when
    the budget is unknown.
    """
    mem = plan.memory
    budget = mem.get("budget", 0.0)
    if not budget:
        return None
    per_federation = max(mem["total"] - mem["data"], 1.0)
    return max(1, int((budget - mem["data"]) // per_federation))


@dataclasses.dataclass
class BatchResult:
    """What `run_batch` returns: one history per federation, in batch order."""

    histories: list[list[dict[str, Any]]]
    states: RunState  # stacked over the federation axis
    bsim: BatchedSimulation


class BatchedSimulation:
    """The federations of `cfgs` (equal `batch_key`) as one program over a federation axis.

    Attributes:
      cfgs, plans: per federation.
      sim: the template `Simulation` (the first cell's configuration, steps padded to the
        batch's maximum); its `_round` and `_evaluate` are vmapped.
      data: the batch's `SimData`: per-federation fields stacked on a leading axis, shared
        images stored once (`data_axes` says which is which).
    """

    def __init__(
        self, cfgs: Sequence[Config], ds: Dataset, plans: Sequence[Plan] | None = None
    ) -> None:
        """Build the batch (validates before any device work).

        Raises:
          ValueError: no cells, cells with different static configurations, or a client
            mesh (batches run on one device).
        """
        cfgs = list(cfgs)
        if not cfgs:
            raise ValueError("a batch needs at least one cell; got none")
        key0 = batch_key(cfgs[0])
        for c in cfgs[1:]:
            if batch_key(c) != key0:
                a, b = json.loads(key0), json.loads(batch_key(c))
                diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                raise ValueError(
                    f"cells cannot share a program: {c.defense}/seed {c.seed}/γ {c.gamma:g} "
                    f"differs from {cfgs[0].defense}/seed {cfgs[0].seed}/γ {cfgs[0].gamma:g} in "
                    f"{', '.join(diff)}; accepted: cells that differ only in "
                    f"{', '.join(PER_FEDERATION_FIELDS)} (see spmc_jax.batch.batch_key)"
                )
        self.cfgs = cfgs
        self.plans = list(plans) if plans is not None else [make_plan(c, ds) for c in cfgs]
        width = max(p.partition.max_samples for p in self.plans)
        steps = max(p.steps_per_epoch for p in self.plans)
        padded = any(p.partition.max_samples != width for p in self.plans)
        if padded and not getattr(jax.config, "jax_threefry_partitionable"):  # noqa: B009 (untyped)
            raise ValueError(
                "federations of different partition widths need jax_threefry_partitionable=True "
                "(a client's epoch order must not depend on padding); accepted: that flag on, "
                "or --cell-batch 1"
            )
        if len(cfgs) > 1 and reads_attacker_data(cfgs[0]):
            raise ValueError(
                f"--attack {cfgs[0].attack!r} optimises its trigger on each federation's own "
                "attackers' data: such cells cannot share a program; accepted: --cell-batch 1"
            )
        self.width, self.steps_per_epoch = width, steps
        template = dataclasses.replace(self.plans[0], steps_per_epoch=steps)
        self.sim = Simulation(cfgs[0], ds, template, place_data=False)
        if self.sim.mesh is not None:
            raise ValueError(
                f"a cell batch runs on one device, but the configuration shards clients over "
                f"{self.sim.mesh.size}; accepted: --devices 1 or --cell-batch 1"
            )
        self.data, self.data_axes = self._device_data(ds)
        self.run_rounds = self.sim.jit(self._run_rounds, static_argnums=(2,))
        self.evaluate = self.sim.jit(jax.vmap(self.sim._evaluate, in_axes=(0, self.data_axes, 0)))

    @property
    def size(self) -> int:
        return len(self.cfgs)

    def _device_data(self, ds: Dataset) -> tuple[SimData, SimData]:
        cfgs, plans, n = self.cfgs, self.plans, self.size
        subs = [_subsample(ds, c.subsample, c.seed) for c in cfgs]
        # One training set for all when no cell subsamples or all subsample with one seed.
        shared = all(c.subsample is None for c in cfgs) or len({c.seed for c in cfgs}) == 1
        n_train = len(subs[0].y_train)
        proxy = np.asarray(plans[0].proxy_indices, np.int64)

        def images(s: Dataset) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
            return (
                _resized(s.x_train)[None],  # one block: (1, n_train, 32, 32, C)
                jnp.asarray(s.y_train, jnp.int32)[None],
                _resized(s.x_train[proxy]),
                jnp.asarray(s.y_train[proxy], jnp.int32),
            )

        if shared:
            x, y, px, py = images(subs[0])
        else:
            x, y, px, py = (jnp.stack(a) for a in zip(*(images(s) for s in subs), strict=True))
        ax = None if shared else 0
        idx = np.zeros((n, cfgs[0].clients, self.width), np.int32)
        for f, p in enumerate(plans):
            part = p.partition
            valid = np.arange(part.max_samples)[None, :] < part.sizes[:, None]
            # Global sample indices (the block is the whole training set); padding 0.
            idx[f, :, : part.max_samples] = np.where(valid, part.indices, 0)
        rate = self.sim.poison_rate
        data = SimData(
            train=ClientData(
                x=x,
                y=y,
                poison=jnp.asarray(np.stack([poison_draw(c.seed, n_train, rate) for c in cfgs]))[
                    :, None
                ],
            ),
            idx=jnp.asarray(idx),
            sizes=jnp.asarray(np.stack([p.partition.sizes for p in plans]), jnp.int32),
            malicious=jnp.asarray(np.stack([p.malicious for p in plans])),
            rank=jnp.asarray(np.stack([attacker_ranks(p.malicious) for p in plans])),
            proxy=ClientData(x=px, y=py, poison=jnp.zeros((n, len(proxy)), bool)),
            x_test=_resized(ds.x_test),
            y_test=jnp.asarray(ds.y_test, jnp.int32),
        )
        axes = SimData(
            train=ClientData(x=ax, y=ax, poison=0),  # type: ignore[arg-type]
            idx=0,  # type: ignore[arg-type]
            sizes=0,  # type: ignore[arg-type]
            malicious=0,  # type: ignore[arg-type]
            rank=0,  # type: ignore[arg-type]
            proxy=ClientData(x=ax, y=ax, poison=0),  # type: ignore[arg-type]
            x_test=None,  # type: ignore[arg-type]
            y_test=None,  # type: ignore[arg-type]
        )
        return data, axes

    def federation_data(self, f: int) -> SimData:
        """Federation f's `SimData` (its slice of every per-federation field)."""

        def pick(a: Any, ax: Any) -> Any:
            return a if ax is None else a[f]

        fields: dict[str, Any] = {}
        for name in SimData._fields:
            a, ax = getattr(self.data, name), getattr(self.data_axes, name)
            if isinstance(a, ClientData):
                fields[name] = ClientData(*(pick(v, x) for v, x in zip(a, ax, strict=True)))
            else:
                fields[name] = pick(a, ax)
        return SimData(**fields)

    def init_states(self) -> RunState:
        """Every federation's state before round 0, stacked: its seed's initial model (the
        same eager `model.init` as the alone run) and round key."""
        sim = self.sim
        states: list[RunState] = []
        for c in self.cfgs:
            if c.seed == self.cfgs[0].seed:
                flat, round_key = sim.init_flat, sim.round_key
            else:
                init_key, round_key = jax.random.split(jax.random.key(c.seed))
                variables = sim.model.init(init_key, jnp.zeros((1, *INPUT_SHAPE)), train=False)
                flat = sim.flat.ravel(variables)
            # Federation f's own data: rules that need the proxy set build with it bound.
            states.append(sim.initial_state(flat, round_key, self.federation_data(len(states))))
        return jax.tree.map(lambda *xs: jnp.stack(xs), *states)

    def _run_rounds(self, states: RunState, data: SimData, count: int, start: jax.Array):
        step = jax.vmap(self.sim._round, in_axes=(0, self.data_axes, None))
        return jax.lax.scan(lambda s, r: step(s, data, r), states, start + jnp.arange(count))


def select(states: RunState, f: int) -> RunState:
    """Federation `f`'s state out of a stacked batch state."""
    return jax.tree.map(lambda a: a[f], states)


def run_batch(
    bsim: BatchedSimulation,
    on_round: Callable[[int, dict[str, Any]], None] | None = None,
    *,
    states: RunState | None = None,
    start_round: int = 0,
    histories: Sequence[list[dict[str, Any]]] | None = None,
    on_checkpoint: Callable[[RunState, int, float], None] | None = None,
) -> BatchResult:
    """`engine.run` for a batch: every federation trains `rounds` rounds, evaluated every
    `eval_every` (all cells of a batch share both).

    Args:
      bsim: the batch.
      on_round: `on_round(f, row)` with federation f's row as soon as its block finishes.
      states: the stacked states after `start_round` rounds (resuming); None: fresh.
      start_round: rounds already completed (blocks stay aligned to `eval_every`).
      histories: per federation, the rows of the completed rounds.
      on_checkpoint: `on_checkpoint(states, rounds_done, block_seconds)` after each block's
        rows went to `on_round` (saving a checkpoint, stopping before a time limit).

    Returns:
      A BatchResult with one `engine.run`-style history per federation.

    Raises:
      ValueError: `start_round` outside [0, rounds], or > 0 without `states`.
    """
    cfg = bsim.cfgs[0]
    if not 0 <= start_round <= cfg.rounds:
        raise ValueError(f"start_round={start_round}; accepted: 0..{cfg.rounds} (cfg.rounds)")
    if start_round > 0 and states is None:
        raise ValueError(f"start_round={start_round} needs the states after those rounds")
    states = bsim.init_states() if states is None else states
    hist = [list(h) for h in histories] if histories is not None else [[] for _ in bsim.cfgs]
    malicious = [np.asarray(p.malicious) for p in bsim.plans]
    r = start_round
    while r < cfg.rounds:
        count = min(cfg.eval_every - r % cfg.eval_every, cfg.rounds - r)
        t0 = time.perf_counter()
        states, outs = bsim.run_rounds(states, bsim.data, count, jnp.asarray(r, jnp.int32))
        metrics = _to_host(bsim.evaluate(states.global_flat, bsim.data, states.hooks))
        outs = _to_host(outs)
        block_s = time.perf_counter() - t0
        for f in range(bsim.size):
            outs_f = jax.tree.map(lambda a, f=f: a[:, f], outs)
            metrics_f = {k: v[f] for k, v in metrics.items()}
            for row in block_rows(outs_f, metrics_f, r, malicious[f], block_s / count):
                hist[f].append(row)
                if on_round is not None:
                    on_round(f, row)
        r += count
        if on_checkpoint is not None:
            on_checkpoint(states, r, block_s)
    return BatchResult(hist, states, bsim)
