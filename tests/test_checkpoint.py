"""Checkpoint / resume: an interrupted run resumed from its checkpoint gives exactly the numbers
of the uninterrupted run (engine API and CLI), and resuming is refused when it could not.

"Exactly": on the same CPU the resumed run replays the same compiled round on the same state
and key, so every comparison here is bit-for-bit (no tolerance). FedAvg is checked through the
CLI (a fresh Simulation per run; final models compared from the runs' last checkpoints), SPMC
(teachers) and FoolsGold (per-client histories) through the engine API; each distinct config
costs one XLA compile, the bulk of this file's time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import make_blob_dataset

from spmc_jax.checkpoint import (
    CHECKPOINT_SUBDIR,
    Checkpointer,
    check_resume,
    config_diff,
    latest_metadata,
)
from spmc_jax.config import Config
from spmc_jax.engine import Simulation, run
from spmc_jax.train import build_parser, config_from_args, main

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(
    model="mlp", clients=4, rounds=4, local_epochs=1, batch_size=16, gamma=0.25, eval_batch=100
)
ROW_KEYS = (
    "round",
    "A",
    "R",
    "R_excl_target",
    "V",
    "client_ids",
    "client_weights",
    "attacker_weight",
    "loss",
    "projected",
    "nonfinite",
)


@pytest.fixture(scope="module")
def tiny_ds():
    return make_blob_dataset(n_train=400, n_test=100)


class Preempted(Exception):
    """Stands for the job being killed right after a checkpoint."""


def _leaves(tree):
    return [
        np.asarray(
            jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
        )
        for x in jax.tree.leaves(tree)
    ]


def _assert_trees_equal(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def _assert_rows_equal(a, b):
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        for key in ROW_KEYS:
            assert ra[key] == rb[key], (ra["round"], key)


@pytest.mark.parametrize("defense", ["spmc", "foolsgold"])
def test_resumed_run_equals_uninterrupted_run(defense, tiny_ds, tmp_path):
    cfg = Config(defense=defense, **TINY)
    sim = Simulation(cfg, tiny_ds)  # one compiled round shared by all three runs
    straight = run(cfg, tiny_ds, sim=sim)

    # Interrupted: a checkpoint after every round (keep 2), killed right after round 2's.
    saved = {}
    with Checkpointer(tmp_path / "ck", keep=2) as ck:

        def save_then_die(state, done):
            ck.save(state, done, cfg.to_dict())
            saved[done] = state
            if done == 2:
                raise Preempted

        with pytest.raises(Preempted):
            run(cfg, tiny_ds, sim=sim, on_checkpoint=save_then_die)
    # A fresh process: only what is on disk.
    with Checkpointer(tmp_path / "ck") as ck:
        assert ck.all_rounds() == [1, 2]  # the last 2 kept
        state, meta = ck.restore(sim.init_state())
    assert meta["rounds_done"] == 2 and meta["config"]["defense"] == defense
    _assert_trees_equal(state, saved[2])
    assert jax.dtypes.issubdtype(state.key.dtype, jax.dtypes.prng_key)

    resumed = run(cfg, tiny_ds, sim=sim, state=state, start_round=2, history=straight.history[:2])
    _assert_rows_equal(resumed.history, straight.history)
    _assert_trees_equal(resumed.state, straight.state)  # global model, rule state, teachers, key

    # The test can fail: the rule's memory (FoolsGold's histories, SPMC's teachers) or the
    # model itself matters, so resuming from a partly reset state changes round 2.
    init = sim.init_state()
    if defense == "foolsgold":
        assert any(np.any(x != 0) for x in _leaves(state.agg_state))
        broken = state._replace(agg_state=init.agg_state)
    else:
        broken = state._replace(teachers=init.teachers, teacher_ids=init.teacher_ids)
    bad = run(cfg, tiny_ds, sim=sim, state=broken, start_round=2).history
    assert any(bad[0][k] != straight.history[2][k] for k in ("client_weights", "loss", "A", "R"))


# ----------------------------------------------------------------------------- CLI
CLI = (
    *("--dataset", "mnist", "--model", "mlp", "--clients", "4", "--local-epochs", "1"),
    *("--batch-size", "16", "--gamma", "0.25", "--eval-batch", "100", "--defense", "fedavg"),
    "--quiet",
)


@pytest.fixture
def offline(monkeypatch, tiny_ds):
    """The CLI loads the tiny generated set instead of MNIST; `calls` counts data loads."""
    calls = []

    def load(*args, **kwargs):
        calls.append(args)
        return tiny_ds

    monkeypatch.setattr("spmc_jax.data.load_dataset", load)
    return calls


def _rows(out: Path):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_cli_checkpoint_then_resume_equals_straight_run(offline, tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    # Every 3: only the final state is saved (to compare the final models below).
    assert main([*CLI, "--rounds", "3", "--checkpoint-every", "3", "--out", str(straight)]) == 0
    assert main([*CLI, "--rounds", "2", "--checkpoint-every", "1", "--out", str(split)]) == 0
    assert latest_metadata(split / CHECKPOINT_SUBDIR)["rounds_done"] == 2
    # The job wrote a row past its last checkpoint and a cut-off line before dying.
    with (split / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps({**_rows(split)[-1], "round": 3, "A": -1.0}) + "\n" + '{"rou')
    capsys.readouterr()
    args = [*CLI, "--rounds", "3", "--checkpoint-every", "1", "--out", str(split), "--resume"]
    assert main(args) == 0
    assert "resuming after round 2" in capsys.readouterr().out
    _assert_rows_equal(_rows(split), _rows(straight))
    summary = json.loads((split / "summary.json").read_text())
    assert summary["resumed_from_round"] == 2
    assert json.loads((straight / "summary.json").read_text())["resumed_from_round"] is None
    assert summary["last5"] == json.loads((straight / "summary.json").read_text())["last5"]
    with Checkpointer(split / CHECKPOINT_SUBDIR) as ck:
        assert ck.all_rounds() == [2, 3]  # kept: the last 2
        resumed_final, _ = ck.restore(None)
    with Checkpointer(straight / CHECKPOINT_SUBDIR) as ck:
        assert ck.all_rounds() == [3]
        straight_final, _ = ck.restore(None)
    # Global model, rule state, teachers and key after round 3.
    _assert_trees_equal(resumed_final, straight_final)


# ----------------------------------------------------------------------------- refusals
def _meta(cfg: Config, done: int, devices: int = 1) -> dict:
    return {
        "format": 1,
        "rounds_done": done,
        "config": cfg.to_dict(),
        "client_devices": devices,
    }


def test_config_mismatch_names_each_key_with_both_values():
    cfg = Config(defense="fedavg", **TINY)
    with pytest.raises(ValueError, match=r"lr: 0\.01 \(checkpoint\) vs 0\.02 \(now\)") as err:
        check_resume(_meta(cfg, 2), cfg.replace(lr=0.02, seed=3).to_dict())
    assert "seed: 0 (checkpoint) vs 3 (now)" in str(err.value)
    # Derived values are compared too (e.g. the rule's options).
    spmc = Config(defense="spmc", **TINY)
    diff = config_diff(spmc.to_dict(), spmc.replace(spmc_space="updates").to_dict(), 2)
    assert set(diff) == {"spmc_space", "derived.defense_options.space"}
    # Where outputs go and evaluation cadence never change the trained numbers.
    check_resume(_meta(cfg, 2), cfg.replace(out="elsewhere", eval_every=2, eval_batch=7).to_dict())
    with pytest.raises(ValueError, match=r"client_devices: 1 \(checkpoint\) vs 2 \(now\)"):
        check_resume(_meta(cfg, 2), cfg.to_dict(), client_devices=2)


def test_client_placement_is_compared_only_where_there_are_devices_to_place_on():
    cfg = Config(defense="fedavg", **TINY)
    old = cfg.to_dict()
    del old["balance_clients"]  # a checkpoint from before the balanced placement
    old_meta = {**_meta(cfg, 2, devices=2), "config": old}
    # Two devices: its clients sat in contiguous id blocks, the default now balances them.
    with pytest.raises(ValueError, match=r"balance_clients: False \(checkpoint\) vs True") as e:
        check_resume(old_meta, cfg.to_dict(), client_devices=2)
    assert "add --no-balance-clients" in str(e.value)
    check_resume(old_meta, cfg.replace(balance_clients=False).to_dict(), client_devices=2)
    # One device: there is nothing to place, either way.
    check_resume({**old_meta, "client_devices": 1}, cfg.to_dict(), client_devices=1)
    off = _meta(cfg.replace(balance_clients=False), 2, devices=1)
    check_resume(off, cfg.to_dict(), client_devices=1)
    with pytest.raises(ValueError, match="add --no-balance-clients"):
        check_resume({**off, "client_devices": 4}, cfg.to_dict(), client_devices=4)
    on = _meta(cfg, 2, devices=4)
    with pytest.raises(ValueError, match="drop --no-balance-clients"):
        check_resume(on, cfg.replace(balance_clients=False).to_dict(), client_devices=4)


def test_rounds_may_change_only_where_no_completed_round_depends_on_it():
    fedavg = Config(defense="fedavg", **TINY)  # rounds 4
    assert config_diff(fedavg.to_dict(), fedavg.replace(rounds=9).to_dict(), 4) == {}
    assert config_diff(fedavg.to_dict(), fedavg.replace(rounds=3).to_dict(), 3) == {}
    with pytest.raises(ValueError, match=r"rounds: 4 \(checkpoint\) vs 2 \(now\)"):
        check_resume(_meta(fedavg, 3), fedavg.replace(rounds=2).to_dict())
    # CRFL adds no noise in round rounds-1: a finished 4-round run's round 3 had none.
    crfl = Config(defense="crfl", **TINY)
    assert "rounds" in config_diff(crfl.to_dict(), crfl.replace(rounds=9).to_dict(), 4)
    assert "rounds" in config_diff(crfl.to_dict(), crfl.replace(rounds=3).to_dict(), 3)
    assert config_diff(crfl.to_dict(), crfl.replace(rounds=9).to_dict(), 3) == {}


def test_cli_refuses_a_changed_config_before_loading_data(offline, tmp_path, capsys):
    base = [*CLI, "--rounds", "3", "--out", str(tmp_path)]
    cfg = config_from_args(build_parser().parse_args(base))
    state = {"w": np.arange(3.0, dtype=np.float32), "key": jax.random.key(0)}
    with Checkpointer(tmp_path / CHECKPOINT_SUBDIR) as ck:
        ck.save(state, 2, cfg.to_dict())
    assert main([*base, "--lr", "0.05", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "lr: 0.01 (checkpoint) vs 0.05 (now)" in err
    assert offline == []  # refused before any data was loaded


def test_resume_without_checkpoint_is_a_clear_error_before_compute(offline, tmp_path, capsys):
    missing = tmp_path / "missing"
    assert main([*CLI, "--resume", "--out", str(missing)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not missing.exists()
    tmp_path.joinpath("metrics.jsonl").write_text("")
    assert main([*CLI, "--resume", "--out", str(tmp_path)]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err
    assert main([*CLI, "--checkpoint-every", "-1"]) == 2
    assert "--checkpoint-every must be >= 0" in capsys.readouterr().err
    assert offline == []


# ----------------------------------------------------------------------------- shardings
WORKER = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    sys.path.insert(0, {root!r})
    from spmc_jax.checkpoint import Checkpointer

    mesh = Mesh(np.array(jax.devices()), ("clients",))
    rows, rep = NamedSharding(mesh, P("clients")), NamedSharding(mesh, P())
    w = jnp.arange(8 * 3, dtype=jnp.float32).reshape(8, 3)
    state = dict(w=jax.device_put(w, rows), g=jax.device_put(w[0], rep),
                 key=jax.device_put(jax.random.key(5), rep))
    with Checkpointer({ck!r}) as ck:
        ck.save(state, 1, {{}}, client_devices=2)
    # Restore into other shardings: rows replicated, the vector sharded.
    tmpl = dict(w=jax.device_put(jnp.zeros_like(w), rep),
                g=jax.device_put(jnp.zeros(3), NamedSharding(mesh, P(None))),
                key=jax.device_put(jax.random.key(0), rep))
    with Checkpointer({ck!r}) as ck:
        got, meta = ck.restore(tmpl)
    print(json.dumps(dict(
        w=np.asarray(got["w"]).tolist(), g=np.asarray(got["g"]).tolist(),
        key=np.asarray(jax.random.key_data(got["key"])).tolist(),
        key_expected=np.asarray(jax.random.key_data(jax.random.key(5))).tolist(),
        w_sharding=str(got["w"].sharding.spec), w_devices=len(got["w"].sharding.device_set),
        key_typed=bool(jax.dtypes.issubdtype(got["key"].dtype, jax.dtypes.prng_key)),
        client_devices=meta["client_devices"])))
    """
)


def test_restore_places_arrays_on_the_templates_shardings(tmp_path):
    code = WORKER.format(root=str(ROOT), ck=str(tmp_path / "ck"))
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    }
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["w"] == np.arange(24.0).reshape(8, 3).tolist()
    assert out["g"] == [0.0, 1.0, 2.0]
    assert out["key"] == out["key_expected"] and out["key_typed"]
    assert out["w_sharding"] in ("P()", "PartitionSpec()") and out["w_devices"] == 2
    assert out["client_devices"] == 2
