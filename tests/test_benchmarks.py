"""Smoke tests of the benchmark scripts: each runs end to end on a tiny configuration and
writes well-formed JSON. They check structure and arithmetic between fields, never speed."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import jax
import pytest

from spmc_jax.compile_options import ynn_dot_fusion_supported

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_round_throughput_tiny(tmp_path):
    out = tmp_path / "r.json"
    # The MLP: the script's logic is the model's business only through the Simulation, and
    # the SimpleCNN's four programs would take ~40 s to compile.
    args = "--clients 2 --defense fedavg --samples 64 --repeats 1 --seq-max 1 --vmap-max 2"
    argv = [*args.split(), "--model", "mlp", "--json", str(out)]
    assert _load("round_throughput").main(argv) == 0
    res = json.loads(out.read_text())
    (row,) = res["rows"]
    assert row["model"] == "mlp" and row["K"] == 2
    # The round trained the MLP: the flat model has its parameter count, not the SimpleCNN's.
    from spmc_jax.models import get_model

    shapes = jax.eval_shape(
        get_model("mlp").init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), "float32")
    )
    assert row["dim"] == sum(math.prod(a.shape) for a in jax.tree.leaves(shapes)) != 92_626
    assert row["client_steps"] == 2 * 1  # 64 images / batch 64, 1 epoch
    for name in ("engine", "vmap", "seq_step", "seq_client"):
        t = row[name]
        assert t["wall_s"] > 0 and math.isclose(
            t["client_steps_per_s"], row["client_steps"] / t["wall_s"], rel_tol=1e-9
        )
    # The sequential loops ran on 1 client and were scaled to K = 2.
    assert row["seq_client"]["measured_clients"] == 1
    ratio = row["seq_client"]["wall_s"] / row["engine"]["wall_s"]
    assert math.isclose(row["ratio_engine_vs_seq_client_wall"], ratio, rel_tol=1e-9)
    assert res["environment"]["backend"] == "cpu"


def test_chunk_grouping_tiny(tmp_path):
    out = tmp_path / "c.json"
    argv = "--clients 5 --client-chunk 2 --model mlp --samples 1200 --batch-size 16 --repeats 1"
    mod = _load("chunk_grouping")
    assert mod.main([*argv.split(), "--json", str(out)]) == 0
    from spmc_jax import engine

    assert engine.SORT_CHUNKS_BY_STEPS is True  # the switch is restored after tracing
    (row,) = json.loads(out.read_text())["rows"]
    steps = row["steps_per_epoch"]
    assert len(steps) == 5 and row["epochs"] == 1 and row["client_chunk"] == 2
    # Computed client-steps: chunks of 2 in sorted and in id order, one by one, one chunk.
    assert row["grouped"]["computed_client_steps"] == mod.chunk_cost(sorted(steps), 2)
    assert row["id_order"]["computed_client_steps"] == mod.chunk_cost(steps, 2)
    assert row["one_by_one"]["computed_client_steps"] == sum(steps)
    assert row["all_vmapped"]["computed_client_steps"] == 5 * max(steps)
    assert mod.chunk_cost([1, 5, 2, 2, 3, 9], 2) == 10 + 4 + 18  # hand-checked
    for v in mod.VARIANTS:  # the same federation: only float32 order differs
        assert row[v]["max_abs_diff_vs_grouped"] <= 1e-5 and row[v]["round_s"] > 0
    # One sample: each ratio is the plain quotient of the two rounds.
    ratio = row["id_order"]["round_s"] / row["grouped"]["round_s"]
    assert math.isclose(row["speedup_grouped_vs_id_order"]["median"], ratio, rel_tol=1e-9)


def test_aggregator_scaling_tiny(tmp_path):
    out = tmp_path / "a.json"
    argv = ["--n", "4", "--d", "1000", "--repeats", "1", "--json", str(out)]
    report = _load("aggregator_scaling").main(argv)  # returns the report it writes
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    text = out.read_text()
    assert "spmc" in text and "margin_contribution" in text and "naive_loo" in text


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_core_scaling_one_core(tmp_path):
    out = tmp_path / "c.json"
    argv = ["--clients", "2", "--repeats", "1", "--max-cores", "1", "--model", "mlp"]
    assert _load("core_scaling").main([*argv, "--json", str(out)]) == 0
    (run,) = json.loads(out.read_text())["runs"]
    # One core is the baseline itself: speed-up 1, bound 1 / 1.
    assert run["cores"] == 1 and run["speedup_seq_client"] == 1.0
    assert run["model"] == "mlp"  # as the pinned round_throughput.py run built it
    assert run["bound_client_parallel_vs_loop"] == 1.0 and run["seq_client_s_per_step"] > 0


def test_sweep_throughput_tiny(tmp_path):
    out = tmp_path / "s.json"
    argv = "--cells 1 --rounds 2 --clients 4 --model mlp --subsample 480 --n-test 100"
    assert (
        _load("sweep_throughput").main([*argv.split(), "--batch-size", "32", "--json", str(out)])
        == 0
    )
    (row,) = json.loads(out.read_text())["rows"]
    assert row["cells"] == 1 and row["defense"] == "fedavg"
    for mode in ("one_by_one", "batched"):
        m = row[mode]
        assert math.isclose(m["cells_per_hour"], 1 / m["wall_s"] * 3600, rel_tol=1e-3)
    assert math.isclose(
        row["speedup_wall"], row["one_by_one"]["wall_s"] / row["batched"]["wall_s"], rel_tol=1e-2
    )
    # Batched and one by one are the same federations: accuracies agree within one test image.
    assert row["max_abs_diff_pct"]["A"] <= 1.0 and row["max_abs_diff_pct"]["R"] <= 1.0


def test_vs_pytorch_tiny(tmp_path):
    torch = pytest.importorskip("torch")  # the optional `bench` extra; CI does not install it
    mod = _load("vs_pytorch")
    # The PyTorch contender is the reference's SimpleCNN (92,626 parameters, §1.3).
    assert sum(p.numel() for p in mod.torch_simple_cnn(torch).parameters()) == 92_626
    out = tmp_path / "v.json"
    argv = "--defense fedavg --steps 1 --repeats 2 --threads 1 --batch-size 8 --clients 2"
    assert mod.main([*argv.split(), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    (row,) = res["rows"]
    assert row["defense"] == "fedavg" and row["steps_per_sample"] == 1
    eng, pt = row["engine"], row["pytorch_1t"]
    assert len(eng["samples"]) == len(pt["samples"]) == 2
    ratios = row["ratio"]["pytorch_1t"]["samples"]
    for e, t, r in zip(eng["samples"], pt["samples"], ratios, strict=True):
        assert e > 0 and t > 0 and math.isclose(r, e / t, rel_tol=1e-9)
    assert row["ratio_vs_best_pytorch"]["samples"] == row["ratio"]["pytorch_1t"]["samples"]
    # The engine's round of 2 clients: client-steps/s against the same PyTorch samples.
    assert row["round_clients"] == 2 and row["round_devices"] >= 1
    rnd, rr = row["engine_round"]["samples"], row["round_ratio"]["pytorch_1t"]["samples"]
    for e, t, r in zip(rnd, pt["samples"], rr, strict=True):
        assert e > 0 and math.isclose(r, e / t, rel_tol=1e-9)
    assert res["environment"]["torch_threads"] == [1] and res["environment"]["torch"]


def test_round_vs_pytorch_tiny(tmp_path):
    pytest.importorskip("torch")  # the optional `bench` extra; CI does not install it
    mod = _load("round_vs_pytorch")
    out = tmp_path / "rv.json"
    # SPMC only: its PyTorch client (teacher, two backward passes, projection) is the
    # involved one, and one engine compile keeps the test short.
    argv = "--defense spmc --synthetic 400 --clients 2 --batch-size 16 --repeats 2 --threads 1"
    extra = ["--compare-contiguous", "--compare-no-fold", "--compare-no-dot-fusion"]
    extra += ["--gamma", "0.5"]
    assert mod.main([*argv.split(), *extra, "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    (row,) = res["rows"]
    assert row["gamma"] == 0.5 and row["fold_equal_channels"] is True
    # 1 of SPMC's 10 paper epochs by default, and the fraction says so.
    assert (row["local_epochs"], row["paper_local_epochs"], row["round_fraction"]) == (1, 10, 0.1)
    sizes = row["client_sizes"]
    assert len(sizes) == 2 and sum(sizes) == 360  # the 90 % train split of 400
    assert row["client_steps"] == sum(s // 16 for s in sizes)
    eng, pt = row["engine"]["samples"], row["pytorch_1t"]["samples"]
    assert len(eng) == len(pt) == 2
    for e, t, r in zip(eng, pt, row["ratio"]["pytorch_1t"]["samples"], strict=True):
        assert e > 0 and t > 0 and math.isclose(r, t / e, rel_tol=1e-9)
    assert row["engine_compile_s"] > 0 and row["client_devices"] == 1
    assert res["environment"]["torch_threads"] == [1]
    # The contiguous-placement engine, timed in the same interleave (one device: nothing to
    # place, so no order and no per-device steps).
    con = row["engine_contiguous"]["samples"]
    for e, c, r in zip(eng, con, row["ratio"]["engine_contiguous"]["samples"], strict=True):
        assert c > 0 and math.isclose(r, c / e, rel_tol=1e-9)
    assert row["client_order"] is None and row["device_steps"] is None
    for name in ("engine_no_fold", "engine_no_dot_fusion"):
        other = row[name]["samples"]
        for e, n, r in zip(eng, other, row["ratio"][name]["samples"], strict=True):
            assert n > 0 and math.isclose(r, n / e, rel_tol=1e-9)
    assert row["cpu_dot_fusion"] == ("ynn" if ynn_dot_fusion_supported() else "off")
    best = row["ratio_vs_best_pytorch"]["samples"]
    assert best == row["ratio"]["pytorch_1t"]["samples"]  # PyTorch's columns only


def test_round_vs_pytorch_rejects_a_bad_gamma_before_any_work():
    # Checked before PyTorch is imported or data is read: runs without the bench extra.
    with pytest.raises(SystemExit, match="accepted: 0 <= gamma < 1"):
        _load("round_vs_pytorch").main(["--gamma", "1.5"])


def test_cpu_levers_tiny(tmp_path):
    mod = _load("cpu_levers")
    out = tmp_path / "l.json"
    argv = (
        "--variants block-none block-4 no-fold no-dot-fusion xla:xla_cpu_enable_fast_min_max=false"
        " --steps 1 --repeats 2 --batch-size 8"
    )
    assert mod.main([*argv.split(), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    names = [r["variant"] for r in rows]
    assert names == ["block-none", "block-4", "no-fold", "no-dot-fusion", argv.split()[5]]
    base, blk, nof, nodf, xla = rows
    assert base["max_abs_diff_vs_first"] == 0.0
    # Blocking, and the stem's 3 equal channels convolved without the fold, change only the
    # float32 summation order of one SGD step.
    assert blk["max_abs_diff_vs_first"] < 1e-5
    assert 0.0 < nof["max_abs_diff_vs_first"] < 1e-5
    # So does compiling without XLA:CPU's YNNPACK dot fusion (1e-5 as above).
    assert nodf["max_abs_diff_vs_first"] < 1e-5
    # An extra XLA option that keeps IEEE min/max (the default) changes at most the order.
    assert xla["max_abs_diff_vs_first"] < 1e-5
    for r in rows:
        assert len(r["cpu_ms_per_step"]["samples"]) == 2 and r["steps_per_s"]["median"] > 0
    assert base["wall_speedup"]["samples"] == [1.0, 1.0]
    with pytest.raises(SystemExit, match="accepted: block-none"):
        mod.main(["--variants", "block-x"])
    with pytest.raises(SystemExit, match="'fast_math'; accepted: xla_NAME=VALUE"):
        mod.main(["--variants", "xla:fast_math"])
    # The option really reaches XLA: one it does not know fails the compile.
    with pytest.raises(jax.errors.JaxRuntimeError, match="xla_cpu_no_such_option"):
        bad = ["--variants", "xla:xla_cpu_no_such_option=1"]
        mod.main([*bad, "--steps", "1", "--batch-size", "8"])
