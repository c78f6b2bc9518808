"""`python -m spmc_jax.sweep --cell-batch N`: batched cells write the same files as one by
one, and a batch killed mid-way resumes from its checkpoint with the uninterrupted numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spmc_jax import sweep
from spmc_jax.data.synthetic import make_synthetic

# FedAvg, two seeds x two gammas = 4 cells sharing one program (FedAvg reads no attacker
# count), run as batches of 3 + 1; an MLP on a synthetic MNIST-shaped set, 4 clients.
ARGV = [
    "--preset", "smoke", "--datasets", "mnist", "--defenses", "fedavg", "--gammas", "0.25",
    "0.5", "--seeds", "0", "1", "--rounds", "3", "--clients", "4", "--subsample", "full",
    "--test-subsample", "full", "--model", "mlp", "--batch-size", "32", "--quiet",
]  # fmt: skip
METRICS = ("A", "R", "R_excl_target", "V", "attacker_weight")


def _load(name, *, data_dir, fetch):
    return make_synthetic(name, n_train=480, n_test=100, seed=0)


def _spec():
    return sweep.spec_from_args(sweep.build_parser().parse_args([*ARGV, "--out", "x"]))


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x]


class _Kill(Exception):
    pass


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("batched") / "out"
    rc = sweep.main([*ARGV, "--out", str(out), "--cell-batch", "3"], dataset_loader=_load,
                    jax_cache=False)  # fmt: skip
    assert rc == 0
    return out


def test_cell_batches_write_every_cells_files(straight):
    ids = [c.id for c in _spec().cells()]
    rows = _rows(straight / "results.jsonl")
    assert [r["cell"] for r in rows] == [i for i in ids for _ in range(3)]
    batches = [
        json.loads((straight / "cells" / f"{i}.json").read_text())["cell_batch"] for i in ids
    ]
    assert batches == [ids[:3]] * 3 + [ids[3:]]  # grid order, chunks of --cell-batch
    assert "γ = 0.25" in (straight / "table.md").read_text()
    assert not list((straight / "cells").glob("*.ckpt"))  # finished: no checkpoints left


def test_killed_batch_resumes_with_the_uninterrupted_numbers(straight, tmp_path):
    out = tmp_path / "out"
    seen: list[str] = []

    def kill_in_round_2(row):
        seen.append(row["cell"])
        if row["round"] == 1 and len(set(seen)) == 3:  # every cell of batch 1 wrote round 1
            raise _Kill

    with pytest.raises(_Kill):
        sweep.run_sweep(_spec(), out, dataset_loader=_load, jax_cache=False, quiet=True,
                        on_row=kill_in_round_2, checkpoint_every=1, cell_batch=3)  # fmt: skip
    assert len(list((out / "cells").glob("batch-*.ckpt"))) == 1
    assert not list((out / "cells").glob("*.json"))
    resumed = sweep.run_sweep(_spec(), out, dataset_loader=_load, jax_cache=False, quiet=True,
                              checkpoint_every=1, cell_batch=3)  # fmt: skip
    ids = [c.id for c in _spec().cells()]
    assert [resumed.summaries[i]["resumed_from_round"] for i in ids] == [1, 1, 1, None]
    a, b = _rows(straight / "results.jsonl"), _rows(out / "results.jsonl")
    assert [(r["cell"], r["round"]) for r in a] == [(r["cell"], r["round"]) for r in b]
    # Same program, same state, same CPU: bit-identical numbers.
    for x, y in zip(a, b, strict=True):
        assert {k: x[k] for k in METRICS} == {k: y[k] for k in METRICS}, (x, y)
    assert not list((out / "cells").glob("*.ckpt"))


@pytest.mark.parametrize(
    "flag,value,needle",
    [("--cell-batch", "0", "--cell-batch"), ("--cell-batch", "x", "--cell-batch"),
     ("--time-limit", "-1", "--time-limit")],
)  # fmt: skip
def test_bad_batch_flags_fail_before_compute(flag, value, needle, tmp_path, capsys):
    def never(name, *, data_dir, fetch):
        raise AssertionError("loaded data")

    rc = sweep.main([*ARGV, "--out", str(tmp_path), flag, value], dataset_loader=never)
    assert rc == 2 and needle in capsys.readouterr().err
