"""Many hosts: 2 CPU processes on localhost (`jax.distributed`) equal the single-process run.

Each process sees its own CPU device; after `initialize_distributed` the mesh spans both, the
client axis is split across the processes and the aggregation's cross-client sums become
cross-process collectives (gloo on CPU). Both processes print the final global model.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    from spmc_jax.sharding import initialize_distributed
    nproc = int(sys.argv[2])
    if nproc > 1:
        initialize_distributed(sys.argv[1], nproc, int(sys.argv[3]))
    import jax
    import numpy as np
    from conftest import make_blob_dataset
    from spmc_jax.config import Config
    from spmc_jax.engine import Simulation, run

    ds = make_blob_dataset(n_train=800, n_test=100)
    cfg = Config(defense="fedavg", model="mlp", clients=4, rounds=1, local_epochs=1, batch_size=16,
                 gamma=0.25, eval_batch=100, devices="auto")
    sim = Simulation(cfg, ds)
    res = run(cfg, ds, sim=sim)
    g = res.state.global_flat
    flat = np.asarray(g.addressable_shards[0].data)
    print("RESULT" + json.dumps(dict(devices=len(jax.devices()), procs=jax.process_count(),
                                     mesh=None if sim.mesh is None else sim.mesh.size,
                                     global_flat=flat.tolist(), A=res.history[0]["A"],
                                     blocks=[sh.index[0].start or 0
                                             for sh in sim.data.train.x.addressable_shards],
                                     pid=jax.process_index())))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(script: Path, nproc: int) -> list[dict]:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    addr = f"127.0.0.1:{_free_port()}"
    # Output goes to files, not pipes: a full pipe would stall one process while the other
    # waits for it in jax.distributed's shutdown barrier.
    logs = [
        (script.with_suffix(f".{nproc}.{i}.out"), script.with_suffix(f".{nproc}.{i}.err"))
        for i in range(nproc)
    ]
    procs = []
    for i, (o, e) in enumerate(logs):
        with o.open("w") as fo, e.open("w") as fe:
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(script), addr, str(nproc), str(i)],
                    env=env,
                    stdout=fo,
                    stderr=fe,
                )
            )
    outs = []
    try:
        for p, (o, e) in zip(procs, logs, strict=True):
            p.wait(timeout=600)
            assert p.returncode == 0, e.read_text()[-3000:]
            line = next(ln for ln in o.read_text().splitlines() if ln.startswith("RESULT"))
            outs.append(json.loads(line[len("RESULT") :]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs


def test_two_processes_equal_one(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT), tests=str(ROOT / "tests")))
    (single,) = _launch(script, 1)
    pair = _launch(script, 2)
    assert single["procs"] == 1 and single["mesh"] is None
    a = np.asarray(single["global_flat"])
    for r in pair:
        assert r["procs"] == 2 and r["devices"] == 2 and r["mesh"] == 2
        # Each process holds only its own block of clients' training images.
        assert r["blocks"] == [r["pid"]]
        # Cross-process all-reduce changes only float32 summation order: 1e-5 of the scale.
        np.testing.assert_allclose(
            np.asarray(r["global_flat"]), a, rtol=1e-4, atol=1e-5 * np.abs(a).max()
        )
        assert abs(r["A"] - single["A"]) <= 1.0 + 1e-6  # at most one of 100 images flips
