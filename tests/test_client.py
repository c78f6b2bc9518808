"""Local training: vmapped equals a Python loop; masked steps are exact no-ops; SGD semantics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spmc_jax.client import ClientData, ClientTask, make_local_train, make_optimizer
from spmc_jax.data.pipeline import make_train_transform
from spmc_jax.data.types import MEAN, STD
from spmc_jax.models import get_model

B = 8


def _setup(impl="patches", steps=3, epochs=2):
    rng = np.random.RandomState(0)
    n = 120
    data = ClientData(
        x=jnp.asarray(rng.randint(0, 255, (n, 28, 28, 1)).astype(np.uint8)),
        y=jnp.asarray(rng.randint(0, 10, n).astype(np.int32)),
        poison=jnp.zeros(n, bool),
    )
    model = get_model("simple_cnn", conv_impl=impl)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    fn = make_local_train(
        model,
        make_train_transform("mnist", MEAN["mnist"], STD["mnist"], False),
        make_optimizer(0.01, 0.9, 1e-5),
        batch_size=B,
        steps_per_epoch=steps,
        epochs=epochs,
    )
    return data, variables, fn


def _task(idx, size, key):
    size = jnp.asarray(size, jnp.int32)
    return ClientTask(
        jnp.asarray(idx, jnp.int32),
        size,
        jnp.zeros(size.shape, bool),
        jnp.zeros(size.shape, jnp.int32),
        key,
    )


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_vmap_equals_python_loop():
    data, variables, fn = _setup()
    sizes = [24, 17, 9]  # 3, 2 and 1 full batches of 8
    idx = np.zeros((3, 24), np.int32)
    for i, s in enumerate(sizes):
        idx[i, :s] = np.arange(i * 30, i * 30 + s)
    keys = jax.random.split(jax.random.key(3), 3)
    one = jax.jit(lambda t: fn(variables, variables, data, t, jnp.asarray(False)))
    loop = [one(_task(idx[i], sizes[i], keys[i])) for i in range(3)]
    vm = jax.jit(jax.vmap(lambda t: fn(variables, variables, data, t, jnp.asarray(False))))(
        _task(idx, sizes, keys)
    )
    for i in range(3):
        for a, b in zip(_leaves(loop[i].variables), _leaves(vm.variables), strict=True):
            # vmap may reorder float32 reductions; 6 SGD steps keep the drift ~1e-6.
            np.testing.assert_allclose(a, b[i], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(float(loop[i].loss), float(vm.loss[i]), rtol=1e-5)


def test_masked_steps_are_no_ops():
    # A client with 2 batches/epoch, run with a 5-step schedule (3 masked steps per epoch),
    # must equal the same client run with exactly 2 steps per epoch.
    data, variables, fn5 = _setup(steps=5)
    _, _, fn2 = _setup(steps=2)
    idx = np.zeros(40, np.int32)
    idx[:16] = np.arange(16)
    key = jax.random.key(5)
    # The permutation covers the padded row; same row length for both runs.
    a = jax.jit(fn5)(variables, variables, data, _task(idx, 16, key), jnp.asarray(False))
    b = jax.jit(fn2)(variables, variables, data, _task(idx, 16, key), jnp.asarray(False))
    for x, y in zip(_leaves(a.variables), _leaves(b.variables), strict=True):
        np.testing.assert_array_equal(x, y)
    assert float(a.steps) == float(b.steps) == 4.0


def test_masked_steps_are_skipped_one_client_at_a_time():
    # One client at a time (the CPU path) does not compute the steps past its last full
    # batch: the transform (run once per computed step) is called 2 x 2 times, not 5 x 2.
    calls = []
    base = make_train_transform("mnist", MEAN["mnist"], STD["mnist"], False)

    def counting(key, x):
        jax.debug.callback(lambda: calls.append(1))
        return base(key, x)

    data, _, _ = _setup()
    model = get_model("mlp")  # the cheapest model: the count, not the network, is tested
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    fn = make_local_train(
        model,
        counting,
        make_optimizer(0.01, 0.9, 1e-5),
        batch_size=B,
        steps_per_epoch=5,
        epochs=2,
    )
    idx = np.zeros(40, np.int32)
    idx[:16] = np.arange(16)
    out = jax.jit(fn)(variables, variables, data, _task(idx, 16, jax.random.key(5)), False)
    jax.effects_barrier()
    assert float(out.steps) == 4.0 and len(calls) == 4


def test_optimizer_matches_pytorch_sgd_formula():
    # PyTorch SGD: d = g + wd·w; buf₁ = d; buf_t = m·buf + d; w ← w − lr·buf.
    tx = make_optimizer(0.1, 0.9, 0.01)
    w = jnp.array([1.0, -2.0])
    grads = [jnp.array([0.5, 0.25]), jnp.array([-1.0, 2.0])]
    state = tx.init(w)
    w_np, buf = np.array([1.0, -2.0]), None
    for g in grads:
        upd, state = tx.update(g, state, w)
        w = optax.apply_updates(w, upd)
        d = np.asarray(g, np.float64) + 0.01 * w_np
        buf = d if buf is None else 0.9 * buf + d
        w_np = w_np - 0.1 * buf
    np.testing.assert_allclose(np.asarray(w), w_np, rtol=1e-6)


def test_spmc_step_with_teacher_equal_to_student_projects_nothing():
    # At the first step of round 0 (student = teacher) G_g = 0 by the equations, so nothing
    # is projected: the SPMC step must be the plain SGD step. (The reference
    # projects there on the rounding noise of its G_g, spmc_reference.md §3.3: a known,
    # unreproducible divergence. Two separately compiled forward passes differ by rounding;
    # projecting onto that noise changed 0-14 SimpleCNN tensors per step before the fix.)
    from spmc_jax.client import SpmcClientOptions, epoch_order, make_client_step

    data, variables, _ = _setup()
    model = get_model("simple_cnn", conv_impl="patches")
    transform = make_train_transform("mnist", MEAN["mnist"], STD["mnist"], False)
    tx = make_optimizer(0.01, 0.9, 1e-5)
    plain = make_client_step(model, transform, tx, batch_size=B)
    spmc = make_client_step(model, transform, tx, batch_size=B, spmc=SpmcClientOptions(1.0, False))
    opt = tx.init(variables["params"])
    on = jnp.asarray(False)
    for i, key in enumerate(jax.random.split(jax.random.key(7), 4)):
        task = _task(np.arange(i * 24, i * 24 + 24), 24, key)
        perm, k = epoch_order(task, jnp.asarray(0, jnp.int32))
        a = jax.jit(spmc)(variables, opt, variables, data, task, on, perm, k, 0)
        b = jax.jit(plain)(variables, opt, variables, data, task, on, perm, k, 0)
        assert float(a.projected) == 0.0
        # SPMC computes G_d with G_g in one batched backward pass (issue 14), so the weights
        # agree to float32 summation order (1 ulp: ~1e-7 relative); a projection onto the
        # rounding noise would move whole tensors by far more.
        for x, y in zip(_leaves(a.variables), _leaves(b.variables), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9)
    # A different teacher still guides (the check is equality, not closeness).
    teacher = jax.tree.map(lambda v: v * 1.5, variables)
    hits = 0.0
    for i, key in enumerate(jax.random.split(jax.random.key(8), 4)):
        task = _task(np.arange(i * 24, i * 24 + 24), 24, key)
        perm, k = epoch_order(task, jnp.asarray(0, jnp.int32))
        hits += float(jax.jit(spmc)(variables, opt, teacher, data, task, on, perm, k, 0).projected)
    assert hits > 0
