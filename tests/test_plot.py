"""`python -m spmc_jax.plot`: curves of several runs, the comparison table, the α-deviation plot."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from spmc_jax import plot, train
from tests.conftest import make_blob_dataset

ROUNDS = 2


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A 2-round SPMC run (blobs, mlp) and a copy of it under another name."""
    root = tmp_path_factory.mktemp("runs")
    ds = make_blob_dataset(n_train=600, n_test=100)
    mp = pytest.MonkeyPatch()
    mp.setattr("spmc_jax.data.load_dataset", lambda *a, **k: ds)
    args = [
        *("--dataset", "mnist", "--model", "mlp", "--clients", "4", "--rounds", str(ROUNDS)),
        *("--local-epochs", "1", "--batch-size", "32", "--partition", "iid", "--gamma", "0.25"),
        *("--quiet", "--out", str(root / "spmc")),
    ]
    try:
        assert train.main(args) == 0
    finally:
        mp.undo()
    shutil.copytree(root / "spmc", root / "copy")
    return root / "spmc", root / "copy"


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_plot_cli_writes_the_curves_and_weights_and_prints_the_table(two_runs, tmp_path, capsys):
    a, b = two_runs
    out, wout = tmp_path / "cmp.png", tmp_path / "w.png"
    assert plot.main([str(a), str(b), "--out", str(out), "--weights", str(wout)]) == 0
    w, h = plot.CURVES_SIZE
    assert _png_size(out) == (round(w * plot.DPI), round(h * plot.DPI))
    w, h = plot.WEIGHTS_PANEL
    assert _png_size(wout) == (round(2 * w * plot.DPI), round(h * plot.DPI))
    text = capsys.readouterr().out
    rows = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    # Same config: labelled by directory name; the last round's A/R/V as the run logged them.
    line = next(x for x in text.splitlines() if x.startswith("spmc "))
    assert line.split()[1:5] == [str(ROUNDS), *(f"{last[k]:.2f}" for k in ("A", "R", "V"))]
    assert any(x.startswith("copy ") for x in text.splitlines())


def test_a_killed_run_is_read_as_far_as_it_got(two_runs, tmp_path):
    a, _ = two_runs
    d = tmp_path / "killed"
    d.mkdir()
    shutil.copy(a / "plan.json", d)  # no summary.json yet
    first = (a / "metrics.jsonl").read_text().splitlines()[0]
    (d / "metrics.jsonl").write_text(first + "\n" + '{"round": 1, "A": 5')  # torn line
    run = plot.load_run(d)
    assert [r["round"] for r in run.rows] == [json.loads(first)["round"]]
    assert run.malicious_ids == [3]


def test_labels_name_what_differs():
    def run(name, **cfg):
        return plot.Run(Path(name), {"dataset": "mnist", "seed": 0, **cfg}, [], [])

    runs = [run("a", defense="fedavg", gamma=0.2), run("b", defense="spmc", gamma=0.3)]
    plot.label_runs(runs)
    assert [r.label for r in runs] == ["fedavg gamma=0.2", "spmc gamma=0.3"]


def test_bad_input_fails_with_a_clear_message(tmp_path, capsys):
    assert plot.main([str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    assert plot.main([str(tmp_path), "--out", str(tmp_path / "x.pdf")]) == 2
    assert "accepted: a path ending in .png" in capsys.readouterr().err


def test_weights_plot_shows_deviation_from_uniform_in_percent():
    ax = Figure().subplots()
    plot.plot_client_weights(ax, [0, 1, 2, 3], [0.3, 0.25, 0.25, 0.2], [3])
    heights = [p.get_height() for p in ax.patches]
    # (α − 1/4) / (1/4) in %: +20, 0, 0, −20.
    assert heights == pytest.approx([20.0, 0.0, 0.0, -20.0])
    assert [p.get_facecolor()[:3] for p in ax.patches][3] != ax.patches[0].get_facecolor()[:3]
    lo, hi = ax.get_ylim()
    assert lo == -hi and hi >= 20.0
    # A float32-level wiggle stays within the minimum range (not blown up to fill the axis).
    ax2 = Figure().subplots()
    plot.plot_client_weights(ax2, [0, 1], np.array([0.5 + 1e-8, 0.5 - 1e-8]), [1])
    assert ax2.get_ylim()[1] == pytest.approx(plot.WEIGHTS_MIN_RANGE_PCT)
