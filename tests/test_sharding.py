"""Many devices: the client axis sharded over 4 fake CPU devices equals the 1-device run.

XLA's host-platform device count must be set before JAX starts, so the sharded run happens in
a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4; it runs the same tiny
federation with devices=4 and devices=1 and prints both results as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from spmc_jax.engine import balanced_order, balanced_permutation, client_blocks
from spmc_jax.sharding import initialize_distributed, resolve_device_count

ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    """
    import json, sys
    import jax
    import numpy as np
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    from conftest import make_blob_dataset
    from spmc_jax.config import Config
    from spmc_jax.engine import Simulation, run

    assert len(jax.devices()) == 4, jax.devices()
    from spmc_jax.train import config_from_args, parse_args

    ds = make_blob_dataset(n_train=800, n_test=100)
    out = {{}}
    # Full participation, 8 clients of unequal sizes, 2 per device: placed on the devices by
    # balanced local steps (the default), and in contiguous id blocks (--no-balance-clients,
    # through the command line's parser).
    for defense in ("fedavg", "spmc"):
        for dev in ("1", "4", "4-contiguous"):
            if dev == "4-contiguous" and defense == "spmc":
                continue
            argv = ["--defense", defense, "--model", "mlp", "--clients", "8", "--rounds", "1",
                    "--local-epochs", "1", "--batch-size", "16", "--gamma", "0.25",
                    "--eval-batch", "100", "--devices", dev[0]]
            cfg = config_from_args(parse_args(argv + ["--no-balance-clients"] * (dev != "4")))
            sim = Simulation(cfg, ds)
            res = run(cfg, ds, sim=sim)
            g = res.state.global_flat
            out[defense + dev] = dict(
                mesh=None if sim.mesh is None else sim.mesh.size,
                global_flat=np.asarray(g).tolist(),
                n_shards=len(g.sharding.device_set),
                weights=[h["client_weights"] for h in res.history],
                A=[h["A"] for h in res.history],
                order=None if sim.train_order is None else sim.train_order.tolist(),
                sizes=np.asarray(sim.plan.partition.sizes).tolist(),
                idx=np.asarray(sim.data.idx).tolist(),
                members=[np.asarray(m).tolist() for m in sim.block_members],
                partition=np.asarray(sim.plan.partition.indices).tolist(),
            )
    # Partial participation, default client data (auto = replicated): same participants and
    # same numbers as one device.
    for defense in ("fedavg", "spmc"):
        for dev in ("1", "2", "4"):
            cfg = Config(defense=defense, model="mlp", clients=8, clients_per_round=4,
                         rounds=2, local_epochs=1, batch_size=16, gamma=0.25, eval_batch=100,
                         devices=dev)
            sim = Simulation(cfg, ds)
            res = run(cfg, ds, sim=sim)
            out["partial_" + defense + dev] = dict(
                balance_rounds=sim.balance_rounds,
                sizes=np.asarray(sim.plan.partition.sizes).tolist(),
                ids=[h["client_ids"] for h in res.history],
                global_flat=np.asarray(res.state.global_flat).tolist(),
                weights=[h["client_weights"] for h in res.history],
                n_blocks=sim.n_blocks,
                x_shards=len(sim.data.train.x.sharding.device_set),
                x_shape=list(sim.data.train.x.shape),
            )
    # Partial participation over 4 devices, client data in blocks: one block per device.
    cfg = Config(defense="spmc", model="mlp", clients=8, clients_per_round=4, rounds=3,
                 local_epochs=1, batch_size=16, gamma=0.25, eval_batch=100, devices="4",
                 client_data="blocks")
    sim = Simulation(cfg, ds)
    compiles, after_round = [], []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *a, **k: compiles.append(name) if "backend_compile" in name else None
    )
    res = run(cfg, ds, sim=sim, on_round=lambda row: after_round.append(len(compiles)))
    x = sim.data.train.x
    out["partial"] = dict(
        ids=[h["client_ids"] for h in res.history],
        x_shape=list(x.shape),
        shard_rows=[list(sh.data.shape)[:2] for sh in x.addressable_shards],
        shard_index=[sh.index[0].start for sh in x.addressable_shards],
        members=[np.asarray(m).tolist() for m in sim.block_members],
        finite=bool(np.isfinite(np.asarray(res.state.global_flat)).all()),
        compiles_after_round=after_round,
        same_shardings=[
            a.sharding == b.sharding
            for a, b in zip(jax.tree.leaves(sim.init_state()), jax.tree.leaves(res.state))
        ],
    )
    print("RESULT" + json.dumps(out))
    """
)


def _run_sharded_worker(tmp: Path) -> dict:
    script = tmp / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT), tests=str(ROOT / "tests")))
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4"
    )
    proc = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory) -> dict:
    """The worker subprocess's results (~65 s), computed once per test session: under xdist
    both workers may get tests of this module, so the first computes them under a file lock
    in the workers' shared temporary root and the other reads its JSON."""
    tmp = tmp_path_factory.mktemp("shard")
    if os.environ.get("PYTEST_XDIST_WORKER") is None:  # not distributed
        return _run_sharded_worker(tmp)
    import fcntl

    shared = tmp_path_factory.getbasetemp().parent / "sharded_results.json"
    with open(shared.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not shared.exists():
            shared.write_text(json.dumps(_run_sharded_worker(tmp)))
        return json.loads(shared.read_text())


@pytest.mark.parametrize("defense", ["fedavg", "spmc"])
def test_sharded_round_equals_single_device(sharded_results, defense):
    """8 clients over 4 devices, placed by balanced local steps (the default): the same
    model as one device up to float32 summation order."""
    one, four = sharded_results[defense + "1"], sharded_results[defense + "4"]
    assert one["mesh"] is None and four["mesh"] == 4 and four["n_shards"] == 4
    assert one["order"] is None and four["order"] is not None  # the balance was applied
    a, b = np.asarray(one["global_flat"]), np.asarray(four["global_flat"])
    # Only the order of float32 cross-client sums may differ (all-reduce vs one device),
    # compounded over a round of SGD: 1e-5 relative to the weights' scale.
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.abs(a).max())
    np.testing.assert_allclose(four["weights"], one["weights"], rtol=1e-4, atol=1e-6)
    for x, y in zip(one["A"], four["A"], strict=True):
        assert abs(x - y) <= 100 / 100 + 1e-6  # at most one of the 100 test images flips


def test_devices_train_balanced_blocks_of_clients(sharded_results):
    """The default run's devices each train 2 of the 8 clients, chosen so that the busiest
    device's local steps are below the contiguous blocks'; every block stores exactly its
    own clients' samples, and `--no-balance-clients` keeps contiguous id blocks."""
    bal, con = sharded_results["fedavg4"], sharded_results["fedavg4-contiguous"]
    sizes = np.asarray(bal["sizes"])
    steps = sizes // 16
    order = np.asarray(bal["order"])
    assert sorted(order.tolist()) == list(range(8))
    busiest = steps[order].reshape(4, 2).sum(axis=1).max()
    assert busiest < steps.reshape(4, 2).sum(axis=1).max()
    np.testing.assert_array_equal(order, balanced_order(steps, 4))
    part = np.asarray(bal["partition"])
    for result, blocks in ((bal, order.reshape(4, 2)), (con, np.arange(8).reshape(4, 2))):
        idx = np.asarray(result["idx"])
        for p, clients in enumerate(blocks):
            want = {int(v) for c in clients for v in part[c, : sizes[c]]}
            assert set(result["members"][p]) == want
            for c in clients:
                got = np.asarray(result["members"][p])[idx[c, : sizes[c]]]
                np.testing.assert_array_equal(got, part[c, : sizes[c]])
    assert con["order"] is None
    # Which device trains a client changes nothing but the order of cross-client sums.
    a, b = np.asarray(con["global_flat"]), np.asarray(bal["global_flat"])
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.abs(a).max())
    np.testing.assert_allclose(bal["weights"], con["weights"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dev", ["2", "4"])
@pytest.mark.parametrize("defense", ["fedavg", "spmc"])
def test_partial_participation_with_replicated_data_equals_single_device(
    sharded_results, defense, dev
):
    """With partial participation the default client data is replicated: the same uniformly
    sampled participants as on one device, and the same model up to float32 summation order
    (two rounds: round 2 has clients with and without a last-round SPMC teacher). On 2
    devices each round's 4 participants are placed by their local steps."""
    one = sharded_results[f"partial_{defense}1"]
    four = sharded_results[f"partial_{defense}{dev}"]
    assert four["balance_rounds"] and not one["balance_rounds"]
    if dev == "2":  # a round whose balanced placement differs from the contiguous split
        steps = np.asarray(four["sizes"]) // 16
        perms = [np.asarray(balanced_permutation(steps[ids], 2)) for ids in four["ids"]]
        assert any((p != np.arange(4)).any() for p in perms)
    # Uniform sampling as on one device, every device holding the whole (1, U, ...) train set.
    assert four["n_blocks"] == 1 and four["x_shards"] == int(dev) and four["x_shape"][0] == 1
    assert four["ids"] == one["ids"]
    a, b = np.asarray(one["global_flat"]), np.asarray(four["global_flat"])
    # Same tolerance as the full-participation comparison above (cross-client sum order).
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.abs(a).max())
    np.testing.assert_allclose(four["weights"], one["weights"], rtol=1e-4, atol=1e-6)


def test_each_device_holds_and_trains_only_its_block_of_clients(sharded_results):
    r = sharded_results["partial"]
    # 8 clients over 4 devices: blocks {0,1}, {2,3}, {4,5}, {6,7}; each round samples 1 of 2
    # per block (stratified), so every device trains clients whose images it stores.
    for ids in r["ids"]:
        assert sorted(i // 2 for i in ids) == [0, 1, 2, 3]
    assert r["x_shape"][0] == 4 and all(rows[0] == 1 for rows in r["shard_rows"])
    assert sorted(r["shard_index"]) == [0, 1, 2, 3]
    # A block stores only its own clients' samples (disjoint Dirichlet shards here).
    sizes = [len(m) for m in r["members"]]
    assert r["x_shape"][1] == max(sizes)
    flat = [i for m in r["members"] for i in m]
    assert len(flat) == len(set(flat))
    assert r["finite"]
    # The state leaves a round as it entered it (SPMC's teachers stay split over the client
    # axis), so rounds 2 and 3 reuse round 1's compiled program: no compile after round 1.
    assert all(r["same_shardings"])
    assert r["compiles_after_round"][0] > 0
    assert r["compiles_after_round"][2] == r["compiles_after_round"][0]


def test_client_blocks_reindex_each_block_onto_its_own_samples():
    rng = np.random.RandomState(0)
    n, s = 6, 5
    indices = rng.randint(0, 40, (n, s))
    sizes = np.array([5, 3, 4, 1, 5, 2])
    local, members = client_blocks(indices, sizes, 3)
    assert len(members) == 3
    for c in range(n):
        p = c // 2
        k = sizes[c]
        np.testing.assert_array_equal(members[p][local[c, :k]], indices[c, :k])
        assert (local[c, k:] == 0).all()
        # The block holds exactly the union of its clients' valid samples.
    for p in range(3):
        want = {int(v) for c in (2 * p, 2 * p + 1) for v in indices[c, : sizes[c]]}
        assert set(members[p].tolist()) == want
    with pytest.raises(ValueError, match="equal blocks"):
        client_blocks(indices, sizes, 4)


def test_client_blocks_follow_a_given_client_order():
    rng = np.random.RandomState(1)
    indices = rng.randint(0, 40, (6, 5))
    sizes = np.array([5, 3, 4, 1, 5, 2])
    order = np.array([4, 0, 5, 2, 1, 3])
    local, members = client_blocks(indices, sizes, 3, order)
    for p, clients in enumerate(order.reshape(3, 2)):
        want = {int(v) for c in clients for v in indices[c, : sizes[c]]}
        assert set(members[p].tolist()) == want
        for c in clients:
            np.testing.assert_array_equal(members[p][local[c, : sizes[c]]], indices[c, : sizes[c]])
            assert (local[c, sizes[c] :] == 0).all()
    with pytest.raises(ValueError, match="permutation of the 6 client ids"):
        client_blocks(indices, sizes, 3, np.array([0, 0, 1, 2, 3, 4]))


def test_balanced_order_hand_checked_paper_split():
    """The seed-0 MNIST split of the paper protocol (issue 14's round): full batches of 64
    per client. Longest first, each to the lighter device with room: device A gets 134, 88,
    78, 67, 49 (416 steps), B 110, 96, 86, 71, 61 (424), against 400 / 440 in id blocks."""
    steps = np.array([110, 49, 67, 86, 88, 61, 134, 78, 96, 71])
    order = balanced_order(steps, 2)
    np.testing.assert_array_equal(order, [1, 2, 4, 6, 7, 0, 3, 5, 8, 9])
    assert steps[order].reshape(2, 5).sum(axis=1).tolist() == [416, 424]


def test_balanced_order_invariants_and_no_gain_cases():
    rng = np.random.RandomState(0)
    kept = 0
    for n, d in [(8, 2), (12, 4), (20, 4), (30, 5), (64, 8)]:
        steps = rng.randint(1, 200, n)
        order = balanced_order(steps, d)
        contiguous = steps.reshape(d, -1).sum(axis=1).max()
        if order is None:  # kept only when it lowers the busiest device's steps
            continue
        assert sorted(order.tolist()) == list(range(n))
        blocks = order.reshape(d, -1)
        assert all((np.diff(b) > 0).all() for b in blocks)  # ids ascending within a device
        assert steps[blocks].sum(axis=1).max() < contiguous
        kept += 1
    assert kept >= 4  # random sizes: the balance almost always pays
    assert balanced_order(np.array([5, 9, 2, 7]), 4) is None  # one client per device
    assert balanced_order(np.full(6, 3), 2) is None  # equal clients: nothing to gain
    assert balanced_order(np.array([1, 9, 9, 1]), 2) is None  # contiguous already balanced
    with pytest.raises(ValueError, match="7 clients do not split into 2 equal blocks"):
        balanced_order(np.ones(7, int), 2)


def test_resolve_device_count_divides_the_client_axis():
    # One visible CPU device in this process.
    assert resolve_device_count("auto", 7) == 1
    assert resolve_device_count(1, 10) == 1
    with pytest.raises(ValueError, match="only 1 device"):
        resolve_device_count(4, 8)
    with pytest.raises(ValueError, match="accepted"):
        resolve_device_count("many", 8)


def test_initialize_distributed_needs_all_three_values(monkeypatch):
    for k in ("SPMC_COORDINATOR", "SPMC_NUM_PROCESSES", "SPMC_PROCESS_ID", "SPMC_DISTRIBUTED"):
        monkeypatch.delenv(k, raising=False)
    assert initialize_distributed() is False  # nothing asked: single process
    with pytest.raises(ValueError, match="process-id"):
        initialize_distributed(coordinator="127.0.0.1:1234", num_processes=2)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        initialize_distributed("127.0.0.1:1234", 2, 5)


def test_set_cpu_devices_rejects_nonpositive_counts():
    from spmc_jax.sharding import set_cpu_devices

    with pytest.raises(ValueError, match="--cpu-devices must be >= 1, got 0"):
        set_cpu_devices(0)
