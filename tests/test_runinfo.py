"""What a run records about where it ran: the CPU model and the engine's numeric switches."""

from __future__ import annotations

import os
import platform

from spmc_jax import engine, runinfo
from spmc_jax.models import layers

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480+
stepping\t: 8
flags\t\t: fpu avx512f

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: not the first processor
"""


def test_cpu_info_reads_the_first_processor(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text(CPUINFO)
    assert runinfo.cpu_info(f) == {
        "vendor": "GenuineIntel",
        "model_name": "Intel(R) Xeon(R) Platinum 8480+",
        "family": "6",
        "model": "143",  # not the "model name" line, though both start with "model"
        "stepping": "8",
        "logical_cpus": os.cpu_count(),
    }


def test_cpu_info_without_proc_cpuinfo_falls_back_to_platform(tmp_path):
    info = runinfo.cpu_info(tmp_path / "absent")
    assert info["model_name"] == (platform.processor() or None)
    assert info["vendor"] is info["family"] is info["model"] is info["stepping"] is None


def test_environment_records_the_switches_in_effect(monkeypatch):
    env = runinfo.environment()
    assert env["numerics"] == {
        "fold_equal_channels": True,
        "im2col_batch_block": layers.IM2COL_BATCH_BLOCK,
        "sort_chunks_by_steps": True,
    }
    assert set(env["cpu"]) >= {"vendor", "model_name", "family", "model", "logical_cpus"}
    monkeypatch.setattr(layers, "FOLD_EQUAL_CHANNELS", False)
    monkeypatch.setattr(layers, "IM2COL_BATCH_BLOCK", None)
    monkeypatch.setattr(engine, "SORT_CHUNKS_BY_STEPS", False)
    assert runinfo.environment()["numerics"] == {
        "fold_equal_channels": False,
        "im2col_batch_block": None,
        "sort_chunks_by_steps": False,
    }
