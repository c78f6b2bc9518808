"""benchmarks/table2_device.sh on CPU: a tiny grid, stopped by its time limit in the first
call and finished by a second call that resumes the first call's output, with only the
packages the accelerator machine has (tensorflow-datasets and the like are blocked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from spmc_jax.data.synthetic import make_synthetic

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "table2_device.sh"
# Importable here but absent on the device machine (or heavy optional dependencies).
BLOCKED = ("tensorflow", "tensorflow_datasets", "torch", "sklearn", "hdbscan", "wandb",
           "tensorboardX", "pandas")  # fmt: skip
# None in sys.modules: `import x` fails and `importlib.util.find_spec(x)` says "not installed".
SITECUSTOMIZE = f"import sys\nsys.modules.update(dict.fromkeys({BLOCKED!r}))\n"
SWEEP_ARGS = (
    "--defenses fedavg --gammas 0.25 0.5 --rounds 2 --clients 4 --subsample full "
    "--test-subsample full --model mlp --batch-size 32 --local-epochs 1 --quiet"
)


def _call(tmp: Path, out: Path, **env: str) -> subprocess.CompletedProcess:
    full = {
        **os.environ,
        "PYTHONPATH": str(tmp / "site"),
        "JAX_PLATFORMS": "cpu",
        "OUT": str(out),
        "DATA_DIR": str(tmp / "data"),
        "PRESET": "smoke",
        "SWEEP_ARGS": SWEEP_ARGS,
        "SAFETY_S": "0",
        "CELL_BATCH": "2",  # the device's 'auto' batches; on CPU 'auto' is 1
        # Shared by both calls: the second loads the first call's compiled programs.
        "JAX_COMPILATION_CACHE_DIR": str(tmp / "jax_cache"),
        **env,
    }
    return subprocess.run(["bash", str(SCRIPT), "mnist"], env=full, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def test_device_script_stops_at_its_time_limit_and_a_second_call_finishes(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (tmp_path / "data").mkdir()
    ds = make_synthetic("mnist", n_train=480, n_test=100, seed=0)
    np.savez_compressed(tmp_path / "data" / "mnist.npz", x_train=ds.x_train, y_train=ds.y_train,
                        x_test=ds.x_test, y_test=ds.y_test)  # fmt: skip
    first = _call(tmp_path, tmp_path / "o1", TIME_LIMIT_S="1")
    assert first.returncode == 3, first.stdout + first.stderr
    assert "UNFINISHED" in first.stdout
    assert len(list((tmp_path / "o1" / "sweep" / "cells").glob("batch-*.ckpt"))) == 1
    assert (tmp_path / "o1" / "table.md").is_file()
    assert json.loads((tmp_path / "o1" / "sweep.json").read_text())["status"].startswith("stop")

    second = _call(tmp_path, tmp_path / "o2", RESUME=str(tmp_path / "o1" / "sweep"))
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming the batch after round 1" in second.stdout
    o2 = tmp_path / "o2"
    rows = [json.loads(x) for x in (o2 / "results.jsonl").read_text().splitlines()]
    assert sorted((r["gamma"], r["round"]) for r in rows) == [(0.25, 1), (0.25, 2), (0.5, 1),
                                                              (0.5, 2)]  # fmt: skip
    assert all(r["A"] is not None for r in rows)
    assert "γ = 0.25" in (o2 / "table.md").read_text()
    assert (o2 / "curves.png").stat().st_size > 0
    assert "wall" in (o2 / "device.txt").read_text()
    assert sys.modules.get("tensorflow_datasets") is None
