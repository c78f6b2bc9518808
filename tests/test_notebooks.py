"""End-to-end smoke runs of the notebooks (notebooks/*.ipynb) in a real Jupyter kernel.

Each notebook runs top to bottom under nbclient in smoke mode (`SPMC_NOTEBOOK_SMOKE=1`: the
install cell does nothing and every run is shrunk). A probe cell, appended in memory only,
prints the notebook's final result dict as JSON; the tests check those numbers against the
package's own definitions and invariants, not just that no cell raised.

Kernel: a kernelspec written for the test runs `sys.executable -m ipykernel_launcher`, so the
kernel is this interpreter (the venv's) whatever kernelspecs the user or the system has
installed (`python -m ipykernel install` is never needed). Data: real MNIST, found like the
other real-data tests (`real_dataset`: skip with a reason locally, fail in CI when missing).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import nbclient
import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from spmc_jax import sweep
from tests.tables import table_rows

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
KERNEL_NAME = "spmc-jax-notebook-test"
# Per-cell limit: a smoke cell takes well under a minute on 2 cores; this only stops a hang.
CELL_TIMEOUT_S = 600
# A, R, V are float32 percentages and V = (A + R)/2 is computed from them in float32: rounding
# of numbers <= 100 is ~1e-5; 1e-4 leaves margin.
F32_PCT_TOL = 1e-4
# Client weights are float32 (softmax or 1/n) read back as floats: their sum is 1 up to a few
# float32 ulps per client.
F32_WEIGHT_TOL = 1e-5
# SPMC's alpha = softmax(cos / T) with T = 1 and cos in [-1, 1]: max/min alpha <= e^2.
SPMC_MAX_ALPHA_RATIO = math.e**2
FAKE_DEVICES = 4
# Clean accuracy FedAvg must keep in the quickstart's smoke mode (last-5 mean in %; chance is
# 10, the sweep's smoke preset measures 81).
QUICKSTART_MIN_A = 70.0
PROBE = "__NOTEBOOK_RESULT__"
_FIND_SPEC = importlib.util.find_spec  # the real one, before any test patches it


def test_committed_notebooks_are_valid_and_cleared():
    """Outputs are never committed: every code cell has no outputs and no execution count."""
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert {"quickstart.ipynb", "tpu_sweep.ipynb"} <= {p.name for p in paths}
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata.kernelspec.name == "python3", path.name
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, (path.name, cell.id)


# ----------------------------------------------------------------------------- running
def _kernel_manager(tmp_path: Path) -> AsyncKernelManager:
    """A kernel manager whose only kernelspec runs this interpreter's ipykernel."""
    spec_dir = tmp_path / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "spmc_jax test kernel",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
    return AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)


def _kernel_env(out: Path, fake_devices: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env["SPMC_NOTEBOOK_SMOKE"] = "1"
    env["SPMC_NOTEBOOK_OUT"] = str(out)
    env["JAX_PLATFORMS"] = "cpu"
    # The working tree's package, also when it is not pip-installed.
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("MPLBACKEND", None)  # keep the kernel's inline backend (figures become outputs)
    if fake_devices is not None:
        flags = [
            f
            for f in env.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")
        ]
        flags.append(f"--xla_force_host_platform_device_count={fake_devices}")
        env["XLA_FLAGS"] = " ".join(flags)
    return env


def run_notebook(
    name: str, result_var: str, tmp_path: Path, fake_devices: int | None = None
) -> tuple[Any, dict[str, Any]]:
    """Execute notebooks/<name> in smoke mode; returns (executed notebook, probe JSON)."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    probe = (
        "import json, sys\n"
        f"print({PROBE!r}, json.dumps({{'prefix': sys.prefix, 'result': {result_var}}}))"
    )
    nb.cells.append(nbformat.v4.new_code_cell(probe))
    work = tmp_path / "cwd"
    work.mkdir()
    client = nbclient.NotebookClient(
        nb,
        km=_kernel_manager(tmp_path),
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(work)}},
    )
    client.execute(env=_kernel_env(tmp_path / "out", fake_devices))
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    line = next(x for x in text.splitlines() if x.startswith(PROBE))
    probe_out = json.loads(line[len(PROBE) :])
    # The kernel ran in this interpreter's environment (the venv under test, not the system's:
    # a venv's python is a symlink, so compare prefixes rather than resolved executables).
    assert probe_out["prefix"] == sys.prefix
    return nb, probe_out["result"]


def _images(nb: Any) -> int:
    """Number of PNG images among the executed notebook's outputs."""
    return sum(
        "image/png" in o.get("data", {})
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )


def _check_pct(a: list[float], r: list[float], v: list[float]) -> None:
    for x, y, z in zip(a, r, v, strict=True):
        assert 0.0 <= x <= 100.0 and 0.0 <= y <= 100.0
        assert abs(z - (x + y) / 2) < F32_PCT_TOL


# ----------------------------------------------------------------------------- quickstart
def test_quickstart_runs_fedavg_and_spmc_and_reports_weights(tmp_path, real_dataset):
    real_dataset("mnist")
    nb, res = run_notebook("quickstart.ipynb", "quickstart_result", tmp_path)
    assert set(res) == {"fedavg", "spmc"}
    # Smoke mode is the sweep's smoke preset: 10 clients, gamma 0.3 -> floor(10 * 0.3) = 3
    # attackers, the last ids; 12 rounds of 3 local epochs.
    smoke = sweep.make_spec("smoke")
    assert smoke.gammas == (0.3,) and smoke.base.clients == 10 and smoke.base.rounds == 12
    assert smoke.base.local_epochs == 3 and smoke.base.subsample == 6000
    for defense, r in res.items():
        assert r["rounds"] == list(range(1, 13)), defense
        assert r["local_epochs"] == 3
        assert r["malicious_ids"] == [7, 8, 9]
        _check_pct(r["A"], r["R"], r["V"])
        ids, w = r["client_ids"], r["client_weights"]
        assert sorted(ids) == list(range(10))
        assert min(w) >= 0.0 and abs(sum(w) - 1.0) < F32_WEIGHT_TOL
        # attacker_weight is the attackers' share of the weights the notebook shows.
        share = sum(wi for i, wi in zip(ids, w, strict=True) if i in r["malicious_ids"]) / sum(w)
        assert abs(r["attacker_weight"][-1] - share) < F32_WEIGHT_TOL
    # FedAvg's backdoor implants (issue #17): attack success on triggered non-target images
    # >= 80 % (R_excl_target <= 20) over the last 5 rounds, clean accuracy far above chance.
    fedavg = res["fedavg"]
    assert sum(fedavg["R_excl_target"][-5:]) / 5 < sweep.IMPLANTED_R_EXCL
    assert sum(fedavg["A"][-5:]) / 5 >= QUICKSTART_MIN_A
    # FedAvg is the uniform mean: every client 1/10, the 3 attackers 3/10 of the aggregate.
    assert all(abs(x - 0.1) < F32_WEIGHT_TOL for x in res["fedavg"]["client_weights"])
    assert all(abs(x - 0.3) < F32_WEIGHT_TOL for x in res["fedavg"]["attacker_weight"])
    # SPMC's alpha is a softmax of cosines (T = 1): positive, max/min bounded by e^2.
    alpha = res["spmc"]["client_weights"]
    assert min(alpha) > 0.0 and max(alpha) / min(alpha) <= SPMC_MAX_ALPHA_RATIO
    # The A/R/V figure and the weights figure were drawn.
    assert _images(nb) >= 2


# ----------------------------------------------------------------------------- tpu_sweep
def _parse_cell(text: str) -> list[float]:
    """'12.34↑ / 5.60 / **8.97**' -> [12.34, 5.6, 8.97] (markers such as ⚠ dropped)."""
    return [float(re.sub(r"[*↑↓⚠†\s]", "", x)) for x in text.split(" / ")]


def test_tpu_sweep_shards_clients_renders_table_and_times_rounds(tmp_path, real_dataset):
    real_dataset("mnist")
    nb, res = run_notebook("tpu_sweep.ipynb", "sweep_result", tmp_path, fake_devices=FAKE_DEVICES)
    # The sharded path: 8 clients over the 4 fake CPU devices, 2 contiguous clients each.
    assert res["n_devices"] == FAKE_DEVICES
    assert res["mesh"] == {"axis_names": ["clients"], "size": FAKE_DEVICES}
    shards = res["shards"]
    assert [s["clients"] for s in shards] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert len({s["device"] for s in shards}) == FAKE_DEVICES
    assert all(s["shape"][0] == 1 and s["images"] > 0 for s in shards)

    cells = res["cells"]
    want = {f"mnist-{d}-g{g}-s0-paper" for d in ("fedavg", "spmc") for g in ("0.2", "0.3")}
    assert set(cells) == want
    # Recomputed here from the sweep's own per-round rows: 2 rounds per cell, the reported
    # A/R/V are their means, the steady time is the second round's and rounds/s its inverse.
    rows = [json.loads(x) for x in (tmp_path / "out/results.jsonl").read_text().splitlines()]
    for cid, c in cells.items():
        mine = [r for r in rows if r["cell"] == cid]
        assert [r["round"] for r in mine] == [1, 2] and c["rounds"] == 2
        _check_pct([r["A"] for r in mine], [r["R"] for r in mine], [r["V"] for r in mine])
        for k in ("A", "R", "V"):
            assert c[k] == pytest.approx(sum(r[k] for r in mine) / 2)
        assert c["first_round_s"] == mine[0]["seconds"] > 0
        assert c["steady_round_s"] == mine[1]["seconds"] > 0
        assert c["rounds_per_s"] == pytest.approx(1 / mine[1]["seconds"])
        assert c["client_updates_per_s"] == pytest.approx(8 / mine[1]["seconds"])

    # table.md: the paper's layout, our last-round means (2 rounds: mean of both) in each
    # row, the paper's numbers (read here straight from the resource file) under it.
    paper = json.loads((ROOT / "spmc_jax/resources/paper_results.json").read_text())
    published = {(r["gamma"], r["method"], r["dataset"]): r for r in paper["rows"]}
    names = {"fedavg": "FedAvg", "spmc": "SPMC"}
    for g in ("0.2", "0.3"):
        rows = table_rows(res["table_md"], g)
        assert set(rows) == {"FedAvg", "published FedAvg", "SPMC", "published SPMC"}
        for d, label in names.items():
            ours = cells[f"mnist-{d}-g{g}-s0-paper"]
            got = _parse_cell(rows[label][0])
            assert got == pytest.approx([ours[k] for k in "ARV"], abs=0.005 + 1e-9)
            pub = published[float(g), d, "mnist"]
            assert _parse_cell(rows[f"published {label}"][0]) == [pub[k] for k in "ARV"]
    # The side-by-side comparison carries the same published numbers and the differences.
    for row in res["comparison"]:
        pub = published[row["gamma"], row["defense"], row["dataset"]]
        assert [row["paper"][k] for k in "ARV"] == [pub[k] for k in "ARV"]
        ours = cells[row["cell"]]
        assert row["dV"] == pytest.approx(ours["V"] - pub["V"])
    assert len(res["comparison"]) == 4
    assert _images(nb) >= 2  # the timing chart and the sweep's curves.png


# ----------------------------------------------------------------------------- install cells
@pytest.fixture(scope="module")
def shell(tmp_path_factory):
    """An in-process IPython shell (no history file, profile in a temporary directory)."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config as TraitletsConfig

    mp = pytest.MonkeyPatch()
    mp.setenv("IPYTHONDIR", str(tmp_path_factory.mktemp("ipython")))
    conf = TraitletsConfig()
    conf.HistoryManager.hist_file = ":memory:"
    sh = InteractiveShell.instance(config=conf)
    yield sh
    InteractiveShell.clear_instance()
    mp.undo()


def _install_cell(name: str, **settings: str) -> str:
    """The notebook's install cell (its first code cell), with `NAME = "value"` lines edited."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    src = next(c.source for c in nb.cells if c.cell_type == "code")
    for key, value in settings.items():
        src, n = re.subn(rf'^{key} = ".*"$', f"{key} = {value!r}", src, flags=re.M)
        assert n == 1, key
    return src


def _run_install(shell, monkeypatch, cwd: Path, src: str, installed: bool) -> dict[str, Any]:
    """Run an install cell outside smoke mode with pip and the shell's `!` recorded, not run."""
    calls: dict[str, Any] = {"pip": [], "system": []}
    shell.register_magic_function(lambda line: calls["pip"].append(line), "line", "pip")
    # `!cmd` expands {variables} inside `system`, which the recorder replaces: expand here.
    monkeypatch.setattr(
        shell, "system", lambda cmd: calls["system"].append(shell.var_expand(cmd, depth=0))
    )
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "spmc_jax" and not installed else _FIND_SPEC(name, *a),
    )
    monkeypatch.delenv("SPMC_NOTEBOOK_SMOKE", raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(cwd)
    result = shell.run_cell(src)
    calls["error"] = result.error_in_exec
    calls["sys_path"] = list(sys.path)
    return calls


@pytest.mark.parametrize("name", ["quickstart.ipynb", "tpu_sweep.ipynb"])
def test_install_cell_installs_from_a_clone_or_a_url_and_refuses_to_guess(
    name, shell, monkeypatch, tmp_path
):
    clone = tmp_path / "clone"
    (clone / "notebooks").mkdir(parents=True)
    (clone / "pyproject.toml").write_text('[project]\nname = "spmc_jax"\n')
    elsewhere = tmp_path / "colab"
    elsewhere.mkdir()
    # Pin the jax extra ("": CPU) so the result does not depend on this machine's devices.
    pin = {"JAX_EXTRA": ""} if name == "tpu_sweep.ipynb" else {}

    # A clone: editable install of the repository root, which also goes on sys.path.
    calls = _run_install(shell, monkeypatch, clone / "notebooks", _install_cell(name, **pin), False)
    assert calls["error"] is None and calls["system"] == []
    assert calls["pip"] == ["install -q -e .."]
    assert str(clone.resolve()) in calls["sys_path"]

    # Already installed, not a clone: nothing to do.
    calls = _run_install(shell, monkeypatch, elsewhere, _install_cell(name, **pin), True)
    assert calls["error"] is None and calls["pip"] == [] and calls["system"] == []

    # Colab without REPO_URL: an error naming the variable, no guessed URL.
    calls = _run_install(shell, monkeypatch, elsewhere, _install_cell(name, **pin), False)
    assert isinstance(calls["error"], RuntimeError) and "REPO_URL" in str(calls["error"])
    assert calls["pip"] == [] and calls["system"] == []

    # Colab with REPO_URL: clone it, install it editable.
    url = "https://example.invalid/me/spmc_jax.git"
    src = _install_cell(name, REPO_URL=url, **pin)
    calls = _run_install(shell, monkeypatch, elsewhere, src, False)
    assert calls["error"] is None
    assert calls["system"] == [f"git clone -q {url} spmc_jax_repo"]
    assert calls["pip"] == ["install -q -e spmc_jax_repo"]


def test_tpu_install_cell_adds_the_chosen_jax_extra(shell, monkeypatch, tmp_path):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "spmc_jax"\n')
    for extra in ("tpu", "cuda12"):
        src = _install_cell("tpu_sweep.ipynb", JAX_EXTRA=extra)
        calls = _run_install(shell, monkeypatch, tmp_path / "notebooks", src, False)
        assert calls["error"] is None
        # The package first, then the accelerator build of jax over its plain jax.
        assert calls["pip"] == ["install -q -e ..", f'install -q -U "jax[{extra}]"']
