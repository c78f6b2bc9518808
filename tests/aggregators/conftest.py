"""Shared fixtures for aggregator tests: a RoundContext builder, a fake ProxyOps and an
AggregatorEnv builder.

The builders are plain functions (importable with `from .conftest import ...`, needed to
parametrize at collection time) and are also exposed as pytest fixtures.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmc_jax.aggregators.base import AggregatorEnv, RoundContext
from spmc_jax.flat import LeafInfo


class FakeProxy:
    """A `ProxyOps` stand-in: a linear-softmax classifier on a tiny synthetic proxy set.

    The model reads only the first `N_COORDS` coordinates of any flat vector (a (F, C)
    weight matrix then a (C,) bias); shorter vectors are zero-padded for the computation,
    and `train` changes only those leading coordinates, so it works for any d. Training is
    minibatch SGD with a `key`-dependent order, `epochs` passes, all inside jit.
    """

    N_FEATURES = 4
    N_CLASSES = 3
    N_COORDS = N_FEATURES * N_CLASSES + N_CLASSES

    def __init__(self, seed: int = 0, n: int = 32, lr: float = 0.5, batch: int = 8) -> None:
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(n, self.N_FEATURES))
        true_w = rng.normal(size=(self.N_FEATURES, self.N_CLASSES))
        self.x = jnp.asarray(x, jnp.float32)
        self.y = jnp.asarray(np.argmax(x @ true_w, axis=1), jnp.int32)
        self.lr = lr
        self.batch = batch

    def _head(self, flat: jax.Array) -> jax.Array:
        head = flat[: self.N_COORDS]
        return jnp.pad(head, (0, self.N_COORDS - head.shape[0]))

    def _logits(self, head: jax.Array, x: jax.Array) -> jax.Array:
        w = head[: self.N_FEATURES * self.N_CLASSES].reshape(self.N_FEATURES, self.N_CLASSES)
        return x @ w + head[self.N_FEATURES * self.N_CLASSES :]

    def _loss(self, head: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
        logp = jax.nn.log_softmax(self._logits(head, x))
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

    def logits(self, flat: jax.Array, x: jax.Array) -> jax.Array:
        """Logits (B, C) of the linear model in `flat` on inputs x (B, N_FEATURES)."""
        return self._logits(self._head(flat), x)

    def inputs(self) -> tuple[jax.Array, jax.Array]:
        """The proxy set: inputs (P, N_FEATURES) and labels (P,)."""
        return self.x, self.y

    def loss_entropy(self, flat: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Mean cross-entropy and mean prediction entropy on the proxy set."""
        head = self._head(flat)
        logp = jax.nn.log_softmax(self._logits(head, self.x))
        entropy = -jnp.mean(jnp.sum(jnp.exp(logp) * logp, axis=1))
        return self._loss(head, self.x, self.y), entropy

    def features(self, flat: jax.Array, x: jax.Array) -> jax.Array:
        """Penultimate stand-in (B, C): ReLU of the linear model's scores on x (B, F)."""
        return jax.nn.relu(self._logits(self._head(flat), x))

    def train(self, flat: jax.Array, key: jax.Array, epochs: int) -> jax.Array:
        """`epochs` passes of minibatch SGD from `flat`; returns the updated flat vector."""
        n = self.x.shape[0]
        n_batches = n // self.batch
        grad = jax.grad(self._loss)

        def epoch(e, head):
            perm = jax.random.permutation(jax.random.fold_in(key, e), n)

            def step(b, h):
                idx = jax.lax.dynamic_slice_in_dim(perm, b * self.batch, self.batch)
                return h - self.lr * grad(h, self.x[idx], self.y[idx])

            return jax.lax.fori_loop(0, n_batches, step, head)

        head = jax.lax.fori_loop(0, int(epochs), epoch, self._head(flat))
        m = min(flat.shape[0], self.N_COORDS)
        return flat.at[:m].set(head[:m].astype(flat.dtype))


def make_param_mask(d: int, n_stats: int | None = None) -> np.ndarray:
    """(d,) bool mask: True (parameters) except the last `n_stats` (default d // 8)
    coordinates, which pose as BatchNorm statistics."""
    n_stats = d // 8 if n_stats is None else n_stats
    mask = np.ones(d, dtype=bool)
    if n_stats:
        mask[d - n_stats :] = False
    return mask


def fake_layout(d: int, param_mask: np.ndarray) -> tuple[LeafInfo, ...]:
    """A `Flattener.layout` matching FakeProxy: its output layer "out" (kernel (F, C), bias
    (C,)) first, then one hidden tensor up to the statistics, then the statistics."""
    f, c = FakeProxy.N_FEATURES, FakeProxy.N_CLASSES
    n_params = int(np.sum(param_mask))
    out = [
        LeafInfo("['params']['out']['kernel']", 0, f * c, (f, c), True),
        LeafInfo("['params']['out']['bias']", f * c, f * c + c, (c,), True),
        LeafInfo(
            "['params']['body']['kernel']", f * c + c, n_params, (n_params - f * c - c,), True
        ),
    ]
    if n_params < d:
        out.append(LeafInfo("['batch_stats']['bn']['mean']", n_params, d, (d - n_params,), False))
    return tuple(out)


def make_env(
    n: int,
    d: int,
    *,
    num_malicious: int = 0,
    proxy: object | None = "fake",
    param_mask: np.ndarray | None = None,
    lr: float = 0.01,
    rounds: int = 50,
    total_clients: int | None = None,
) -> AggregatorEnv:
    """An AggregatorEnv for n clients and d coordinates (fake proxy unless proxy=None),
    with the `fake_layout` (output layer "out") when d leaves room for it."""
    param_mask = make_param_mask(d) if param_mask is None else param_mask
    room = int(np.sum(param_mask)) > FakeProxy.N_COORDS and np.all(
        param_mask[: int(np.sum(param_mask))]
    )
    return AggregatorEnv(
        n_clients=n,
        num_malicious=num_malicious,
        lr=lr,
        rounds=rounds,
        param_mask=param_mask,
        total_clients=total_clients,
        proxy=FakeProxy() if proxy == "fake" else proxy,
        layout=fake_layout(d, param_mask) if room else (),
        output_layer="out" if room else "",
    )


def make_ctx(
    global_flat: jax.Array,
    n: int,
    *,
    seed: int = 0,
    round_index: int = 0,
    valid: np.ndarray | None = None,
    n_samples: np.ndarray | None = None,
    client_ids: np.ndarray | None = None,
) -> RoundContext:
    """A RoundContext with fixed dtypes (so repeated calls hit the same jit cache entry)."""
    return RoundContext(
        global_flat=jnp.asarray(global_flat, jnp.float32),
        round=jnp.asarray(round_index, jnp.int32),
        key=jax.random.key(seed),
        n_samples=jnp.asarray(np.full(n, 100.0) if n_samples is None else n_samples, jnp.float32),
        valid=jnp.asarray(np.ones(n, bool) if valid is None else valid, bool),
        client_ids=jnp.asarray(np.arange(n) if client_ids is None else client_ids, jnp.int32),
    )


@pytest.fixture
def fake_proxy() -> FakeProxy:
    return FakeProxy()


@pytest.fixture(name="make_env")
def make_env_fixture():
    return make_env


@pytest.fixture(name="make_ctx")
def make_ctx_fixture():
    return make_ctx
