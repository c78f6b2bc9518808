"""The `demo` preset (train and sweep) and the sweep table's "did the attack implant" marker.

The demo itself (minutes of training) is not run here: the presets are resolved, validated
and, for train, taken through a real `--dry-run` (partition and plan, no training).
"""

from __future__ import annotations

import json

import pytest

from spmc_jax import sweep
from spmc_jax.config import PRESETS, Config
from spmc_jax.train import config_from_args, main, parse_args, preset_defaults
from tests.tables import table_rows


def test_train_demo_preset_resolves_validates_and_explicit_flags_win():
    demo = PRESETS["demo"]
    cfg = config_from_args(parse_args(["--preset", "demo"])).validate()
    for key, value in demo.items():
        assert getattr(cfg, key) == value, key
    # Explicit flags win over the preset; --attack-opt replaces only the key it names.
    cfg = config_from_args(
        parse_args(["--preset", "demo", "--rounds", "3", "--attack-opt", "base.poison_rate=0.5"])
    ).validate()
    assert cfg.rounds == 3 and cfg.model == demo["model"]
    assert cfg.attack_options()["base"] == {"poison_rate": "0.5"}
    # No preset: the plain defaults, untouched by any preset.
    assert config_from_args(parse_args([])) == Config()


def test_train_preset_options_negated_flags_and_option_merging(monkeypatch):
    monkeypatch.setitem(
        PRESETS,
        "x",
        {"attack_opts": (("base", "poison_rate", "0.5"), ("base", "target", "3")),
         "projection": False, "defense_opts": (("temperature", "2"),)},
    )  # fmt: skip
    cfg = config_from_args(parse_args(["--preset", "x"]))
    assert cfg.attack_options() == {"base": {"poison_rate": "0.5", "target": "3"}}
    assert cfg.projection is False and dict(cfg.defense_opts) == {"temperature": "2"}
    # An explicit --attack-opt replaces the preset's value of that key and keeps the others.
    cfg = config_from_args(parse_args(["--preset", "x", "--attack-opt", "base.target=4"]))
    assert cfg.attack_options() == {"base": {"poison_rate": "0.5", "target": "4"}}
    monkeypatch.setitem(PRESETS, "bad", {"train_ratio": 0.5})  # a Config field with no flag
    with pytest.raises(ValueError, match="'train_ratio' is not a train option"):
        parse_args(["--preset", "bad"])


def test_train_unknown_preset_is_refused_naming_the_accepted_ones(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--preset", "nope"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "nope" in err and all(name in err for name in PRESETS)
    with pytest.raises(ValueError, match="accepted: paper, smoke"):
        preset_defaults("nope")


def test_train_demo_preset_reaches_the_run(tmp_path, real_dataset):
    """A real --dry-run: the plan's config and client split come from the preset."""
    demo = PRESETS["demo"]
    real_dataset(demo["dataset"])
    out = tmp_path / "plan"
    assert main(["--preset", "demo", "--dry-run", "--no-fetch", "--out", str(out)]) == 0
    plan = json.loads((out / "plan.json").read_text())
    for key in ("dataset", "model", "rounds", "subsample", "protocol"):
        assert plan["config"][key] == demo[key], key
    clients = plan["plan"]["clients"]
    assert len(clients) == demo["clients"]
    # The slice, less the validation share the partition holds out (train_ratio).
    assert sum(c["samples"] for c in clients) == round(demo["subsample"] * Config().train_ratio)
    # The MLP (3072 -> 64 -> 10), not the default SimpleCNN (92,626 parameters).
    assert plan["plan"]["num_params"] == 3072 * 64 + 64 + 64 * 10 + 10


def test_sweep_demo_preset_matches_train_and_validates():
    spec = sweep.make_spec("demo").validate()
    assert "spmc" in spec.defenses and "fedavg" in spec.defenses and len(spec.defenses) >= 4
    # Every cell runs train's demo configuration (only the grid axes differ).
    cfg = spec.config(spec.cells()[0])
    for key, value in PRESETS["demo"].items():
        if key != "protocol":  # the sweep's protocol is its own flag (default: paper)
            assert getattr(cfg, key) == value, key
    assert spec.protocol == PRESETS["demo"]["protocol"]
    # The paper protocol: SPMC 10 local epochs, the baselines 1.
    assert {c.defense: spec.config(c).epochs for c in spec.cells()} == {
        "fedavg": 1,
        "dnc": 1,
        "rfa": 1,
        "rlr": 1,
        "spmc": 10,
    }
    assert "demo" in sweep.list_presets()


def _summary(defense, dataset, r_excl):
    a, r = 90.0, r_excl
    return {
        "cell": sweep.Cell(dataset, defense, 0.2, 0, "paper").id,
        "dataset": dataset, "defense": defense, "gamma": 0.2, "seed": 0,
        "local_epochs": 1, "mean_attacker_weight": 0.2,
        "last5": {"A": a, "R": r, "V": (a + r) / 2, "R_excl_target": r_excl},
        "data": {"name": dataset, "source": "test", "n_train_full": 100, "n_train": 100,
                 "n_test_full": 50, "n_test": 50},
        "timing": {"wall_s": 1.0, "cpu_s": 1.0, "backend_compile_s": 0.5, "trace_s": 0.1,
                   "lower_s": 0.1, "cache_hits": 0, "later_round_s": None},
    }  # fmt: skip


def test_table_marks_cells_where_the_undefended_attack_did_not_implant():
    spec = sweep.SweepSpec(
        preset="x", datasets=("mnist", "fashion_mnist", "cifar10"), defenses=("fedavg", "spmc"),
        gammas=(0.2,), seeds=(0,), protocol="paper", base=Config(),
    )  # fmt: skip
    # MNIST: FedAvg's attack success excl. target 95 % (implanted); FashionMNIST: 20.0 % →
    # R excl. 80 (not implanted, SPMC's high R there means nothing); the boundary R excl. =
    # 20 is "not implanted" (implanted needs attack success >= 80 %, i.e. R excl. < 20).
    cells = [
        _summary("fedavg", "mnist", 5.0),
        _summary("spmc", "mnist", 70.0),
        _summary("fedavg", "fashion_mnist", 80.0),
        _summary("spmc", "fashion_mnist", 90.0),
        _summary("fedavg", "cifar10", 20.0),
    ]
    text = sweep.render_table(spec, {c["cell"]: c for c in cells}, env={})
    rows = table_rows(text, "0.2")
    assert "| method | FashionMNIST | CIFAR-10 | MNIST |" in text
    fm, cifar, mnist = zip(*(rows[m] for m in ("FedAvg", "SPMC")), strict=True)
    assert all(c.endswith(" †") for c in fm)  # not implanted: every method's cell marked
    assert cifar[0].endswith(" †") and cifar[1] == "–"  # boundary; a missing cell stays "–"
    assert not any("†" in c for c in mnist)  # implanted: no marker
    assert (
        "FedAvg's backdoor implanted (R excl. target < 20) at γ = 0.2: "
        "FashionMNIST no † (R excl. target 80.00); CIFAR-10 no † (R excl. target 20.00); "
        "MNIST yes (R excl. target 5.00)"
    ) in text
    # Without a FedAvg cell the table cannot tell, and says so instead of marking.
    no_fedavg = {c["cell"]: c for c in cells if c["defense"] != "fedavg"}
    text = sweep.render_table(spec, no_fedavg, env={})
    assert not any("†" in c for cells_ in table_rows(text, "0.2").values() for c in cells_)
    assert "MNIST – (no FedAvg cell)" in text


def test_train_smoke_preset_is_the_sweeps_implanting_smoke_config():
    """`train --preset smoke` runs one cell of `sweep --preset smoke` (where FedAvg implants)."""
    from spmc_jax import sweep

    train_smoke = dict(PRESETS["smoke"])
    sweep_smoke = sweep.PRESETS["smoke"]
    assert train_smoke.pop("gamma") == sweep_smoke["grid"]["gammas"][0]
    assert train_smoke.pop("dataset") == sweep_smoke["grid"]["datasets"][0]
    assert train_smoke == sweep_smoke["config"]
