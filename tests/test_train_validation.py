"""Honest runs (issue 12): every bad option fails before compute with exit 2, nothing is
overwritten, a model at chance is flagged and never a winner, rounds are numbered from 1.

The bad-input table runs `spmc_jax.train.main(argv)` in process (SystemExit from argparse
included), each case twice: as a run and with --dry-run. A few go through a real subprocess.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from spmc_jax import sweep
from spmc_jax.config import Config
from spmc_jax.metrics import learned
from spmc_jax.train import default_out, main
from tests.conftest import make_blob_dataset
from tests.tables import table_rows

# Tiny and valid on its own: each case adds one bad option (the last --out wins).
BASE = (
    *("--dataset", "mnist", "--model", "mlp", "--clients", "4", "--rounds", "2"),
    *("--local-epochs", "1", "--batch-size", "16", "--eval-batch", "100", "--gamma", "0.25"),
)

# (extra argv, substrings the error must contain: the bad value and what is accepted).
# "{tmp}" is the case's scratch folder, "{file}" a regular file in it, "{empty}" an empty
# directory in it.
BAD = [
    (["--dataset", "svhn"], ["'svhn'", "accepted: mnist, fashion_mnist, cifar10"]),
    (["--model", "vgg"], ["'vgg'", "accepted: simple_cnn"]),
    (["--partition", "zipf"], ["'zipf'", "accepted: dirichlet, iid"]),
    (["--protocol", "mine"], ["'mine'", "accepted: paper, fair"]),
    (["--conv-impl", "fft"], ["'fft'", "accepted: auto, lax, patches"]),
    (["--compute-dtype", "float64"], ["'float64'", "accepted: float32, bfloat16"]),
    (["--cpu-dot-fusion", "on"], ["'on'", "accepted: auto, ynn, off"]),
    (["--spmc-space", "grads"], ["'grads'", "accepted: weights, updates"]),
    (["--spmc-teachers", "some"], ["'some'", "accepted: last_round, all"]),
    (["--client-data", "sharded"], ["'sharded'", "accepted: auto, blocks, replicated"]),
    (["--attacker-ids", "first"], ["'first'", "accepted: last, random"]),
    (["--defense", "nope"], ["unknown defense 'nope'", "accepted: ", "fedavg"]),
    (["--attack", "nope"], ["unknown attack 'nope'", "accepted: ", "base"]),
    (["--attack", "base+badnets"], ["'base+badnets'", "at most one data attack"]),
    (["--attack", "none+base"], ["'none' cannot be combined", "'none+base'"]),
    (["--gamma", "1.5"], ["--gamma", "[0, 1)", "1.5"]),
    (["--gamma", "-0.1"], ["--gamma", "[0, 1)", "-0.1"]),
    (["--clients", "1"], ["--clients must be >= 2", "got 1"]),
    (["--clients-per-round", "1"], ["--clients-per-round must be in [2, --clients=4]", "got 1"]),
    (["--clients-per-round", "9"], ["--clients-per-round must be in [2, --clients=4]", "got 9"]),
    (["--rounds", "0"], ["--rounds must be >= 1", "got 0"]),
    (["--rounds", "two"], ["--rounds", "invalid int value: 'two'"]),
    (["--local-epochs", "0"], ["--local-epochs must be >= 1", "got 0"]),
    (["--batch-size", "0"], ["--batch-size must be >= 1", "got 0"]),
    (["--lr", "0"], ["--lr must be > 0", "got 0"]),
    (["--lr", "inf"], ["--lr must be a finite number", "got inf"]),
    (["--lr", "nan"], ["--lr must be a finite number", "got nan"]),
    (["--lr", "fast"], ["--lr", "invalid float value: 'fast'"]),
    (["--momentum", "1"], ["--momentum must be in [0, 1)", "got 1"]),
    (["--weight-decay", "-1"], ["--weight-decay must be >= 0", "got -1"]),
    (["--beta", "0"], ["--beta must be > 0", "got 0"]),
    (["--beta", "inf"], ["--beta must be a finite number", "got inf"]),
    (["--seed", "-1"], ["--seed must be >= 0", "got -1"]),
    (["--eval-every", "0"], ["--eval-every must be >= 1", "got 0"]),
    (["--eval-batch", "0"], ["--eval-batch must be >= 1", "got 0"]),
    (["--client-chunk", "0"], ["--client-chunk must be >= 1", "got 0"]),
    (["--min-size", "0"], ["--min-size must be >= 1", "got 0"]),
    (["--subsample", "5"], ["--subsample must be >= 10", "got 5"]),
    (["--subsample", "100000"], ["--subsample 100000", "60,000 images", "10..60000"]),
    (["--attack-start", "0"], ["--attack-start 0", "accepted: 1..2"]),
    (["--attack-start", "10", "--rounds", "1"], ["--attack-start 10", "accepted: 1..1"]),
    (["--attack-end", "5"], ["--attack-end 5", "accepted: 1..2"]),
    (["--attack-start", "2", "--attack-end", "1"], ["--attack-end 1", "accepted: 2..2"]),
    (["--spmc-temperature", "0"], ["--spmc-temperature must be > 0", "got 0"]),
    (["--spmc-lambda", "-1"], ["--spmc-lambda must be >= 0", "got -1"]),
    (["--assumed-malicious", "4"], ["--assumed-malicious must be in [0, 4)", "got 4"]),
    # Checked inside rules and attacks: caught by building them during validation.
    (
        ["--defense", "krum", "--assumed-malicious", "2"],
        ["--defense krum", "f=2", "neighbour count 0", "accepted: 1 <= num_neighbors"],
    ),
    (
        ["--defense", "median", "--defense-opt", "server_momentum=2"],
        ["--defense median", "server_momentum=2.0", "accepted: 0 <= value < 1"],
    ),
    (["--defense-opt", "nope=1"], ["defense 'spmc' has no option 'nope'", "accepted: "]),
    (
        ["--defense", "krum", "--defense-opt", "server_momentum=lots"],
        ["server_momentum='lots' is not a valid float"],
    ),
    (["--defense-opt", "temperature"], ["--defense-opt expects KEY=VALUE", "'temperature'"]),
    (["--defense", "rsa", "--defense-opt", "clip=0"], ["--defense rsa", "clip=0", "> 0"]),
    (["--attack-opt", "base.target=12"], ["--attack base", "target=12", "[0, 10)"]),
    (["--attack-opt", "base.poison_rate=2"], ["--attack base", "poison_rate=2", "[0, 1]"]),
    (["--attack-opt", "base.nope=1"], ["attack 'base' has no option 'nope'", "accepted: "]),
    (["--attack-opt", "scaling.boost=2"], ["scaling.boost=2", "not part of --attack 'base'"]),
    (["--attack-opt", "target=1"], ["--attack-opt expects NAME.KEY=VALUE", "'target=1'"]),
    (
        ["--attack", "base+scaling", "--attack-opt", "scaling.boost=-1"],
        ["--attack scaling", "boost=-1", ">= 0"],
    ),
    (["--devices", "999"], ["--devices 999", "only 1 device(s) are visible"]),
    (["--devices", "0"], ["--devices must be 'auto' or a positive integer", "'0'"]),
    (["--devices", "many"], ["--devices must be 'auto' or a positive integer", "'many'"]),
    (["--stream-aggregation"], ["--defense 'spmc' is not one", "accepted: fedavg"]),
    (
        ["--stream-aggregation", "--defense", "fedavg", "--attack", "base+scaling"],
        ["--stream-aggregation cannot run model attacks (scaling", "accepted: data-only"],
    ),
    (["--checkpoint-every", "-1"], ["--checkpoint-every must be >= 0", "got -1"]),
    (["--data-dir", "{tmp}/nowhere"], ["--data-dir", "nowhere", "not a readable directory"]),
    (
        ["--data-dir", "{empty}", "--no-fetch"],
        ["--data-dir", "holds no mnist files", "--no-fetch", "accepted: a directory with"],
    ),
    (["--out", "{file}"], ["--out", "is a file", "accepted: a new or existing directory"]),
    (["--out", "{file}/sub"], ["is a file", "accepted: a new or existing directory"]),
    (["--overwrite", "--resume"], ["--overwrite and --resume exclude each other"]),
    (["--resume"], ["--resume", "does not exist", "pass the --out of the run to resume"]),
]


def _ids(case):
    return " ".join(case[0]).replace("{", "").replace("}", "")


@pytest.fixture
def no_data(monkeypatch):
    """Fail the test if anything loads a dataset (every refusal must come before that)."""
    calls = []
    monkeypatch.setattr("spmc_jax.data.load_dataset", lambda *a, **k: calls.append(a))
    return calls


def _main(argv: list[str]) -> int:
    """main(argv) as the shell sees it: argparse's SystemExit becomes the exit code."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


def test_bad_input_table_has_at_least_40_cases():
    assert len(BAD) >= 40


@pytest.mark.parametrize("extra,needles", BAD, ids=[_ids(c) for c in BAD])
def test_bad_input_exits_2_before_any_data_and_writes_nothing(
    extra, needles, tmp_path, capsys, no_data
):
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("keep me")
    subs = {"{tmp}": str(tmp_path), "{file}": str(tmp_path / "afile")}
    subs["{empty}"] = str(tmp_path / "empty")

    def fill(a: str) -> str:
        for k, v in subs.items():
            a = a.replace(k, v)
        return a

    out = tmp_path / "out"
    argv = [*BASE, "--out", str(out), *(fill(a) for a in extra)]
    for mode in ([], ["--dry-run"]):
        assert _main([*argv, *mode]) == 2, mode
        err = capsys.readouterr().err
        for needle in needles:
            assert needle in err, (mode, needle, err)
        assert "Traceback" not in err
        assert not out.exists()
    assert (tmp_path / "afile").read_text() == "keep me"
    assert not any((tmp_path / "empty").iterdir())
    assert no_data == []


def test_bad_input_through_a_real_subprocess(tmp_path):
    """The refusal as the shell sees it: exit 2, the error line, no traceback. Here a check
    that needs a fresh process: --cpu-devices 2 makes two devices, which --stream-aggregation
    cannot use (engine.Simulation's refusal, now made before any data is loaded)."""
    cmd = [sys.executable, "-m", "spmc_jax.train", *BASE, "--out", str(tmp_path / "o")]
    extra = ["--cpu-devices", "2", "--stream-aggregation", "--defense", "fedavg"]
    r = subprocess.run(
        [*cmd, *extra],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=300,
    )
    assert r.returncode == 2, r.stderr
    want = "error: --stream-aggregation runs on one device; --devices auto shards the "
    assert want + "clients over 2; accepted: --devices 1" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- real runs
TINY_RUN = (*BASE, "--rounds", "1", "--defense", "fedavg", "--quiet")


@pytest.fixture(scope="module")
def chance_ds():
    """Blob training images; a test set of one blank image with balanced labels, so every
    model predicts one class for all of it: A is exactly 10 %, whatever the model."""
    ds = make_blob_dataset(n_train=400, n_test=100)
    return dataclasses.replace(
        ds, x_test=np.zeros_like(ds.x_test), y_test=np.arange(100, dtype=np.int32) % 10
    )


@pytest.fixture
def offline(monkeypatch, chance_ds):
    """The CLI loads `chance_ds` instead of MNIST; `calls` counts data loads."""
    calls = []

    def load(*args, **kwargs):
        calls.append(args)
        return chance_ds

    monkeypatch.setattr("spmc_jax.data.load_dataset", load)
    return calls


def test_runs_are_never_overwritten_and_a_dead_model_is_flagged(
    offline, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    assert main([*TINY_RUN, "--lr", "0.05"]) == 0  # default --out, under ./runs
    (out,) = (tmp_path / "runs").iterdir()
    cfg = Config(
        dataset="mnist", model="mlp", clients=4, rounds=1, local_epochs=1, batch_size=16,
        eval_batch=100, gamma=0.25, defense="fedavg", lr=0.05,
    )  # fmt: skip
    assert out.name == default_out(cfg).name == f"mnist-fedavg-base-g0.25-s0-{cfg.config_hash()}"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert {"metrics.jsonl", "summary.json", "plan.json", "curves.png"} <= set(before)
    capsys.readouterr()
    loads = len(offline)
    # The same config again, and a dry run into it: refused before any data is loaded.
    for extra in ([], ["--dry-run"]):
        assert main([*TINY_RUN, "--lr", "0.05", *extra]) == 2
        err = capsys.readouterr().err
        assert f"--out 'runs/{out.name}' already holds a run" in err
        assert "--overwrite" in err and "--resume" in err
    assert len(offline) == loads
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # A config that changes the numbers gets its own default folder.
    assert main([*TINY_RUN, "--lr", "0.07", "--dry-run"]) == 0
    assert len(list((tmp_path / "runs").iterdir())) == 2
    capsys.readouterr()

    # --overwrite replaces the run, here by one where every client overflows (--lr 1e30):
    # the global model never moves, each round names its non-finite clients, and the run is
    # flagged as not learned.
    argv = [*TINY_RUN, "--lr", "1e30", "--rounds", "2", "--out", str(out), "--overwrite"]
    assert main([a for a in argv if a != "--quiet"]) == 0
    text = capsys.readouterr().out
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]  # fresh rows, numbered from 1
    for r in rows:
        assert r["nonfinite"] == 4 and r["nonfinite_ids"] == [0, 1, 2, 3]
        assert f"round   {r['round']}/2  A  10.00" in text
        line = f"warning: round {r['round']}/2: 4 of 4 clients non-finite (ids 0, 1, 2, 3)"
        assert line in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["lr"] == 1e30
    assert summary["last5"]["A"] == pytest.approx(10.0)  # chance_ds: exactly chance
    assert summary["learned"] is False and summary["last5"]["chance"] == pytest.approx(10.0)
    assert "warning: NOT LEARNED: mean A 10.00 % is within 5 points of chance (10.00 %)" in text
    assert "last-2-round means:" in text and "last-5" not in text


def test_default_out_hash_follows_the_numbers_only():
    cfg = Config()
    for changed in (
        cfg.replace(lr=0.02), cfg.replace(rounds=3), cfg.replace(subsample=2000),
        cfg.replace(spmc_space="updates"), cfg.replace(local_epochs=2),
        cfg.replace(defense_opts=(("temperature", "2"),)), cfg.replace(min_size=20),
    ):  # fmt: skip
        assert default_out(changed) != default_out(cfg)
    for same in (cfg.replace(out="x", data_dir="/d", fetch=False), cfg.replace(eval_batch=7)):
        assert default_out(same) == default_out(cfg)


def test_learned_threshold():
    assert learned(15.0, 10)["learned"] is False  # at the margin: still chance
    assert learned(15.01, 10)["learned"] is True
    assert learned(None, 10)["learned"] is False
    assert learned(float("nan"), 10)["learned"] is False
    assert learned(55.0, 2)["learned"] is False and learned(55.1, 2)["learned"] is True


def test_attack_window_is_1_based(chance_ds):
    import jax.numpy as jnp

    from spmc_jax.engine import Simulation

    cfg = Config(
        dataset="mnist", model="mlp", clients=4, rounds=3, local_epochs=1, batch_size=16,
        gamma=0.25, defense="fedavg", attack_start=2, attack_end=2,
    )  # fmt: skip
    sim = Simulation(cfg, chance_ds)
    # The engine's loop index r is 0-based: round r + 1 is attacked iff start <= r+1 <= end.
    assert [bool(sim._attack_active(jnp.asarray(r))) for r in range(3)] == [False, True, False]
    assert Config(rounds=3).last_attack_round == 3


def _cell(defense: str, a: float, r: float, is_learned: bool) -> dict:
    return {
        "cell": sweep.Cell("mnist", defense, 0.2, 0, "paper").id,
        "dataset": "mnist", "defense": defense, "gamma": 0.2, "seed": 0,
        "local_epochs": 1, "mean_attacker_weight": 0.2, "learned": is_learned,
        "last5": {"A": a, "R": r, "V": (a + r) / 2, "R_excl_target": r},
        "data": {"name": "mnist", "source": "test", "n_train_full": 100, "n_train": 100,
                 "n_test_full": 50, "n_test": 50},
        "timing": {"wall_s": 1.0, "cpu_s": 1.0, "backend_compile_s": 0.5, "trace_s": 0.1,
                   "lower_s": 0.1, "cache_hits": 0, "later_round_s": None},
    }  # fmt: skip


def test_table_marks_a_dead_model_and_never_bolds_it(tmp_path):
    spec = sweep.SweepSpec(
        preset="x", datasets=("mnist",), defenses=("fedavg", "spmc"), gammas=(0.2,),
        seeds=(0,), protocol="paper", base=Config(rounds=3),
    )  # fmt: skip
    # SPMC at chance: V 55.05 beats FedAvg's 50, but it learned nothing.
    cells = [_cell("fedavg", 60.0, 40.0, True), _cell("spmc", 10.1, 100.0, False)]
    text = sweep.render_table(spec, {c["cell"]: c for c in cells}, env={})
    rows = table_rows(text, "0.2")
    # † too: FedAvg's R excl. target 40 >= 20, the undefended attack did not implant.
    assert rows["SPMC"] == ["⚠ 10.10↓ / 100.00↑ / 55.05↑ †"]
    assert rows["FedAvg"] == ["60.00 / 40.00 / **50.00** †"]
    assert "⚠: the model stayed at chance accuracy" in text
    assert "means over the last 3 evaluated rounds" in text
    # The figure takes the same flag (drawn dashed, "chance level" in the legend and title).
    rows_jsonl = [
        {"dataset": "mnist", "defense": c["defense"], "gamma": 0.2, "round": k, "A": 1.0, "R": 2.0}
        for c in cells
        for k in (1, 2, 3)
    ]
    path = tmp_path / "c.png"
    assert sweep.plot_sweep_curves(rows_jsonl, path, spec, not_learned={("spmc", 0.2)}) == "mnist"
    assert path.stat().st_size > 1000


def test_every_rule_and_attack_passes_validation_with_its_defaults():
    """The shape-only builds refuse nothing that a real run accepts (no false errors)."""
    from spmc_jax.aggregators import REGISTRY as DEFENSES
    from spmc_jax.attacks import REGISTRY as ATTACKS

    base = Config(model="mlp", clients=4, gamma=0.25)
    for name in DEFENSES.names():
        for protocol in ("fair", "paper"):
            base.replace(defense=name, protocol=protocol).validate()
    for name in ATTACKS.names():
        base.replace(attack=name, defense="fedavg").validate()


def test_a_new_rule_is_validated_by_its_own_factory(monkeypatch, capsys, no_data, tmp_path):
    """No per-rule code in config.py: a rule added in a new file gets its checks run."""
    from spmc_jax.aggregators import REGISTRY, AggregatorSpec
    from spmc_jax.aggregators.fedavg import fedavg

    def toy(env, *, k: int = 1):
        if not 1 <= k <= env.n_clients:
            raise ValueError(f"toy: k={k}; accepted: 1..{env.n_clients} (n)")
        return fedavg(env)

    REGISTRY.names()  # load the package's rules first
    monkeypatch.setitem(REGISTRY._items, "toy", AggregatorSpec("toy", toy, "a test rule"))
    argv = [*BASE, "--out", str(tmp_path / "o"), "--defense", "toy", "--defense-opt", "k=9"]
    for mode in ([], ["--dry-run"]):
        assert _main([*argv, *mode]) == 2
        assert "--defense toy (with n=4 clients per round" in capsys.readouterr().err
    assert no_data == []
    Config(model="mlp", clients=4, defense="toy", defense_opts=(("k", "4"),)).validate()


def test_curves_have_integer_round_ticks_and_the_chance_note(tmp_path):
    from spmc_jax.train import plot_curves

    hist = [{"round": r, "A": 10.0, "R": 100.0} for r in (1, 2, 3)]
    fig = plot_curves(hist, tmp_path / "c.png", "t", note="NOT LEARNED: test")
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        assert [x for x, _ in ax.lines[0].get_xydata()] == [1, 2, 3]
    assert any(t.get_text() == "NOT LEARNED: test" for t in fig.texts)
    assert (tmp_path / "c.png").stat().st_size > 1000
