"""Save and restore the whole state of a training run (orbax), so a killed run can resume.

A checkpoint is written after round r (rounds are numbered 1..rounds everywhere, so
`rounds_done` = r, the orbax step and the checkpoint's folder name) and holds two items:

  state  the `engine.RunState` pytree: global model, aggregator state (e.g. FoolsGold's
         per-client histories), SPMC's teachers and their ids, and the PRNG key (stored as its
         raw `jax.random.key_data`, so any orbax version reads it; its implementation name is
         kept in `meta` and re-wrapped on restore);
  meta   JSON: format version, rounds_done, the run's `Config.to_dict()`, the client mesh
         size, the key implementations and package versions.

`Checkpointer.restore` reads the latest (or a given) checkpoint into the shapes, dtypes and
shardings of a template state (`Simulation.init_state()`), so a client-sharded or replicated
state comes back placed like the live one, and orbax reads each host's shards on multi-host
runs. Round r's randomness is `fold_in(state.key, r)` (engine.py), so the resumed run
reproduces the uninterrupted one bit for bit on the same backend.

Resuming is refused (`check_resume`) when the stored run differs from the current one in
anything that changes the numbers: every `Config` field except `RESUME_IGNORED_KEYS` (where the
outputs go, where the data is read from, what is evaluated when, and multi-host wiring), plus
the client mesh size (with client data in blocks it stratifies the sampling). `rounds` may
change, because a round only depends on the total round count through

  * the attack window when `attack_end` is unset (last attacked round = rounds): every
    completed round r ≤ rounds_done ≤ min(old, new) is attacked under both counts;
  * CRFL's last-round rule (no noise in round `AggregatorEnv.rounds` − 1, the only use of
    `AggregatorEnv.rounds` in spmc_jax/aggregators): equal for the completed rounds only when
    neither count's last round is among them, i.e. rounds_done < min(old, new)
    (`ROUNDS_DEPENDENT_DEFENSES`);

and it may never drop below the rounds already done.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from spmc_jax.runinfo import package_versions

State = TypeVar("State")

CHECKPOINT_SUBDIR = "checkpoints"  # under a run's --out
FORMAT = 1
DEFAULT_KEEP = 2

# Config keys that never change the trained numbers: outputs and data location (the data is
# named by dataset/subsample/seed, which are compared), evaluation cadence and batching
# (evaluation never feeds back into training; blocks of different lengths give bit-identical
# states, and resumed blocks stay aligned to multiples of eval_every), and device/host wiring
# (`devices` only matters through the mesh size, compared as `client_devices`).
RESUME_IGNORED_KEYS = frozenset(
    {
        "out",
        "data_dir",
        "fetch",
        "eval_every",
        "eval_batch",
        "devices",
        "coordinator",
        "num_processes",
        "process_id",
    }
)
# Defenses whose round function reads `AggregatorEnv.rounds` (CRFL: no noise in the last round).
ROUNDS_DEPENDENT_DEFENSES = frozenset({"crfl"})


# ----------------------------------------------------------------------------- config check
def _jsonable(d: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON round trip of `d` (tuples become lists), as stored in `meta`."""
    return json.loads(json.dumps(dict(d)))


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


_MISSING = "<missing>"


def config_diff(
    stored: Mapping[str, Any], current: Mapping[str, Any], rounds_done: int
) -> dict[str, tuple[Any, Any]]:
    """The keys whose difference makes a resumed run's numbers differ from an uninterrupted one.

    Nested dicts (`derived`) are compared key by key ("derived.defense_options.space").
    `RESUME_IGNORED_KEYS` are skipped; `rounds` is reported only when it falls below
    `rounds_done` or, for `ROUNDS_DEPENDENT_DEFENSES`, when a completed round is the last
    round of either count (see the module docstring).

    Args:
      stored: the checkpoint's `Config.to_dict()`.
      current: the current run's `Config.to_dict()`.
      rounds_done: completed rounds in the checkpoint.

    Returns:
      {key: (stored value, current value)}, empty when resuming is safe.
    """
    old, new = _flatten(_jsonable(stored)), _flatten(_jsonable(current))
    diff: dict[str, tuple[Any, Any]] = {}
    for key in sorted(old.keys() | new.keys()):
        if key in RESUME_IGNORED_KEYS or key == "rounds":
            continue
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        if a != b:
            diff[key] = (a, b)
    r_old, r_new = old.get("rounds"), new.get("rounds")
    if r_old != r_new:
        ok = False
        if isinstance(r_old, int) and isinstance(r_new, int) and r_new >= rounds_done:
            # CRFL skips its noise in round rounds-1: no completed round may be that round
            # under either count.
            ok = new.get("defense") not in ROUNDS_DEPENDENT_DEFENSES or rounds_done < min(
                r_old, r_new
            )
        if not ok:
            diff["rounds"] = (r_old, r_new)
    return diff


def check_resume(
    meta: Mapping[str, Any],
    current_config: Mapping[str, Any],
    client_devices: int | None = None,
) -> None:
    """Refuse to resume a checkpoint whose run would not give the current run's numbers.

    Args:
      meta: the checkpoint's metadata (`Checkpointer.metadata`).
      current_config: the current `Config.to_dict()`.
      client_devices: the current client mesh size (1 without a mesh); None skips that
        check (e.g. before the Simulation, and so the mesh, exists).

    Raises:
      ValueError: naming each differing key with its stored and current value.
    """
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"checkpoint format {meta.get('format')!r} is not supported; accepted: {FORMAT}"
        )
    done = int(meta["rounds_done"])
    stored = dict(meta["config"])
    # Checkpoints from before `balance_clients` placed clients in contiguous id blocks.
    stored.setdefault("balance_clients", False)
    diff = config_diff(stored, current_config, done)
    if client_devices is not None and meta.get("client_devices") != client_devices:
        diff["client_devices"] = (meta.get("client_devices"), client_devices)
    if meta.get("client_devices") == 1 and "client_devices" not in diff:
        diff.pop("balance_clients", None)  # one device: nothing to place
    if diff:
        items = "; ".join(f"{k}: {a!r} (checkpoint) vs {b!r} (now)" for k, (a, b) in diff.items())
        hint = ""
        if "rounds" in diff:
            hint = (
                f" (rounds must stay >= the {done} completed rounds; with defense "
                f"{sorted(ROUNDS_DEPENDENT_DEFENSES)} it may change only while no completed "
                "round is either count's last round)"
            )
        if "balance_clients" in diff:
            fix = "add" if diff["balance_clients"][0] is False else "drop"
            hint += f" ({fix} --no-balance-clients to restore the checkpoint's client placement)"
        if "client_devices" in diff:
            hint += (
                f" (on CPU, --cpu-devices {meta.get('client_devices')} restores the checkpoint's "
                "split; the command line otherwise uses one device per core)"
            )
        raise ValueError(
            f"cannot resume after round {done}: the checkpointed run differs in what changes "
            f"the numbers: {items}{hint}"
        )


# ----------------------------------------------------------------------------- PRNG keys
def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree: Any) -> Any:
    """Typed PRNG key leaves → their raw uint32 data (same sharding); other leaves unchanged."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _key_impls(tree: Any) -> list[str]:
    return [str(jax.random.key_impl(x)) for x in jax.tree.leaves(tree) if _is_key(x)]


def _like(restored: jax.Array, template: Any) -> Any:
    """A restored leaf made like its template leaf: re-wrapped as a typed PRNG key, and left
    uncommitted where the template is (one device, no mesh), so a jitted round restored into
    `sim.init_state()` hits the compile cache of a fresh state instead of recompiling."""
    if isinstance(template, jax.Array) and not template.committed:
        restored = jnp.asarray(np.asarray(restored))  # host copy: an uncommitted array
    if _is_key(template):
        return jax.random.wrap_key_data(restored, impl=jax.random.key_impl(template))
    return restored


# ----------------------------------------------------------------------------- checkpointer
class Checkpointer:
    """Saves a run's state after completed rounds and restores the latest one.

    Usage:
      with Checkpointer(out / CHECKPOINT_SUBDIR, keep=2) as ckpt:
          ckpt.save(state, rounds_done, cfg.to_dict())
          ...
          state, meta = ckpt.restore(sim.init_state())

    Every process of a multi-host run must make the same calls (orbax coordinates the
    writes); the directory must then be on a shared filesystem.
    """

    def __init__(
        self, directory: str | Path, keep: int = DEFAULT_KEEP, async_save: bool = True
    ) -> None:
        """Open (creating it if needed) a checkpoint directory.

        Args:
          directory: where the checkpoints go (one sub-directory per completed-round count).
          keep: how many of the latest checkpoints to keep (older ones are deleted).
          async_save: write in a background thread while training continues; a checkpoint
            counts only once complete (orbax finalises it atomically), and `close()` waits.

        Raises:
          ValueError: `keep` < 1.
        """
        if keep < 1:
            raise ValueError(f"keep={keep}; accepted: an integer >= 1")
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=async_save
            ),
        )

    def save(
        self,
        state: Any,
        rounds_done: int,
        config: Mapping[str, Any],
        client_devices: int = 1,
    ) -> None:
        """Save the state after `rounds_done` completed rounds.

        Args:
          state: the run-state pytree (`RunState`); typed PRNG keys are allowed.
          rounds_done: completed rounds (the checkpoint's step).
          config: the run's `Config.to_dict()` (checked by `check_resume`).
          client_devices: the client mesh size (1 without a mesh).
        """
        meta = {
            "format": FORMAT,
            "rounds_done": int(rounds_done),
            "config": _jsonable(config),
            "client_devices": int(client_devices),
            "key_impls": _key_impls(state),
            "versions": {**package_versions(), "orbax-checkpoint": ocp.__version__},
        }
        self._manager.save(
            int(rounds_done),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_keys_to_data(state)), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def latest_round(self) -> int | None:
        """Completed rounds of the latest complete checkpoint, or None when there is none."""
        self._manager.reload()
        return self._manager.latest_step()

    def all_rounds(self) -> list[int]:
        """Completed-round counts of every kept checkpoint, ascending."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def _step(self, rounds_done: int | None) -> int:
        if rounds_done is None:
            step = self.latest_round()
            if step is None:
                raise ValueError(f"no checkpoint in {self.directory}")
            return step
        kept = self.all_rounds()
        if rounds_done not in kept:
            raise ValueError(
                f"no checkpoint after {rounds_done} rounds in {self.directory}; accepted: {kept}"
            )
        return rounds_done

    def metadata(self, rounds_done: int | None = None) -> dict[str, Any]:
        """The JSON metadata of the latest (or the given) checkpoint, without reading arrays.

        Raises:
          ValueError: when there is no checkpoint.
        """
        step = self._step(rounds_done)
        out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out.meta)

    def restore(
        self, template: State | None, rounds_done: int | None = None
    ) -> tuple[State | Any, dict]:
        """Read the latest (or the given) checkpoint into the structure of `template`.

        Args:
          template: a state of the same structure, shapes and dtypes (`sim.init_state()`);
            restored arrays get its leaves' shardings. None: the stored tree as orbax
            rebuilds it (dicts and lists, PRNG keys as raw key data, on the default
            device), e.g. to inspect a checkpoint without building the Simulation.
          rounds_done: which checkpoint (default: the latest).

        Returns:
          (state, metadata).

        Raises:
          ValueError: no checkpoint, or the stored PRNG key implementation differs from
            the template's.
        """
        step = self._step(rounds_done)
        meta = self.metadata(step)
        if template is None:
            raw = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
            )
            return raw.state, meta
        impls = _key_impls(template)
        if meta.get("key_impls") != impls:
            raise ValueError(
                f"checkpoint PRNG key implementation {meta.get('key_impls')} differs from the "
                f"current {impls} (jax_default_prng_impl); accepted: the same implementation"
            )
        plain = _keys_to_data(template)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, plain)
        out = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )
        state = jax.tree.map(_like, out.state, template)
        return state, meta

    def wait(self) -> None:
        """Block until pending asynchronous saves are complete."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release the manager."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def latest_metadata(directory: str | Path) -> dict[str, Any] | None:
    """Metadata of the latest complete checkpoint in `directory`; None when there is none.

    Reads only JSON (no arrays, no compute) and creates nothing, so a CLI can check a resume
    before loading data.
    """
    d = Path(directory)
    if not d.is_dir():
        return None
    with Checkpointer(d, async_save=False) as ckpt:
        step = ckpt.latest_round()
        return None if step is None else ckpt.metadata(step)


def completed_rows(path: str | Path, rounds_done: int) -> list[dict[str, Any]] | None:
    """The rows of rounds 1..rounds_done (1-based) in a run's JSON-lines log, to keep on resume.

    A line torn by the interruption ends the read (it is past the checkpoint anyway); rows of
    later rounds are dropped. Returns None when a completed round's row is missing.
    """
    rows: list[dict[str, Any]] = []
    p = Path(path)
    for line in p.read_text(encoding="utf-8").splitlines() if p.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if row["round"] <= rounds_done:
            rows.append(row)
    return rows if [r["round"] for r in rows] == list(range(1, rounds_done + 1)) else None


def clear(directory: str | Path) -> bool:
    """Delete a checkpoint directory (stale checkpoints of an earlier run in the same --out).

    Only process 0 deletes; every process then waits for it. Returns whether anything was
    there.
    """
    d = Path(directory)
    existed = d.exists()
    if existed and jax.process_index() == 0:
        shutil.rmtree(d)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("spmc_jax.checkpoint.clear")
    return existed


# ----------------------------------------------------------------------------- final model
FINAL_MODEL_SUBDIR = "final_model"  # under a run's --out


def save_final_model(
    run_dir: str | Path,
    global_flat: jax.Array,
    rounds_done: int,
    config: Mapping[str, Any],
    client_devices: int = 1,
) -> Path:
    """Save a run's final global model (the flat parameter vector) to RUN_DIR/final_model.

    The same orbax layout as the run checkpoints (a `Checkpointer` with one kept step whose
    state is {"global_flat": vector}), so `spmc_jax.gradcam` and notebooks can reload the
    trained model without the run state. An earlier run's final model there is replaced.

    Returns:
      The directory written.
    """
    d = Path(run_dir) / FINAL_MODEL_SUBDIR
    clear(d)
    with Checkpointer(d, keep=1, async_save=False) as ckpt:
        ckpt.save({"global_flat": global_flat}, rounds_done, config, client_devices)
    return d


def load_final_model(run_dir: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """The final global model saved by `save_final_model`, as a host float vector.

    Returns:
      (flat parameter vector, metadata with the run's config and rounds_done).

    Raises:
      ValueError: RUN_DIR/final_model is missing or holds no complete checkpoint.
    """
    d = Path(run_dir) / FINAL_MODEL_SUBDIR
    if latest_metadata(d) is None:
        raise ValueError(
            f"{str(d)!r} holds no final model; accepted: the --out of a finished "
            "`python -m spmc_jax.train` run"
        )
    with Checkpointer(d, async_save=False) as ckpt:
        tree, meta = ckpt.restore(None)
    return np.asarray(tree["global_flat"]), meta
