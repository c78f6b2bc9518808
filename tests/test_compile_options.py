"""XLA:CPU's YNNPACK dot fusion (`--cpu-dot-fusion`): the probe, the resolution rules, and
that the federation's real compiled programs carry it (and move only in float32 order)."""

from __future__ import annotations

import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmc_jax import batch, compile_options
from spmc_jax.compile_options import resolve_cpu_dot_fusion, ynn_dot_fusion_supported
from spmc_jax.config import Config
from spmc_jax.engine import Simulation, run

TINY = dict(clients=4, rounds=1, local_epochs=1, batch_size=16, gamma=0.25, eval_batch=150)
CASES = ("auto", "off")

needs_ynn = pytest.mark.skipif(
    not ynn_dot_fusion_supported(), reason="this jaxlib's XLA:CPU has no YNNPACK dot fusion"
)

_HEADER = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \(.*\{$")
_OPCODE = re.compile(r"^(?:ROOT )?%[\w.\-]+ = (?:\([^)]*\)|\S+) ([a-z][\w\-]*)\(")
_YNN_CALL = re.compile(r'calls=%([\w.\-]+)[^\n]*"kind":"__ynn_fusion"')


def fused_dots(hlo: str) -> int:
    """Dots that a YNNPACK fusion of the compiled HLO text runs together with other work.

    jaxlib 0.10's default hands YNNPACK each dot alone (a fused computation of one `dot` and
    its parameters); the dot fusion puts several dots and their elementwise neighbours in one.
    Counted: the dots of YNNPACK fusions holding more than one dot or any `add`/`maximum`/
    `multiply` beside a dot.
    """
    ops: dict[str, Counter[str]] = {}
    name = None
    for line in hlo.splitlines():
        head = _HEADER.match(line)
        if head:
            name = head.group(1)
            ops[name] = Counter()
        elif line.startswith("}"):
            name = None
        elif name is not None and (op := _OPCODE.match(line.strip())):
            ops[name][op.group(1)] += 1
    n = 0
    for called in _YNN_CALL.findall(hlo):
        c = ops[called]
        if c["dot"] > 1 or (c["dot"] and c["add"] + c["maximum"] + c["multiply"]):
            n += c["dot"]
    return n


def test_fused_dots_reads_hlo_as_documented():
    # The helper itself, on two hand-compiled programs: a dot alone, and dot-tanh-dot fused.
    a, b = jnp.ones((64, 128)), jnp.ones((128, 128))
    alone = jax.jit(lambda a, b: a @ b).lower(a, b).compile().as_text()
    assert fused_dots(alone) == 0
    if ynn_dot_fusion_supported():
        f = jax.jit(
            lambda a, b: jnp.maximum(a @ b, 0.0) @ b,
            compiler_options=compile_options.YNN_DOT_FUSION,
        )
        assert fused_dots(f.lower(a, b).compile().as_text()) == 2


def test_probe_says_no_when_xla_rejects_the_option(monkeypatch):
    # A jaxlib without the option (or with another enum) fails to compile the probe: "off".
    for bad in (
        {"xla_cpu_no_such_option_for_spmc_jax": "1"},
        {"xla_cpu_experimental_ynn_fusion_type": "NOT_A_FUSION_TYPE"},
    ):
        monkeypatch.setattr(compile_options, "YNN_DOT_FUSION", bad)
        ynn_dot_fusion_supported.cache_clear()
        try:
            assert ynn_dot_fusion_supported() is False
            assert resolve_cpu_dot_fusion("auto", "cpu") == "off"
            with pytest.raises(ValueError, match=r"does not accept .*accepted here: auto, off"):
                resolve_cpu_dot_fusion("ynn", "cpu")
        finally:
            ynn_dot_fusion_supported.cache_clear()


@pytest.mark.parametrize("supported", [True, False])
def test_resolution_rules(monkeypatch, supported):
    monkeypatch.setattr(compile_options, "ynn_dot_fusion_supported", lambda: supported)
    assert resolve_cpu_dot_fusion("off", "cpu") == "off"
    assert resolve_cpu_dot_fusion("auto", "cpu") == ("ynn" if supported else "off")
    # Not an option of other backends: auto turns it off, an explicit request is an error.
    assert resolve_cpu_dot_fusion("auto", "gpu") == "off"
    assert resolve_cpu_dot_fusion("off", "tpu") == "off"
    with pytest.raises(ValueError, match=r"backend is 'gpu'; accepted there: auto, off"):
        resolve_cpu_dot_fusion("ynn", "gpu")
    with pytest.raises(ValueError, match=r"'fast'; accepted: auto, ynn, off"):
        resolve_cpu_dot_fusion("fast", "cpu")
    assert compile_options.compiler_options("off") is None
    # auto: only for the models it was measured faster on; an explicit ynn for any model.
    assert resolve_cpu_dot_fusion("auto", "cpu", "simple_cnn") == ("ynn" if supported else "off")
    for slower in ("mlp", "resnet10"):
        assert resolve_cpu_dot_fusion("auto", "cpu", slower) == "off"
        if supported:
            assert resolve_cpu_dot_fusion("ynn", "cpu", slower) == "ynn"


def test_config_names_a_bad_setting():
    with pytest.raises(ValueError, match=r"--cpu-dot-fusion 'yes' is not valid; accepted: auto"):
        Config(cpu_dot_fusion="yes").validate()


def _round_hlo(sim: Simulation) -> str:
    state = sim.init_state()
    r0 = jnp.asarray(0, jnp.int32)
    return sim.run_rounds.lower(state, sim.data, 1, r0).compile().as_text()


@needs_ynn
def test_the_real_round_is_compiled_with_the_fusion_and_moves_by_float32_order(blobs):
    # FedAvg's round: SPMC's runs through the CLI test (tests/test_train_cli.py) and every
    # other engine test under the default.
    sims = {f: Simulation(Config(defense="fedavg", cpu_dot_fusion=f, **TINY), blobs) for f in CASES}
    assert sims["auto"].cpu_dot_fusion == "ynn" and sims["off"].cpu_dot_fusion == "off"
    assert sims["auto"].compiler_options == compile_options.YNN_DOT_FUSION
    mlp = Simulation(Config(defense="fedavg", model="mlp", **TINY), blobs)
    assert mlp.cpu_dot_fusion == "off" and mlp.compiler_options is None  # measured slower
    # The compiled round itself: the fused dots are there with the option, and not without.
    fused = {f: fused_dots(_round_hlo(s)) for f, s in sims.items()}
    assert fused["auto"] >= 3 and fused["off"] == 0, fused
    ev = sims["auto"]
    st = ev.init_state()
    ev_hlo = ev.evaluate.lower(st.global_flat, ev.data, st.hooks).compile().as_text()
    assert fused_dots(ev_hlo) > 0
    # The numbers: one round of the same federation both ways (its ~10 SGD steps and the
    # aggregation). 1e-5 absolute on weights of scale 0.1: float32 summation order, far
    # below any algorithmic difference (one SGD step moves weights by ~1e-3).
    a, b = (run(s.cfg, blobs, sim=s) for s in sims.values())
    diff = float(jnp.max(jnp.abs(a.state.global_flat - b.state.global_flat)))
    assert diff < 1e-5
    assert a.history[0]["A"] == pytest.approx(b.history[0]["A"], abs=1.0)  # ≤ 1 test image in 150
    # JAX refuses compiler options on a nested jit; called inside a user's jit the round runs
    # plain, and the user's jit decides the options: the same numbers up to float32 order.
    sim = sims["auto"]
    state, r0 = sim.init_state(), jnp.asarray(0, jnp.int32)
    top, _ = sim.run_rounds(state, sim.data, 1, r0)
    nested, _ = jax.jit(lambda s, d: sim.run_rounds(s, d, 1, r0))(state, sim.data)
    assert float(jnp.max(jnp.abs(top.global_flat - nested.global_flat))) < 1e-5


@needs_ynn
def test_batched_federations_are_compiled_with_the_fusion(blobs):
    cfgs = [Config(defense="fedavg", **TINY).replace(seed=s) for s in (0, 1)]
    bsim = batch.BatchedSimulation(cfgs, blobs)
    assert bsim.sim.cpu_dot_fusion == "ynn"
    states = bsim.init_states()
    r0 = jnp.asarray(0, jnp.int32)
    hlo = bsim.run_rounds.lower(states, bsim.data, 1, r0).compile().as_text()
    assert fused_dots(hlo) >= 3
    off = batch.BatchedSimulation([c.replace(cpu_dot_fusion="off") for c in cfgs], blobs)
    assert fused_dots(off.run_rounds.lower(states, off.data, 1, r0).compile().as_text()) == 0


@needs_ynn
def test_a_fused_program_matches_float64():
    # Beside the probe's own check: other shapes and values, a bias add and a ReLU between.
    x = np.linspace(-1.0, 1.0, 24, dtype=np.float32).reshape(3, 8)
    w = np.linspace(0.5, -0.5, 64, dtype=np.float32).reshape(8, 8)
    opts = compile_options.YNN_DOT_FUSION
    f = jax.jit(lambda x, w: jnp.maximum(x @ w, 0.0) @ w + 1.0, compiler_options=opts)
    want = np.maximum(x.astype(np.float64) @ w, 0.0) @ w.astype(np.float64) + 1.0
    np.testing.assert_allclose(np.asarray(f(x, w)), want, rtol=1e-5, atol=1e-6)
