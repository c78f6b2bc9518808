"""Federations on an axis (spmc_jax.batch): a batch gives every cell its alone-run numbers.

Cells of a batch differ in seed and γ, so their partitions (and so the padded index width and
steps per epoch), attacker masks, poison draws, initial models and keys differ; the batched
run must reproduce each cell's `engine.run` up to float32 summation order.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import numpy as np
import pytest

from spmc_jax import batch
from spmc_jax.config import Config
from spmc_jax.engine import make_plan, run

# Tiny federations; min_size 16 lets the Dirichlet split give clients unequal sizes, so seeds
# differ in max_samples and steps per epoch (checked below: the padding is exercised).
TINY = dict(
    clients=4,
    rounds=2,
    local_epochs=1,
    batch_size=16,
    eval_batch=150,
    model="mlp",
    min_size=16,
    subsample=600,
)
# Float32 summation order: XLA may fuse/vectorise the vmapped federation axis differently
# from the alone program; model weights after 2 rounds agree to ~1e-6 relative, accuracies
# (percent of 300 test images, 1 image = 0.33 %) must agree exactly or within one image.
W_RTOL, PCT_ABS = 2e-4, 0.34


def _cells(defense: str, **kw) -> list[Config]:
    base = Config(defense=defense, **{**TINY, **kw})
    return [base.replace(seed=0, gamma=0.25), base.replace(seed=1, gamma=0.5)]


@pytest.mark.parametrize(
    "defense,kw",
    [
        # FedAvg: tests/test_sweep_batch.py (through the sweep, killed and resumed).
        ("spmc", {}),
        ("foolsgold", {"protocol": "paper", "local_epochs": None}),  # stateful rule
    ],
)
def test_batched_cells_equal_each_cell_alone(blobs, defense, kw):
    cfgs = _cells(defense, **kw)
    plans = [make_plan(c, blobs) for c in cfgs]
    assert len({p.partition.max_samples for p in plans}) == 2  # padding is exercised
    assert [int(p.malicious.sum()) for p in plans] == [1, 2]
    bsim = batch.BatchedSimulation(cfgs, blobs, plans)
    res = batch.run_batch(bsim)
    # One program for the whole batch: every round block and every federation reuse it.
    assert bsim.run_rounds._cache_size() == 1 and bsim.evaluate._cache_size() == 1
    # Federation 1 is the informative one: not the template's cell (its seed, γ, partition
    # and attackers are inputs of the program, not its configuration), and padded (narrower
    # index rows, fewer steps per epoch). Federation 0 is the template's own cell.
    for f in (1,):
        cfg = cfgs[f]
        alone = run(cfg, blobs)
        got = res.histories[f]
        assert len(got) == len(alone.history) == cfg.rounds
        for a, b in zip(alone.history, got, strict=True):
            assert a["client_ids"] == b["client_ids"]
            for k in ("A", "R", "V"):
                assert b[k] == pytest.approx(a[k], abs=PCT_ABS), (f, k)
            np.testing.assert_allclose(b["loss"], a["loss"], rtol=W_RTOL)
            np.testing.assert_allclose(b["client_weights"], a["client_weights"], atol=1e-5)
            np.testing.assert_allclose(b["attacker_weight"], a["attacker_weight"], atol=1e-5)
        w_alone = np.asarray(alone.state.global_flat)
        w_batch = np.asarray(res.states.global_flat[f])
        np.testing.assert_allclose(w_batch, w_alone, rtol=W_RTOL, atol=1e-6)
        agg_alone = jax.tree.leaves(alone.state.agg_state)
        agg_batch = jax.tree.leaves(batch.select(res.states, f).agg_state)
        for x, y in zip(agg_alone, agg_batch, strict=True):
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=W_RTOL, atol=1e-6)


def test_epoch_order_draws_do_not_depend_on_padding():
    from spmc_jax.client import ClientTask, epoch_order

    key = jax.random.key(5)

    def order(width):
        task = ClientTask(np.arange(width, dtype=np.int32), np.int32(37), False, 0, key)
        return np.asarray(epoch_order(task, 1)[0])[:37]

    np.testing.assert_array_equal(order(40), order(96))


def test_batch_key_groups_seeds_and_gammas_only_where_no_program_reads_them():
    fed = Config(defense="fedavg", clients=10)
    krum = Config(defense="krum", clients=10)
    assert batch.batch_key(fed) == batch.batch_key(fed.replace(seed=3, gamma=0.3))
    assert batch.batch_key(fed) != batch.batch_key(fed.replace(defense="spmc"))
    assert batch.batch_key(fed) != batch.batch_key(fed.replace(attack="dba", gamma=0.3))
    # Krum's f = floor(n*gamma): 2 vs 3 attackers change its program, 0.2 vs 0.25 do not.
    assert batch.batch_key(krum) != batch.batch_key(krum.replace(gamma=0.3))
    assert batch.batch_key(krum) == batch.batch_key(krum.replace(gamma=0.25, seed=1))
    cfgs = [fed, krum, fed.replace(seed=1), fed.replace(gamma=0.3), krum.replace(gamma=0.3)]
    assert batch.group_batches(cfgs, 2) == [[0, 2], [3], [1], [4]]
    with pytest.raises(ValueError, match="accepted: an integer >= 1"):
        batch.group_batches(cfgs, 0)


def test_attacks_reading_num_malicious_are_listed():
    src = Path(batch.__file__).parent / "attacks"
    readers = {p.stem for p in src.glob("*.py") if re.search(r"env\.num_malicious", p.read_text())}
    assert readers == set(batch.ATTACKS_READING_NUM_MALICIOUS)


def test_mixed_static_configurations_are_refused_before_compute(blobs):
    cfgs = [Config(defense="fedavg", **TINY), Config(defense="spmc", **TINY)]
    with pytest.raises(ValueError, match=r"cannot share a program.*defense"):
        batch.BatchedSimulation(cfgs, blobs)
    with pytest.raises(ValueError, match="at least one cell"):
        batch.BatchedSimulation([], blobs)


def test_max_cell_batch_counts_the_shared_data_once(blobs):
    import dataclasses

    plan = make_plan(Config(defense="fedavg", **TINY), blobs)
    mem = plan.memory
    per = mem["total"] - mem["data"]
    fits_3 = dataclasses.replace(plan, memory={**mem, "budget": mem["data"] + 3.5 * per})
    assert batch.max_cell_batch(fits_3) == 3
    tight = dataclasses.replace(plan, memory={**mem, "budget": mem["data"] + 0.5 * per})
    assert batch.max_cell_batch(tight) == 1  # never 0: one cell always runs (alone it fits)
    assert batch.max_cell_batch(dataclasses.replace(plan, memory={**mem, "budget": 0.0})) is None
