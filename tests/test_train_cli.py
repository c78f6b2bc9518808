"""The CLI end to end on a real-data slice, plus its input errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from spmc_jax.compile_options import ynn_dot_fusion_supported
from spmc_jax.train import main


def _cli(*args, cwd=None, env=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "spmc_jax.train", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=900,
    )


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--dataset", "svhn"], "accepted: mnist, fashion_mnist, cifar10"),
        (["--defense", "nope"], "unknown defense 'nope'"),
        (["--attack", "nope"], "unknown attack 'nope'"),
        (["--gamma", "1.5"], "--gamma must be in [0, 1)"),
        (["--clients", "1"], "--clients must be >= 2"),
        (["--data-dir", "/nonexistent/dir"], "not a readable directory"),
        (["--attack-opt", "scaling.boost=2"], "not part of --attack"),
    ],
)
def test_bad_input_fails_fast_with_a_clear_message(args, needle, capsys):
    assert main(args) == 2
    assert needle in capsys.readouterr().err


def test_help_lists_registries(capsys):
    assert main(["--defense", "help"]) == 0
    out = capsys.readouterr().out
    assert "fedavg" in out and "spmc" in out
    assert main(["--attack", "help"]) == 0
    assert "base" in capsys.readouterr().out


def test_dry_run_writes_plan(tmp_path, real_dataset):
    real_dataset("mnist")
    r = _cli("--dataset", "mnist", "--dry-run", "--no-fetch", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    sizes = [c["samples"] for c in plan["plan"]["clients"]]
    # The reference's MNIST seed-0 shards (tests/data/test_partition.py derives them).
    assert sizes == [7063, 3155, 4322, 5545, 5642, 3907, 8589, 5008, 6163, 4606]
    assert plan["plan"]["num_params"] == 92_626
    assert plan["plan"]["malicious_ids"] == [8, 9]
    assert plan["config"]["gamma"] == 0.2
    assert "jax" in plan["environment"]["packages"]
    assert not (tmp_path / "metrics.jsonl").exists()


def _train_rows(tmp_path, *args, env=None):
    """Run the CLI offline into `tmp_path`; (completed process, metrics.jsonl rows)."""
    r = _cli(*args, "--no-fetch", "--out", str(tmp_path), env=env)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return r, rows


@pytest.mark.slow
def test_two_round_run_on_real_mnist_slice(tmp_path, real_dataset):
    real_dataset("mnist")
    cache = tmp_path.parent / f"{tmp_path.name}-xla"
    r, rows = _train_rows(
        tmp_path,
        *("--dataset", "mnist", "--subsample", "4000", "--clients", "4", "--rounds", "2"),
        *("--defense", "fedavg", "--local-epochs", "5", "--gamma", "0.25"),
        *("--partition", "iid", "--lr", "0.05"),  # IID + lr 0.05: learns within 2 short rounds
        env={"JAX_COMPILATION_CACHE_DIR": str(cache)},
    )
    # The CLI keeps a persistent compilation cache (the user's directory wins).
    assert any(cache.iterdir())
    assert [x["round"] for x in rows] == [1, 2]
    for key in ("A", "R", "R_excl_target", "V", "seconds", "client_weights"):
        assert key in rows[-1]
    assert rows[-1]["A"] > 30.0  # chance is 10 %
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["last5"]["A"] is not None
    assert summary["learned"] is True  # A > 30 % is far above chance (10 %)
    assert summary["config"]["defense"] == "fedavg"
    assert summary["environment"]["device"]["backend"] == "cpu"
    # Which CPU and which numeric switches: both move float32 results in their last digits.
    assert summary["environment"]["cpu"]["logical_cpus"] == os.cpu_count()
    assert summary["environment"]["numerics"]["fold_equal_channels"] is True
    # The CLI's default compiles with XLA:CPU's YNNPACK dot fusion where this jaxlib has it.
    assert summary["cpu_dot_fusion"] == ("ynn" if ynn_dot_fusion_supported() else "off")
    # The command line splits the CPU into one device per core, and the 4 clients train
    # sharded over them (issue 14): 2 devices on a 2-core machine, 1 on one core.
    cores = len(os.sched_getaffinity(0))
    assert summary["environment"]["device"]["device_count"] == cores
    assert summary["client_devices"] == max(d for d in range(1, min(cores, 4) + 1) if 4 % d == 0)
    placement = summary["device_placement"]  # which device trained which client
    if summary["client_devices"] == 1:
        assert placement is None
    else:
        clients = placement["clients"]
        assert len(clients) == summary["client_devices"]
        assert sorted(np.concatenate(clients).tolist()) == [0, 1, 2, 3]
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert "round   2/2" in r.stdout


def test_cli_compile_cache_defaults_to_the_data_cache(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path)
    code = "from spmc_jax.train import enable_cli_compile_cache as f; print(f())"
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "spmc_jax" / "jax_cache")
    assert (tmp_path / "spmc_jax" / "jax_cache").is_dir()


@pytest.mark.slow
def test_two_round_spmc_run_reports_alpha(tmp_path, real_dataset):
    real_dataset("fashion_mnist")
    _, rows = _train_rows(
        tmp_path,
        *("--dataset", "fashion_mnist", "--subsample", "3000", "--clients", "4"),
        *("--rounds", "2", "--local-epochs", "2", "--gamma", "0.25"),
    )
    for row in rows:
        alpha = row["client_weights"]
        assert len(alpha) == 4 and abs(sum(alpha) - 1) < 1e-5
        assert 0 <= row["attacker_weight"] <= 1
        assert 0 <= row["A"] <= 100 and 0 <= row["R"] <= 100
    assert max(rows[-1]["projected"]) > 0  # the client-side projection ran
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["derived"]["defense_options"]["space"] == "weights"


def test_default_cpu_devices_rules(monkeypatch):
    # One device per allowed core from the command line, except where a split cannot apply.
    from spmc_jax.train import default_cpu_devices, parse_args

    for v in ("SPMC_COORDINATOR", "SPMC_NUM_PROCESSES", "SPMC_DISTRIBUTED", "JAX_PLATFORMS"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2}, raising=False)
    assert default_cpu_devices(parse_args([])) == 3
    assert default_cpu_devices(parse_args(["--devices", "1"])) is None
    assert default_cpu_devices(parse_args(["--stream-aggregation"])) is None
    assert default_cpu_devices(parse_args(["--num-processes", "2"])) is None
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert default_cpu_devices(parse_args([])) is None
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert default_cpu_devices(parse_args([])) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0}, raising=False)
    assert default_cpu_devices(parse_args([])) is None
