"""What a training run logs besides metrics.jsonl: metrics.csv, TensorBoard events, W&B, the
live curves.png, the progress bar, and the flags that drive them.

One tiny run (blobs, mlp, 4 clients, 3 rounds) goes through `train.main` in-process, with a
recording stand-in for the optional wandb package; the tests read what it wrote.
"""

from __future__ import annotations

import importlib.machinery
import io
import json
import sys
import types

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from spmc_jax import gradcam, plot, reporting, sweep, train
from spmc_jax.cli_help import HelpFormatter
from spmc_jax.reporting import Progress, RunLogger, read_metrics_csv
from tests.conftest import make_blob_dataset

ROUNDS = 3
TEST_N = 100
# TensorBoard stores scalars as float32: a percentage <= 100 keeps ~7 significant digits.
TB_F32_REL = 1e-6


class _FakeWandb(types.ModuleType):
    """Records what the run hands to wandb (init kwargs, logged dicts, finish)."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        self.calls: dict[str, list] = {"init": [], "log": [], "finish": []}

    def init(self, **kw):
        self.calls["init"].append(kw)
        run = types.SimpleNamespace()
        run.log = lambda d, step: self.calls["log"].append((step, d))
        run.finish = lambda: self.calls["finish"].append(True)
        return run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(out dir, metrics.jsonl rows, fake wandb, captured stderr) of one 3-round run."""
    out = tmp_path_factory.mktemp("run")
    fake = _FakeWandb()
    mp = pytest.MonkeyPatch()
    ds = make_blob_dataset(n_train=600, n_test=300)
    mp.setattr("spmc_jax.data.load_dataset", lambda *a, **k: ds)
    mp.setitem(sys.modules, "wandb", fake)
    err = io.StringIO()  # not a TTY: the progress bar must stay silent
    mp.setattr(sys, "stderr", err)
    args = [
        *("--dataset", "mnist", "--model", "mlp", "--clients", "4", "--rounds", str(ROUNDS)),
        *("--local-epochs", "1", "--batch-size", "32", "--partition", "iid", "--gamma", "0.25"),
        *("--test-subsample", str(TEST_N), "--wandb", "spmc-test", "--out", str(out)),
    ]
    try:
        assert train.main(args) == 0
    finally:
        mp.undo()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return out, rows, fake, err.getvalue()


def test_csv_equals_jsonl(tiny_run):
    out, rows, _, _ = tiny_run
    assert len(rows) == ROUNDS
    assert read_metrics_csv(out / "metrics.csv") == rows
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header == list(rows[0])


def test_event_files_parse_and_hold_the_metrics(tiny_run):
    out, rows, _, _ = tiny_run
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"A", "R", "R_excl_target", "V", "attacker_weight", "mean_client_loss"} <= tags
    for key in ("A", "R", "V", "attacker_weight"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [r["round"] for r in rows]
        assert [e.value for e in events] == pytest.approx([r[key] for r in rows], rel=TB_F32_REL)
    loss = acc.Scalars("mean_client_loss")
    assert [e.value for e in loss] == pytest.approx(
        [float(np.mean(r["loss"])) for r in rows], rel=TB_F32_REL
    )


def test_wandb_gets_the_config_and_every_round(tiny_run):
    out, rows, fake, _ = tiny_run
    (init,) = fake.calls["init"]
    assert init["project"] == "spmc-test" and init["mode"] == "offline"
    assert init["dir"] == str(out) and init["config"]["clients"] == 4
    assert [step for step, _ in fake.calls["log"]] == [r["round"] for r in rows]
    assert [d["A"] for _, d in fake.calls["log"]] == [r["A"] for r in rows]
    assert fake.calls["finish"] == [True]


def test_test_subsample_reaches_the_evaluation(tiny_run):
    out, rows, _, _ = tiny_run
    plan = json.loads((out / "plan.json").read_text())["plan"]
    assert plan["n_test"] == TEST_N and plan["test_subsample"] == TEST_N
    assert json.loads((out / "summary.json").read_text())["test_subsample"] == TEST_N
    # A is a share of TEST_N images: a whole multiple of 100 / TEST_N percent.
    for r in rows:
        assert r["A"] * TEST_N / 100 == pytest.approx(round(r["A"] * TEST_N / 100), abs=1e-3)


def test_progress_is_silent_when_not_a_tty(tiny_run):
    *_, err = tiny_run
    assert "compiling" not in err and "\r" not in err and "round/s" not in err


def test_progress_on_a_terminal_says_compiling_then_shows_an_eta(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("CI", raising=False)
    stream = Tty()
    with Progress(4, stream=stream, compiling="round 1") as bar:
        assert "round 1: compiling" in stream.getvalue()
        bar.update(1, "A 10.00 R 90.00")
    text = stream.getvalue()
    assert "1/4 rounds" in text and "<" in text and "A 10.00 R 90.00" in text
    # In CI the same terminal gets nothing.
    monkeypatch.setenv("CI", "true")
    quiet = Tty()
    with Progress(4, stream=quiet) as bar:
        bar.compiling()
        bar.update(1)
    assert quiet.getvalue() == ""


def test_curves_png_is_written_after_the_first_evaluated_round(tmp_path):
    drawn = []

    def plot(history, path):
        drawn.append([h["round"] for h in history])
        train.plot_curves(history, path, "t")

    row = {"round": 0, "A": 50.0, "R": 60.0, "V": 55.0, "attacker_weight": 0.2, "loss": [1.0]}
    with RunLogger(tmp_path, {}, plot=plot, tensorboard=False) as log:
        log.log({**row, "A": None, "R": None, "V": None})  # not evaluated: nothing to draw
        assert not (tmp_path / "curves.png").exists()
        log.log({**row, "round": 1})
        # A run killed here still has its curves.
        assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert drawn == [[0, 1]]


def test_sweep_cells_progress_counts_cells_and_estimates_from_cells_run(monkeypatch):
    monkeypatch.setattr(sweep.time, "perf_counter", lambda: 100.0)
    assert sweep.cells_progress(2, 8, [], 100.0) == "2/8 cells done, ETA after the first cell"
    # 2 cells skipped (resumed), 2 run in 60 s: 4 left at 30 s each.
    assert sweep.cells_progress(4, 8, ["a", "b"], 40.0) == "4/8 cells done, ETA 2m00s"


def test_a_resumed_run_keeps_the_checkpointed_rounds_and_drops_the_later_ones(tmp_path):
    def row(r, a):
        return {"round": r, "A": a, "R": 50.0, "V": (a + 50.0) / 2, "attacker_weight": 0.25}

    first = [row(0, 10.0), row(1, 20.0), row(2, 30.0)]  # round 2 ran past the checkpoint
    with RunLogger(tmp_path, {"seed": 0}) as log:
        for r in first:
            log.log(r)
    kept, again = first[:2], row(2, 33.0)  # resumed after 2 rounds: round 2 reruns
    with RunLogger(tmp_path, {"seed": 0}, kept) as log:
        log.log(again)
    assert read_metrics_csv(tmp_path / "metrics.csv") == [*kept, again]
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    # TensorBoard drops the killed run's round-2 event (purge_step), keeps the resumed one.
    assert [(e.step, e.value) for e in acc.Scalars("A")] == [(0, 10.0), (1, 20.0), (2, 33.0)]


def test_eta_and_durations():
    assert reporting.eta_seconds(0, 5, 10.0) is None
    assert reporting.eta_seconds(2, 5, 10.0) == 15.0
    assert [reporting.fmt_duration(s) for s in (5, 125, 7500)] == ["5 s", "2m05s", "2h05m"]


def test_wandb_requests_that_cannot_work_fail_before_compute(monkeypatch, capsys):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    assert train.main(["--wandb", "proj"]) == 2
    assert "pip install 'spmc_jax[wandb]'" in capsys.readouterr().err
    assert train.main(["--wandb", "proj", "--wandb-mode", "cloud"]) == 2
    assert "accepted: offline, online" in capsys.readouterr().err
    assert train.main(["--test-subsample", "5"]) == 2
    assert "--test-subsample must be >= 10" in capsys.readouterr().err


@pytest.mark.parametrize("module", [train, sweep, plot, gradcam], ids=lambda m: m.__name__)
def test_every_flag_has_a_sentence_and_its_default_once(module):
    parser = module.build_parser()
    fmt = HelpFormatter(parser.prog)
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        text = fmt._expand_help(action)
        assert len(text) > 15, action.option_strings
        assert text.count("(default: ") == 1, (action.option_strings, text)
    page = parser.format_help()
    assert "(default: None)" not in page and "(default: False)" not in page


def test_attack_help_separates_data_and_model_attacks(capsys):
    assert train.main(["--attack", "help"]) == 0
    out = capsys.readouterr().out
    data, model = out.index("data attacks"), out.index("model attacks")
    assert data < out.index("  base ") < model < out.index("  scaling ")
    from spmc_jax.attacks import REGISTRY

    for name in REGISTRY.names():  # every kind has a heading: no attack is left out
        assert f"  {name} " in out, name
