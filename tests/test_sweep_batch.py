"""`python -m spmc_jax.sweep --cell-batch N`: a batch killed mid-way resumes from its
checkpoint, and every cell's rows are its `engine.run` alone numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spmc_jax import sweep
from spmc_jax.data.synthetic import make_synthetic
from spmc_jax.engine import run

# FedAvg, two cells sharing one program (FedAvg reads no attacker count): seed 0 at γ 0.25
# and seed 1 at γ 0.5 (the sweep's grid is seeds x gammas, so --seeds 0 1 --gammas 0.25 0.5
# gives 4 cells; only the two on the diagonal are compared with engine.run alone); an MLP on
# a synthetic MNIST-shaped set, 4 clients, 3 rounds.
ARGV = [
    "--preset", "smoke", "--datasets", "mnist", "--defenses", "fedavg", "--gammas", "0.25",
    "0.5", "--seeds", "0", "1", "--rounds", "3", "--clients", "4", "--subsample", "full",
    "--test-subsample", "full", "--model", "mlp", "--batch-size", "32", "--local-epochs", "1",
    "--quiet",
]  # fmt: skip
# Accuracies in percent of 100 test images: batched and alone agree to float32 summation
# order, i.e. the same predictions (within one image, 1 %, for a prediction on a tie).
PCT_ABS = 1.0


def _load(name, *, data_dir, fetch):
    return make_synthetic(name, n_train=480, n_test=100, seed=0)


def _spec():
    return sweep.spec_from_args(sweep.build_parser().parse_args([*ARGV, "--out", "x"]))


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x]


class _Kill(Exception):
    pass


def test_killed_batch_resumes_and_every_cell_gets_its_alone_numbers(tmp_path):
    out, spec = tmp_path / "out", _spec()
    ids = [c.id for c in spec.cells()]  # g0.25-s0, g0.25-s1, g0.5-s0, g0.5-s1

    def kill_in_round_2(row):
        if row["round"] == 2:  # the checkpoint holds round 1; one cell's row 2 is torn off
            raise _Kill

    with pytest.raises(_Kill):
        sweep.run_sweep(spec, out, dataset_loader=_load, jax_cache=False, quiet=True,
                        on_row=kill_in_round_2, checkpoint_every=1, cell_batch=4)  # fmt: skip
    assert len(list((out / "cells").glob("batch-*.ckpt"))) == 1
    assert not list((out / "cells").glob("*.json"))
    resumed = sweep.run_sweep(spec, out, dataset_loader=_load, jax_cache=False, quiet=True,
                              checkpoint_every=1, cell_batch=4)  # fmt: skip
    assert [resumed.summaries[i]["resumed_from_round"] for i in ids] == [1] * 4
    assert all(resumed.summaries[i]["cell_batch"] == ids for i in ids)
    assert not list((out / "cells").glob("*.ckpt"))  # finished: no checkpoints left
    rows = _rows(out / "results.jsonl")
    assert [(r["cell"], r["round"]) for r in rows] == [(i, k) for i in ids for k in (1, 2, 3)]
    assert "γ = 0.25" in (out / "table.md").read_text()
    ds = _load("mnist", data_dir=None, fetch=False)
    for cell in spec.cells()[3:]:  # seed 1 at γ 0.5: not the template's seed or γ
        alone = run(spec.config(cell), ds).history
        got = [r for r in rows if r["cell"] == cell.id]
        for a, b in zip(alone, got, strict=True):
            for k in ("A", "R", "V"):
                assert b[k] == pytest.approx(a[k], abs=PCT_ABS), (cell.id, k, a[k], b[k])
            assert b["attacker_weight"] == pytest.approx(a["attacker_weight"], abs=1e-5)


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
