"""The vectorized federation: one round = vmap(client) → model attack → aggregate → new global.

Shapes are static for the whole run (padded client index rows, a static bound on the local
steps, each client's loop running its own full batches), so a block of rounds is one jitted
`lax.scan` and compiles once.
All data lives on device as uint8 and is passed to the jitted functions as arguments (never
closed over as constants); training images are stored per device block of clients
(`SimData`, `client_blocks`), so with a mesh every device and host holds only its own
clients' data. On CPU clients train one at a time inside the round (`preferred_client_chunk`);
`--stream-aggregation` folds them into FedAvg's running sum without the (m, d) matrix.

Randomness: one root key `PRNGKey(seed)` split by role (init, rounds); each round folds in
its index; each registered client gets `split(round_key, N)[id]`, so a client's randomness
depends on its id, not on its position in the round. The partition and the per-sample
poisoning draw are host-side NumPy seeded by `seed` (identical on every backend).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from spmc_jax import sharding as sharding_lib
from spmc_jax import spmc as spmc_lib
from spmc_jax.aggregators import AggregatorEnv, RoundContext, get_aggregator
from spmc_jax.aggregators.base import sanitize
from spmc_jax.attacks import AttackEnv, parse_attack, parse_client_attacks
from spmc_jax.attacks.base_backdoor import base as base_trigger
from spmc_jax.client import (
    ClientData,
    ClientTask,
    ModelOps,
    ServerContext,
    SpmcClientOptions,
    collect_hooks,
    init_hook_states,
    local_train_from_step,
    make_client_step,
    make_local_train,
    make_optimizer,
    row_hooks,
    server_update,
)
from spmc_jax.client_hooks import config_hooks
from spmc_jax.compile_options import Program, compiler_options, resolve_cpu_dot_fusion
from spmc_jax.config import STREAMABLE_DEFENSES, Config
from spmc_jax.data import partition as part_lib
from spmc_jax.data.pipeline import make_test_transform, make_train_transform, pil_bilinear_resize
from spmc_jax.data.types import INPUT_SHAPE, Dataset
from spmc_jax.flat import REFERENCE_MODULES, Flattener
from spmc_jax.metrics import make_evaluator
from spmc_jax.models import OUTPUT_LAYERS, get_model

PyTree = Any


# ----------------------------------------------------------------------------- planning
@dataclasses.dataclass(frozen=True)
class Plan:
    """Host-side, static description of a run (what `--dry-run` writes)."""

    config: Config
    dataset: str
    dataset_source: str
    n_train: int
    n_test: int
    client_pool: int
    proxy_indices: np.ndarray
    partition: part_lib.PaddedPartition
    label_hist: np.ndarray
    malicious: np.ndarray  # (N,) bool over registered clients
    steps_per_epoch: int
    epochs: int
    num_params: int
    dim: int
    memory: dict[str, float]
    client_chunk: int | None = None  # clients trained at once (None: all m, vmapped)
    shared_shards: bool = False  # cross-device mode: clients' samples overlap (see make_plan)
    memory_advice: str = ""  # when nothing fits: what would (see fit_advice)

    def to_dict(self) -> dict[str, Any]:
        sizes = self.partition.sizes
        return {
            "dataset": self.dataset,
            "dataset_source": self.dataset_source,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "client_pool": self.client_pool,
            "proxy_size": len(self.proxy_indices),
            "clients": [
                {
                    "id": i,
                    "samples": int(sizes[i]),
                    "batches_per_epoch": int(sizes[i] // self.config.batch_size),
                    "malicious": bool(self.malicious[i]),
                    "label_histogram": self.label_hist[i].astype(int).tolist(),
                }
                for i in range(len(sizes))
            ][:1000],
            "clients_listed": int(min(len(sizes), 1000)),
            "malicious_ids": np.flatnonzero(self.malicious).astype(int).tolist()[:1000],
            "max_samples": int(self.partition.max_samples),
            "steps_per_epoch": self.steps_per_epoch,
            "local_epochs": self.epochs,
            "num_params": self.num_params,
            "flat_dim": self.dim,
            "memory_estimate_bytes": self.memory,
            "client_chunk": self.client_chunk,
            "shared_shards": self.shared_shards,
            "memory_advice": self.memory_advice,
        }


def _subsample(ds: Dataset, n: int | None, seed: int) -> Dataset:
    if n is None or n >= len(ds.y_train):
        return ds
    idx = part_lib.stratified_subsample(ds.y_train, n, seed=seed)
    return dataclasses.replace(
        ds, x_train=ds.x_train[idx], y_train=ds.y_train[idx], source=f"{ds.source} (subsample {n})"
    )


def resolve_conv_impl(cfg: Config) -> str:
    """'auto': im2col patches on CPU (vmap of lax.conv lowers to slow grouped convs there),
    XLA's convolution elsewhere."""
    if cfg.conv_impl != "auto":
        return cfg.conv_impl
    return "patches" if jax.default_backend() == "cpu" else "lax"


def _activation_floats(model: nn.Module, variables: PyTree) -> int:
    """Floats of all intermediate activations for one sample (shape-only trace)."""
    x = jax.ShapeDtypeStruct((1, *INPUT_SHAPE), jnp.float32)

    def f(v, x):
        _, state = model.apply(
            v, x, train=False, capture_intermediates=True, mutable=["intermediates"]
        )
        return state

    shapes = jax.eval_shape(f, variables, x)
    return int(sum(np.prod(s.shape) for s in jax.tree.leaves(shapes)))


def estimate_memory(
    cfg: Config, dim: int, act_floats: int, n_train_pixels: int, chunk: int
) -> dict[str, float]:
    """Rough device-memory estimate (bytes) of one round.

    Per client in flight: params, momentum, gradient(s), the trained row and (SPMC) the
    teacher and guide gradient → ~(5 + 2·spmc)·d floats, plus activations kept for the
    backward pass (≈ 3 × forward activations × batch). The (n, d) client matrix, the
    aggregation's O(n·d) temporaries and SPMC's per-client teachers scale with n.
    """
    spmc = cfg.uses_spmc_client
    n = cfg.n_per_round
    per_client = 4 * ((5 + 2 * spmc) * dim + 3 * act_floats * cfg.batch_size * (1 + spmc))
    in_flight = per_client * min(chunk, n)
    # Streaming keeps a running sum instead of the (n, d) rows and their copies.
    matrices = 4 * dim * (min(chunk, n) + 2 if cfg.stream_aggregation else n * 3)
    teachers = 4 * dim * (cfg.clients if cfg.spmc_teachers == "all" else n) if spmc else 0
    data = n_train_pixels + 10_000 * 32 * 32 * 3
    total = in_flight + matrices + teachers + data
    return {
        "per_client": float(per_client),
        "clients_in_flight": float(min(chunk, n)),
        "local_training": float(in_flight),
        "client_matrices": float(matrices),
        "teachers": float(teachers),
        "data": float(data),
        "total": float(total),
    }


MEMORY_FRACTION = 0.8  # of the device's memory a plan may use (XLA needs headroom)
# Clients trained in vmapped chunks (1 < chunk < clients on a device) are grouped by local
# steps: a chunk runs its largest client's count, so chunks of similar clients waste fewer
# steps than chunks in id order (paper MNIST split, chunk 5: 1060 computed client-steps
# instead of 1220). The rows are unchanged and return to id order (a streamed sum changes in
# float32 order only). A module switch, so that benchmarks can time the id order in-process.
SORT_CHUNKS_BY_STEPS = True


def _by_steps(sizes: jax.Array, chunk: int | None) -> jax.Array | None:
    """The order that groups clients of similar local steps into chunks, or None when
    there are no vmapped chunks to form (chunk 1: one client at a time; one chunk: all)."""
    if not SORT_CHUNKS_BY_STEPS or chunk is None or chunk <= 1 or chunk >= sizes.shape[0]:
        return None
    return jnp.argsort(sizes, stable=True)  # steps = size // batch: the same grouping


def _permuted(fn: Callable[[Any], Any], xs: Any, perm: jax.Array | None) -> Any:
    """`fn` on the client inputs `xs` taken in `perm` order, its outputs put back in the
    order of `xs` (so only which clients train together / where changes)."""
    if perm is None:
        return fn(xs)
    out = fn(jax.tree.map(lambda a: a[perm], xs))
    return jax.tree.map(lambda a: a[jnp.argsort(perm)], out)


def _fits(
    cfg: Config, dim: int, act_floats: int, data_bytes: int, chunk: int, budget: float
) -> bool:
    return estimate_memory(cfg, dim, act_floats, data_bytes, chunk)["total"] <= budget


def fit_advice(cfg: Config, dim: int, act_floats: int, data_bytes: int, budget: float) -> str:
    """What to change so that a run that does not fit even one client at a time fits.

    Tries, in order: `--stream-aggregation` (FedAvg rules: no (m, d) matrix), SPMC's
    `--spmc-teachers last_round` (O(m·d) instead of O(N·d)), and the largest
    `--clients-per-round` that fits with one client in flight.
    """
    tips = []
    if cfg.defense in STREAMABLE_DEFENSES and not cfg.stream_aggregation:
        alt = cfg.replace(stream_aggregation=True, client_chunk=None)
        if _fits(alt, dim, act_floats, data_bytes, 1, budget):
            tips.append("add --stream-aggregation (FedAvg rules fold clients into a running sum)")
    if cfg.uses_spmc_client and cfg.spmc_teachers == "all":
        alt = cfg.replace(spmc_teachers="last_round", client_chunk=None)
        if _fits(alt, dim, act_floats, data_bytes, 1, budget):
            tips.append("use --spmc-teachers last_round (only last round's participants' teachers)")

    # Largest m (>= 2) that fits; memory grows with m, so bisect.
    def fits_m(m: int) -> bool:
        return _fits(cfg.replace(clients_per_round=m), dim, act_floats, data_bytes, 1, budget)

    if fits_m(2):
        lo, hi = 2, cfg.n_per_round  # lo fits, hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits_m(mid) else (lo, mid)
        tips.append(f"lower --clients-per-round to {lo} or less")
    tips.append("or shard the clients over more devices (--devices)")
    return "; ".join(tips)


def choose_client_chunk(
    cfg: Config, dim: int, act_floats: int, data_bytes: int, budget: float | None
) -> int | None:
    """The client chunk of a run: the user's `--client-chunk`, or the largest that fits.

    Returns None (vmap all m participants at once) when everything fits or the budget is
    unknown. Raises ValueError when the requested chunk does not fit, naming the largest chunk
    that does, or when not even one client at a time fits (the O(n·d) round matrices or SPMC's
    O(N·d) teachers alone exceed the budget).
    """
    n = cfg.n_per_round
    want = cfg.client_chunk
    if budget is None:
        return want
    if _fits(cfg, dim, act_floats, data_bytes, want or n, budget):
        return want
    if not _fits(cfg, dim, act_floats, data_bytes, 1, budget):
        est = estimate_memory(cfg, dim, act_floats, data_bytes, 1)
        raise ValueError(
            f"even --client-chunk 1 needs ~{est['total'] / 2**30:.1f} GiB of the "
            f"{budget / 2**30:.1f} GiB budget: the round's client matrices "
            f"({est['client_matrices'] / 2**30:.1f} GiB) and SPMC teachers "
            f"({est['teachers'] / 2**30:.1f} GiB) scale with --clients-per-round and --clients; "
            + fit_advice(cfg, dim, act_floats, data_bytes, budget)
        )
    lo, hi = 1, want or n  # invariant: lo fits, hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _fits(cfg, dim, act_floats, data_bytes, mid, budget) else (lo, mid)
    if want is not None:
        raise ValueError(
            f"--client-chunk {want} needs ~"
            f"{estimate_memory(cfg, dim, act_floats, data_bytes, want)['total'] / 2**30:.1f} GiB "
            f"but the budget is {budget / 2**30:.1f} GiB; --client-chunk {lo} would fit"
        )
    return lo


def preferred_client_chunk(cfg: Config) -> int | None:
    """The chunk a run uses when `--client-chunk` is not given and memory is no limit.

    On CPU: 1 (each device trains its clients one after another under `lax.map`, inside the
    same jitted round). A single client's batch-64 step already keeps the cores busy there,
    and a vmap over clients only multiplies the im2col buffers that fall out of cache
    (benchmarks/RESULTS.md: vmapping all 100 clients is 1.7x slower than chunk 1 on 2
    cores). Elsewhere (GPU, TPU): None, every participant vmapped at once.
    """
    if cfg.client_chunk is not None or jax.default_backend() != "cpu":
        return None
    return 1


def device_memory_bytes() -> float | None:
    """Memory of the default device (bytes), or None when unknown (CPU: system RAM)."""
    dev = jax.devices()[0]
    try:
        stats = dev.memory_stats()
        if stats and "bytes_limit" in stats:
            return float(stats["bytes_limit"])
    except Exception:
        pass
    try:
        import os

        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def shared_shard_partition(
    labels: np.ndarray,
    n_pool: int,
    n_clients: int,
    size: int,
    partition: str,
    beta: float,
    seed: int,
    num_classes: int,
) -> tuple[part_lib.PaddedPartition, np.ndarray]:
    """Cross-device partition when the pool cannot give every client its own full batch.

    Each client i draws a label mix p_i ~ Dir(β·1_C) ('dirichlet') or the pool's class
    frequencies ('iid'), class counts c_i ~ Multinomial(size, p_i), and then c_ik samples of
    class k uniformly WITH replacement from the pool's class-k samples, independently of the
    other clients (so clients' data overlap, as in synthetic cross-device benchmarks; the
    reference's disjoint split would need n_clients · size ≤ pool). Vectorized NumPy,
    O(n_clients · size), seeded by `seed`.

    Returns:
      (PaddedPartition with every row full, (n_clients, C) label histogram).
    """
    rng = np.random.default_rng(seed)
    pool_labels = np.asarray(labels[:n_pool])
    members = [np.flatnonzero(pool_labels == k) for k in range(num_classes)]
    freq = np.array([len(m) for m in members], np.float64)
    present = freq > 0
    if partition == "dirichlet":
        p = rng.dirichlet(np.full(int(present.sum()), beta), size=n_clients)
        pvals = np.zeros((n_clients, num_classes))
        pvals[:, present] = p
    else:
        pvals = np.broadcast_to(freq / freq.sum(), (n_clients, num_classes))
    counts = rng.multinomial(size, pvals)  # (n, C), rows sum to `size`
    seq = np.repeat(np.tile(np.arange(num_classes), n_clients), counts.ravel())
    idx = np.empty(n_clients * size, np.int64)
    for k in np.flatnonzero(present):
        where = seq == k
        idx[where] = members[k][rng.integers(0, len(members[k]), int(where.sum()))]
    idx = rng.permuted(idx.reshape(n_clients, size), axis=1)
    padded = part_lib.PaddedPartition(
        indices=idx.astype(np.int32),
        mask=np.ones(idx.shape, bool),
        sizes=np.full(n_clients, size, np.int32),
    )
    return padded, counts.astype(np.int64)


def make_plan(cfg: Config, ds: Dataset) -> Plan:
    """Partition the data, pick the attackers, size the steps and estimate memory (host only).

    When `clients × min_size` exceeds the client pool (cross-device scale, e.g. 10⁵ clients
    on MNIST's 54,000 pool images) no disjoint split can give every client even `min_size`
    samples (the reference's Dirichlet loop would never end): the plan then switches to
    `shared_shard_partition` (overlapping per-client samples of max(batch_size, min_size)
    each, `Plan.shared_shards`). Below that, a client without a full batch is an error.
    """
    cfg.validate()
    ds = _subsample(ds, cfg.subsample, cfg.seed)
    n_train = len(ds.y_train)
    pool, proxy = part_lib.proxy_split(n_train, cfg.train_ratio)
    shard_size = max(cfg.batch_size, cfg.min_size)
    # Not even --min-size samples each: no disjoint split exists (cross-device scale).
    shared = cfg.clients * cfg.min_size > len(pool)
    if shared:
        padded, label_hist = shared_shard_partition(
            ds.y_train,
            len(pool),
            cfg.clients,
            shard_size,
            cfg.partition,
            cfg.beta,
            cfg.seed,
            ds.num_classes,
        )
    else:
        if cfg.partition == "dirichlet":
            parts = part_lib.dirichlet_partition(
                ds.y_train,
                cfg.clients,
                beta=cfg.beta,
                seed=cfg.seed,
                train_ratio=cfg.train_ratio,
                min_size=cfg.min_size,
                num_classes=ds.num_classes,
            )
        else:
            parts = part_lib.iid_partition(
                n_train, cfg.clients, seed=cfg.seed, train_ratio=cfg.train_ratio
            )
        padded = part_lib.pad_partition(parts)
        label_hist = part_lib.label_histograms(parts, ds.y_train, ds.num_classes)
    small = int(padded.sizes.min())
    if small < cfg.batch_size:
        raise ValueError(
            f"client {int(np.argmin(padded.sizes))} has {small} samples < --batch-size "
            f"{cfg.batch_size}: it could never take a step (drop-last); use more data "
            f"(--subsample), fewer --clients or a smaller --batch-size"
        )
    malicious = np.zeros(cfg.clients, bool)
    m = cfg.num_malicious_registered
    if m:
        if cfg.attacker_ids == "last":
            malicious[cfg.clients - m :] = True
        else:
            malicious[np.random.RandomState(cfg.seed + 7).choice(cfg.clients, m, replace=False)] = (
                True
            )
    model = get_model(cfg.model, ds.num_classes, resolve_conv_impl(cfg), cfg.compute_dtype)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *INPUT_SHAPE)))
    flat = Flattener.build(variables)
    # On device the images are 32×32×3 uint8 (MNIST is resized once).
    data_bytes = n_train * int(np.prod(INPUT_SHAPE))
    act = _activation_floats(model, variables)
    avail = device_memory_bytes()
    budget = None if avail is None else MEMORY_FRACTION * avail
    try:
        chunk = choose_client_chunk(cfg, flat.dim, act, data_bytes, budget)
        fits = True
        preferred = preferred_client_chunk(cfg)
        if preferred is not None and (chunk is None or preferred < chunk):
            chunk = preferred
    except ValueError as err:
        if cfg.client_chunk is not None and "would fit" in str(err):
            raise
        # Nothing fits: keep planning (a --dry-run reports it); Simulation refuses to run.
        chunk, fits = 1, False
    advice = "" if fits or budget is None else fit_advice(cfg, flat.dim, act, data_bytes, budget)
    mem = estimate_memory(cfg, flat.dim, act, data_bytes, chunk or cfg.n_per_round)
    mem["budget"] = float(budget) if budget is not None else 0.0  # 0: unknown
    mem["fits"] = float(fits)
    return Plan(
        config=cfg,
        dataset=ds.name,
        dataset_source=ds.source,
        n_train=n_train,
        n_test=len(ds.y_test),
        client_pool=len(pool),
        proxy_indices=proxy,
        partition=padded,
        label_hist=label_hist,
        malicious=malicious,
        steps_per_epoch=int(padded.sizes.max() // cfg.batch_size),
        epochs=cfg.epochs,
        num_params=flat.num_params,
        dim=flat.dim,
        memory=mem,
        client_chunk=chunk,
        shared_shards=shared,
        memory_advice=advice,
    )


# ----------------------------------------------------------------------------- state
# One jitted resize shared by every Simulation (a per-call jax.jit recompiled for each run).
_resize = jax.jit(pil_bilinear_resize)


def _resized(x: np.ndarray, chunk: int = 8192) -> jax.Array:
    """Put uint8 images on device at 32×32, resizing (F)MNIST once, on device.

    The reference resizes before any random op, so resizing the whole set once is the same
    as resizing every batch (and the transforms skip the resize for 32×32 input).
    """
    if x.shape[1:3] == INPUT_SHAPE[:2] or len(x) == 0:
        return jnp.asarray(x).reshape(len(x), *INPUT_SHAPE[:2], x.shape[-1])
    parts = [_resize(jnp.asarray(x[i : i + chunk])) for i in range(0, len(x), chunk)]
    return jnp.concatenate(parts)


class SimData(NamedTuple):
    """Device arrays the jitted round reads (arguments, not constants).

    Registered clients are split into D blocks, one per device of the client mesh (D = 1
    without one): contiguous ids, or `Simulation.train_order`'s balanced blocks. `train`
    holds, for each block, only the images its clients use (`client_blocks`), with the block
    axis sharded over the mesh: each device, and so each host, stores just its own clients'
    data; `idx` indexes into the client's block.
    """

    train: ClientData  # (D, U, ...) per-block images / labels / poison flags
    idx: jax.Array  # (N, max_samples) int32 indices into the client's block
    sizes: jax.Array  # (N,) int32
    malicious: jax.Array  # (N,) bool
    rank: jax.Array  # (N,) int32
    proxy: ClientData  # (P, ...) the server's proxy set (may be empty), replicated
    x_test: jax.Array
    y_test: jax.Array


def first_block(train: ClientData) -> ClientData:
    """Block 0 of per-block train arrays, (U, ...): one device's clients' data (all clients'
    without a mesh)."""
    return ClientData(*(a[0] for a in train))


def client_blocks(
    indices: np.ndarray, sizes: np.ndarray, n_blocks: int, order: np.ndarray | None = None
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Split clients into `n_blocks` blocks and re-index their samples per block.

    Args:
      indices: (N, S) padded global sample indices (`PaddedPartition.indices`).
      sizes: (N,) valid entries per row.
      n_blocks: D, dividing N.
      order: (N,) client ids; block p holds `order[p·N/D : (p+1)·N/D]`
        (`balanced_order`). None: contiguous blocks of ids.

    Returns:
      (local, members): `members[p]` the sorted global ids of every sample used by block
      p's clients; `local` (N, S) int32 with `members[p][local[c, k]] == indices[c, k]` for
      the valid entries of client c in block p (padding entries 0).
    """
    n, s = indices.shape
    if n % n_blocks:
        raise ValueError(f"{n} clients do not split into {n_blocks} equal blocks")
    order = np.arange(n) if order is None else np.asarray(order)
    if sorted(order.tolist()) != list(range(n)):
        raise ValueError(f"order must be a permutation of the {n} client ids, got {order}")
    per = n // n_blocks
    local = np.zeros((n, s), np.int32)
    members = []
    for p in range(n_blocks):
        rows = order[p * per : (p + 1) * per]
        valid = np.arange(s)[None, :] < sizes[rows, None]
        u = np.unique(indices[rows][valid])
        members.append(u)
        local[rows] = np.where(valid, np.searchsorted(u, indices[rows]), 0)
    return local, members


@functools.partial(jax.jit, static_argnums=1)  # one compile per (N, D), not per Simulation
def balanced_permutation(steps: jax.Array, n_blocks: int) -> jax.Array:
    """Clients for D devices that train their N/D clients one after another, so that each
    device's summed local steps are close; traceable (the engine also runs it per round on
    the sampled participants).

    Longest first, each client to the device with the fewest steps so far among those with
    fewer than N/D clients (ties: the lower device); positions ascending within a device.
    With Dirichlet client sizes, contiguous blocks leave the busiest device 1-18 % above
    the mean (benchmarks/RESULTS.md, issue 14), and a round lasts as long as that device.

    Args:
      steps: (N,) integer local steps of each client (any cost proportional to them).
      n_blocks: D, dividing N.

    Returns:
      (N,) int32 positions, device p's = entries [p·N/D, (p+1)·N/D); the identity when the
      busiest device would not get fewer steps than with contiguous blocks.
    """
    steps = jnp.asarray(steps, jnp.int32)
    n = steps.shape[0]
    per = n // n_blocks
    full = jnp.iinfo(jnp.int32).max

    def place(k, carry):
        load, count, device = carry
        c = longest[k]
        p = jnp.argmin(jnp.where(count < per, load, full))  # first minimum: the lower device
        return load.at[p].add(steps[c]), count.at[p].add(1), device.at[c].set(p)

    longest = jnp.argsort(-steps, stable=True)
    zeros = jnp.zeros(n_blocks, jnp.int32)
    load, _, device = jax.lax.fori_loop(0, n, place, (zeros, zeros, jnp.zeros(n, jnp.int32)))
    ids = jnp.arange(n, dtype=jnp.int32)
    grouped = jnp.argsort(device * n + ids, stable=True).astype(jnp.int32)
    contiguous = steps.reshape(n_blocks, per).sum(axis=1).max()
    return jnp.where(load.max() < contiguous, grouped, ids)


def balanced_order(steps: np.ndarray, n_blocks: int) -> np.ndarray | None:
    """`balanced_permutation` on the host: the block order for `client_blocks`.

    Returns:
      (N,) client ids, block p = entries [p·N/D, (p+1)·N/D); None when contiguous id
      blocks are kept (no device would get fewer steps).
    """
    steps = np.asarray(steps)
    n = len(steps)
    if n_blocks < 1 or n % n_blocks:
        raise ValueError(f"{n} clients do not split into {n_blocks} equal blocks")
    order = np.asarray(balanced_permutation(jnp.asarray(steps, jnp.int32), n_blocks))
    return None if (order == np.arange(n)).all() else order.astype(np.int64)


def poison_draw(seed: int, n_train: int, rate: float) -> np.ndarray:
    """(n_train,) bool: which samples an attacker poisons. Host-side, fixed per sample for the
    run (the reference draws it once, §1.6)."""
    return np.random.RandomState(seed + 1).random_sample(n_train) < rate


def attacker_ranks(malicious: np.ndarray) -> np.ndarray:
    """(N,) int32: each attacker's rank among the attackers (0..m-1), 0 for benign clients."""
    m_ids = np.flatnonzero(malicious)
    rank = np.zeros(len(malicious), np.int32)
    rank[m_ids] = np.arange(len(m_ids), dtype=np.int32)
    return rank


class RunState(NamedTuple):
    """Everything carried from round to round."""

    global_flat: jax.Array  # (d,)
    agg_state: PyTree
    teachers: jax.Array  # SPMC clients: (N, d) or (m, d) (`Config.spmc_teachers`); else (1, 1)
    teacher_ids: jax.Array  # sorted client ids of the `teachers` rows (-1: none yet)
    key: jax.Array
    hooks: PyTree = ()  # per-run states of the client hooks (client.ClientHook), in order


class RoundOut(NamedTuple):
    """Per-round diagnostics returned by the scan (stacked over rounds)."""

    client_ids: jax.Array  # (m,)
    client_weights: jax.Array  # (m,)
    loss: jax.Array  # (m,) mean local training loss
    projected: jax.Array  # (m,) mean projected tensors per step (SPMC)
    nonfinite: jax.Array  # (m,) bool: the client's row was non-finite (neutralised)


class _Proxy:
    """`ProxyOps` on the server's proxy set, bound to (possibly traced) data arrays."""

    def __init__(self, sim: Simulation, data: SimData) -> None:
        self.sim = sim
        self.data = data

    def loss_entropy(self, flat: jax.Array) -> tuple[jax.Array, jax.Array]:
        d = self.data
        x = self.sim.test_transform(d.proxy.x)
        logits = self.sim.predict(flat, x)
        logp = jax.nn.log_softmax(logits)
        loss = -jnp.mean(jnp.take_along_axis(logp, d.proxy.y[:, None], 1))
        ent = -jnp.mean(jnp.sum(jnp.exp(logp) * logp, -1))
        return loss, ent

    def train(self, flat: jax.Array, key: jax.Array, epochs: int) -> jax.Array:
        return self.sim.proxy_train(flat, self.data, key, epochs)

    def logits(self, flat: jax.Array, x: jax.Array) -> jax.Array:
        return self.sim.predict(flat, x)

    def inputs(self) -> tuple[jax.Array, jax.Array]:
        return self.sim.test_transform(self.data.proxy.x), self.data.proxy.y

    def features(self, flat: jax.Array, x: jax.Array) -> jax.Array:
        variables = self.sim.flat.unravel(flat)
        return cast(jax.Array, self.sim.model.apply(variables, x, method="features"))


class Simulation:
    """A compiled federation for one `Config` and dataset."""

    def __init__(
        self, cfg: Config, ds: Dataset, plan: Plan | None = None, *, place_data: bool = True
    ) -> None:
        """Build the federation's programs and (with `place_data`) put its data on device.

        `place_data=False` skips the device data (`self.data` is None): a
        `spmc_jax.batch.BatchedSimulation` uses the Simulation as the template of its
        federations and places their data itself.
        """
        self.cfg = cfg
        self.plan = plan or make_plan(cfg, ds)
        ds = _subsample(ds, cfg.subsample, cfg.seed)
        self.ds = ds
        plan = self.plan
        self.conv_impl = resolve_conv_impl(cfg)
        # "ynn" or "off"; every program of the federation is compiled with its options.
        self.cpu_dot_fusion = resolve_cpu_dot_fusion(cfg.cpu_dot_fusion, model=cfg.model)
        self.compiler_options = compiler_options(self.cpu_dot_fusion)
        self.model = get_model(cfg.model, ds.num_classes, self.conv_impl, cfg.compute_dtype)
        root = jax.random.key(cfg.seed)
        self.init_key, self.round_key = jax.random.split(root)
        variables = self.model.init(self.init_key, jnp.zeros((1, *INPUT_SHAPE)), train=False)
        self.flat = Flattener.build(variables)
        self.init_flat = self.flat.ravel(variables)
        self.n = cfg.n_per_round
        self.N = cfg.clients
        if not plan.memory.get("fits", 1.0):
            raise ValueError(
                f"the plan needs ~{plan.memory['total'] / 2**30:.1f} GiB even one client at a "
                f"time, over the {plan.memory['budget'] / 2**30:.1f} GiB budget: "
                f"{plan.memory_advice}"
            )
        self.client_chunk = plan.client_chunk
        # Devices must split both the participants and the registered clients evenly.
        n_dev = sharding_lib.resolve_device_count(cfg.devices, math.gcd(self.n, self.N))
        self.mesh = sharding_lib.client_mesh(n_dev) if n_dev > 1 else None
        # With a mesh, 'blocks': device p stores only block p's clients' images and trains
        # only them (partial participation then samples m/D per block); 'replicated': every
        # device stores every image, participants are sampled as on one device and split
        # evenly, so results equal the 1-device run. 'auto': blocks exactly when sampling
        # cannot differ (full participation).
        mode = cfg.client_data
        if mode == "auto":
            mode = "blocks" if self.n == self.N else "replicated"
        self.n_blocks = self.mesh.size if self.mesh is not None and mode == "blocks" else 1
        # Each device training its clients one after another (chunk 1, the CPU default):
        # clients go to devices by `balanced_permutation` of their local steps, not in
        # contiguous blocks. Under full participation once (`train_order`, also the data
        # blocks' layout); with sampled participants on replicated data, every round. Rows
        # are put back in order after training, so only which device trains a client
        # changes. (With vmapped chunks a chunk pays its slowest client's steps for every
        # client: there each device groups its own clients by steps, `_by_steps`. With data
        # blocks, a participant must train where its data is.)
        self.client_steps = plan.partition.sizes // cfg.batch_size * plan.epochs  # per round
        self.train_order = None
        self.balance_rounds = False
        mesh = self.mesh
        if cfg.balance_clients and mesh is not None and self.client_chunk == 1:
            if self.n == self.N:
                self.train_order = balanced_order(self.client_steps, mesh.size)
            else:
                self.balance_rounds = self.n_blocks == 1

        env = AttackEnv(
            image_shape=INPUT_SHAPE,
            mean=ds.mean,
            std=ds.std,
            num_classes=ds.num_classes,
            num_malicious=cfg.num_malicious,
            n_clients=self.n,
            lr=cfg.lr,
            param_mask=self.flat.param_mask,
            model=ModelOps(self.flat, self._logits),
            dataset=cfg.dataset,
            data_dir=cfg.data_dir,
            output_layer=OUTPUT_LAYERS[cfg.model],
        )
        self.data_attack, self.model_attacks = parse_attack(cfg.attack, env, cfg.attack_options())
        # ---- client hooks (client.ClientHook): stateful triggers, training-time attacks,
        # FedProx, local DP. Empty by default: then no code path below changes.
        self.hooks = collect_hooks(
            self.data_attack,
            [*parse_client_attacks(cfg.attack, env, cfg.attack_options()), *config_hooks(cfg, env)],
        )
        if cfg.stream_aggregation and any(h.rows is not None for h in self.hooks):
            raise ValueError(
                "--stream-aggregation cannot run client hooks that transform the client matrix "
                f"({', '.join(h.name for h in self.hooks if h.rows is not None)})"
            )
        # ---- end client hooks
        if cfg.stream_aggregation and (self.model_attacks or self.mesh is not None):
            raise ValueError(
                "--stream-aggregation folds client models into a running sum as they are "
                f"trained: it cannot run model attacks (--attack {cfg.attack!r}) or shard "
                f"clients over {1 if self.mesh is None else self.mesh.size} devices; accepted: "
                "data-only attacks on one device"
            )
        probe = self.data_attack
        if probe is not None and probe.test is None and probe.test_set is None:
            probe = None
        self._probe_stateful = probe is not None and probe.hook is not None  # client hooks
        # Attacks without a test-time trigger are probed with the reference trigger, so R
        # (and V) stay defined: how often that trigger flips predictions to class 2.
        self.r_trigger = "attack" if probe is not None else "base (probe)"
        probe = probe or base_trigger(env)
        assert probe.target is not None  # trigger attacks always have a target
        self.target = int(probe.target)
        self.train_transform = make_train_transform(ds.kind, ds.mean, ds.std, ds.flip)
        self.test_transform = make_test_transform(ds.kind, ds.mean, ds.std)
        tx = make_optimizer(cfg.lr, cfg.momentum, cfg.weight_decay)
        spmc_opts = (
            SpmcClientOptions(cfg.spmc_lambda, attackers=cfg.attackers_projection_mode)
            if cfg.uses_spmc_client
            else None
        )
        # One SGD step of one client (benchmarks time it alone) and its scan over the epochs.
        self.client_step = make_client_step(
            self.model,
            self.train_transform,
            tx,
            batch_size=cfg.batch_size,
            data_attack=self.data_attack,
            spmc=spmc_opts,
            hooks=self.hooks,
        )
        self.local_train = local_train_from_step(
            self.client_step,
            tx,
            batch_size=cfg.batch_size,
            steps_per_epoch=plan.steps_per_epoch,
            epochs=plan.epochs,
        )
        n_proxy = len(plan.proxy_indices)
        self._proxy_steps = max(n_proxy // cfg.batch_size, 1)
        self._proxy_train_fns: dict[int, Callable] = {}
        self._tx = tx
        self.evaluator = make_evaluator(
            self.predict, self.test_transform, probe.test, self.target, cfg.eval_batch
        )
        # A standalone backdoor test set (edge_case): its accuracy w.r.t. the backdoor
        # labels is the attack success rate.
        self.backdoor_set = bset = probe.test_set
        self.backdoor_evaluator = (
            None
            if bset is None
            else make_evaluator(self.predict, bset.transform, None, self.target, cfg.eval_batch)
        )
        self.agg_env = AggregatorEnv(
            n_clients=self.n,
            num_malicious=cfg.defense_assumed_malicious,
            lr=cfg.lr,
            rounds=cfg.rounds,
            param_mask=self.flat.param_mask,
            total_clients=self.N,
            proxy=None,
            layout=self.flat.layout,
            output_layer=OUTPUT_LAYERS[cfg.model],
            reference_param_order=(
                self.flat.reference_order(cfg.model, params_only=True)
                if cfg.model in REFERENCE_MODULES
                else None
            ),
            dataset=cfg.dataset,
            data_dir=cfg.data_dir,
            mean=tuple(ds.mean),
            std=tuple(ds.std),
        )
        self.defense_opts = self._defense_options()
        self.data: SimData | None = self._device_data() if place_data else None
        self._attacker_idx = self._attacker_sample()  # client hooks' ServerContext data
        self.run_rounds = self.jit(self._run_rounds, static_argnums=(2,))
        self.evaluate = self.jit(self._evaluate)

    def jit(self, fun: Callable[..., Any], **jit_kwargs: Any) -> Program:
        """`jax.jit(fun, **jit_kwargs)` compiled with this federation's `compiler_options`, as
        its round and evaluation are (benchmarks timing pieces of the round use it)."""
        return Program(fun, self.compiler_options, **jit_kwargs)

    # ---- pieces -------------------------------------------------------------------
    def _defense_options(self) -> dict[str, Any]:
        """The rule's options as its factory receives them: `Config.defense_options()`
        (protocol quirks, SPMC flags, --defense-opt) coerced by the registry."""
        from spmc_jax.aggregators import REGISTRY
        from spmc_jax.registry import coerce_options

        spec = REGISTRY.get(self.cfg.defense)
        return coerce_options("defense", self.cfg.defense, spec.factory, self.cfg.defense_options())

    @property
    def poison_rate(self) -> float:
        """Fraction of an attacker's samples its data attack poisons (0 without one)."""
        return self.data_attack.poison_rate if self.data_attack is not None else 0.0

    def _device_data(self) -> SimData:
        cfg, plan, ds = self.cfg, self.plan, self.ds
        poison = poison_draw(cfg.seed, len(ds.y_train), self.poison_rate)
        rank = attacker_ranks(plan.malicious)
        order = self.train_order if self.n_blocks > 1 else None
        local, members = client_blocks(
            plan.partition.indices, plan.partition.sizes, self.n_blocks, order
        )
        self.block_members = members
        proxy = np.asarray(plan.proxy_indices, np.int64)
        replicated = self._place(
            dict(
                idx=jnp.asarray(local),
                sizes=jnp.asarray(plan.partition.sizes, jnp.int32),
                malicious=jnp.asarray(plan.malicious),
                rank=jnp.asarray(rank),
                proxy=ClientData(
                    x=_resized(ds.x_train[proxy]),
                    y=jnp.asarray(ds.y_train[proxy], jnp.int32),
                    poison=jnp.zeros(len(proxy), bool),
                ),
                x_test=_resized(ds.x_test),
                y_test=jnp.asarray(ds.y_test, jnp.int32),
            )
        )
        return SimData(train=self._block_data(members, poison), **replicated)

    def _block_data(self, members: list[np.ndarray], poison: np.ndarray) -> ClientData:
        """(D, U, ...) train arrays, block p = the samples of block p's clients, padded to
        the largest block. With D > 1 blocks, each host builds only its own devices' blocks;
        with one block on a mesh, every device holds it (replicated)."""
        ds, width = self.ds, max(len(u) for u in members)

        def block(field: str, p: int) -> np.ndarray:
            u = members[p]
            if field == "x":
                v = np.asarray(_resized(ds.x_train[u]))
            elif field == "y":
                v = ds.y_train[u].astype(np.int32)
            else:
                v = poison[u]
            pad = [(0, width - len(u))] + [(0, 0)] * (v.ndim - 1)
            return np.pad(v, pad)

        d = len(members)
        if d == 1:  # one device, or every device holds everything (replicated)
            return self._place(
                ClientData(*(jnp.asarray(block(f, 0)[None]) for f in ClientData._fields))
            )
        assert self.mesh is not None
        sharding = sharding_lib.client_sharding(self.mesh)
        x_shape = (d, width, *INPUT_SHAPE[:2], ds.x_train.shape[-1])  # (F)MNIST: 1 channel

        def build(field: str, shape: tuple[int, ...]) -> jax.Array:
            # Called only for this process's devices: other hosts' images are never placed.
            def cb(index):
                blocks = range(d)[index[0]]
                return np.stack([block(field, p) for p in blocks])

            return jax.make_array_from_callback(shape, sharding, cb)

        return ClientData(
            x=build("x", x_shape), y=build("y", (d, width)), poison=build("poison", (d, width))
        )

    def _place(self, tree: PyTree) -> PyTree:
        """Replicate a pytree over the mesh (a no-op on one device).

        Every process holds the same values (same data, same seed), so with many hosts each
        contributes its local copy to the global replicated array.
        """
        if self.mesh is None:
            return tree
        rep = sharding_lib.replicated(self.mesh)
        if jax.process_count() == 1:
            return jax.device_put(tree, rep)
        return jax.tree.map(
            lambda a: (
                jax.make_array_from_process_local_data(rep, np.asarray(a))
                if not jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)
                else jax.random.wrap_key_data(
                    jax.make_array_from_process_local_data(rep, np.asarray(jax.random.key_data(a)))
                )
            ),
            tree,
        )

    def _logits(self, variables: PyTree, x: jax.Array) -> jax.Array:
        """Eval-mode logits of a variables pytree (client hooks' `ModelOps.logits`)."""
        return cast(jax.Array, self.model.apply(variables, x, train=False))

    def _attacker_sample(self, size: int = 256) -> np.ndarray:
        """Up to `size` indices into block 0 of the malicious clients' samples (seeded), for
        hooks whose server update uses the attackers' data; empty when none needs it."""
        if not any(h.needs_attacker_data for h in self.hooks):
            return np.zeros((0,), np.int32)
        if self.n_blocks > 1:
            raise ValueError(
                f"client hooks {[h.name for h in self.hooks if h.needs_attacker_data]} read "
                "the attackers' data on the server side: run them with --client-data "
                "replicated or on one device"
            )
        idx = self.plan.partition.indices
        sizes = self.plan.partition.sizes
        local = client_blocks(idx, sizes, 1)[0]
        parts = [local[c, : sizes[c]] for c in np.flatnonzero(self.plan.malicious)]
        pool = np.concatenate(parts) if parts else np.zeros((1,), np.int32)
        rng = np.random.RandomState(self.cfg.seed + 11)
        return np.sort(rng.choice(pool, min(size, len(pool)), replace=False)).astype(np.int32)

    def device_placement(self) -> dict[str, list] | None:
        """Which clients each device of the client mesh trains, for run summaries.

        Returns:
          {"clients": per device its client ids, "steps": per device its clients' summed
          local steps per round, "client_steps": each client's local steps per round}; None
          on one device, and under partial participation (the participants, so their
          devices, change every round).
        """
        if self.mesh is None or self.n != self.N:
            return None
        d = self.mesh.size
        order = np.arange(self.N) if self.train_order is None else self.train_order
        steps = self.client_steps
        return {
            "clients": order.reshape(d, -1).tolist(),
            "steps": steps[order].reshape(d, -1).sum(axis=1).tolist(),
            "client_steps": steps.tolist(),
        }

    def predict(self, flat: jax.Array, x: jax.Array) -> jax.Array:
        """Eval-mode logits of the flat model (BatchNorm on running statistics)."""
        return cast(jax.Array, self.model.apply(self.flat.unravel(flat), x, train=False))

    def proxy_train(self, flat: jax.Array, data: SimData, key: jax.Array, epochs: int) -> jax.Array:
        """`epochs` of the clients' SGD on the proxy set (Finetuning, FLTrust)."""
        if epochs not in self._proxy_train_fns:
            self._proxy_train_fns[epochs] = make_local_train(
                self.model,
                self.train_transform,
                self._tx,
                batch_size=self.cfg.batch_size,
                steps_per_epoch=self._proxy_steps,
                epochs=epochs,
            )
        fn = self._proxy_train_fns[epochs]
        n_proxy = data.proxy.y.shape[0]
        task = ClientTask(
            idx=jnp.arange(n_proxy, dtype=jnp.int32),
            size=jnp.asarray(n_proxy, jnp.int32),
            malicious=jnp.asarray(False),
            rank=jnp.asarray(0, jnp.int32),
            key=key,
        )
        variables = self.flat.unravel(flat)
        out = fn(variables, variables, data.proxy, task, jnp.asarray(False))
        return self.flat.ravel(out.variables)

    def aggregator(self, data: SimData | None):
        env = self.agg_env
        if data is not None:
            env = dataclasses.replace(env, proxy=_Proxy(self, data))
        # The round sanitised W already (and passes `valid`): skip the rule's own (n, d) pass.
        return get_aggregator(self.cfg.defense, env, inputs_sanitized=True, **self.defense_opts)

    def init_state(self) -> RunState:
        """The state before round 0: the seed's initial model, the aggregator's initial state,
        SPMC's round-0 teachers and the rounds' root key."""
        return self.initial_state(self.init_flat, self.round_key)

    def initial_state(
        self, init_flat: jax.Array, round_key: jax.Array, data: SimData | None = None
    ) -> RunState:
        """`init_state` for a given initial model and round key (another seed's federation of
        the same shapes, `spmc_jax.batch`, which passes that federation's `data`)."""
        # With the proxy ops bound: rules that need proxy data refuse to build without them.
        agg = self.aggregator(data if data is not None else self.data)
        if not self.cfg.uses_spmc_client:
            teachers, ids = jnp.zeros((1, 1), jnp.float32), jnp.full((1,), -1, jnp.int32)
        elif self.cfg.spmc_teachers == "all":
            # Round-0 teachers: the initial model (§3.1).
            teachers = jnp.broadcast_to(init_flat, (self.N, self.flat.dim))
            ids = jnp.arange(self.N, dtype=jnp.int32)
        else:
            # No participants yet: every client's teacher is the global (= initial) model.
            teachers = jnp.zeros((self.n, self.flat.dim), jnp.float32)
            ids = jnp.full((self.n,), -1, jnp.int32)
        state = self._place(
            RunState(
                init_flat,
                agg.init(init_flat),
                teachers,
                ids,
                round_key,
                init_hook_states(self.hooks, init_flat),
            )
        )
        if self._shard_teachers:
            assert self.mesh is not None
            # Rounds return last round's teachers split over the client axis (they come from
            # the sharded rows); start that way so round 2 reuses round 1's compiled program.
            to_clients = jax.jit(
                lambda t, i: (t, i), out_shardings=sharding_lib.client_sharding(self.mesh)
            )
            teachers, ids = to_clients(state.teachers, state.teacher_ids)
            state = state._replace(teachers=teachers, teacher_ids=ids)
        return state

    @property
    def _shard_teachers(self) -> bool:
        """Last round's (m, d) teachers live split over the mesh's client axis."""
        return (
            self.mesh is not None
            and self.cfg.uses_spmc_client
            and self.cfg.spmc_teachers == "last_round"
        )

    def _lookup_teachers(self, state: RunState, ids: jax.Array) -> jax.Array:
        """Teacher rows of the participants `ids`: the stored marginal model where the client
        has one, else the global model (its marginal contribution is 0: α_i = 0 gives T_i = g,
        spmc_reference.md §3.1)."""
        pos = jnp.clip(jnp.searchsorted(state.teacher_ids, ids), 0, state.teacher_ids.shape[0] - 1)
        hit = state.teacher_ids[pos] == ids
        return jnp.where(hit[:, None], state.teachers[pos], state.global_flat[None, :])

    def _attack_active(self, r: jax.Array) -> jax.Array:
        # r is the 0-based loop index; the attack window is in 1-based round numbers.
        return (r + 1 >= self.cfg.attack_start) & (r + 1 <= self.cfg.last_attack_round)

    def _sample_clients(self, key: jax.Array) -> jax.Array:
        """Sorted ids of this round's m participants, uniform without replacement; with D
        data blocks (a mesh with `client_data` 'blocks'), m/D from each device's block of N/D
        clients (stratified, so every device trains only clients whose data it holds)."""
        if self.n == self.N:
            return jnp.arange(self.N, dtype=jnp.int32)
        d = self.n_blocks
        if d == 1:
            ids = jax.random.choice(key, self.N, (self.n,), replace=False)
            return jnp.sort(ids).astype(jnp.int32)
        per_n, per_m = self.N // d, self.n // d

        def block(k, p):
            return jnp.sort(jax.random.choice(k, per_n, (per_m,), replace=False)) + p * per_n

        ids = jax.vmap(block)(jax.random.split(key, d), jnp.arange(d))
        return ids.reshape(-1).astype(jnp.int32)

    def _client_fn(
        self, block: ClientData, global_flat: jax.Array, attack_on: jax.Array, hooks: PyTree = ()
    ):
        """`one((idx, size, malicious, rank, key, teacher_flat)) -> (row, loss, projected)`:
        one participant's local training on the data block `block` (leading axis 1);
        `hooks`: the client hooks' states of the round."""
        spmc = self.cfg.uses_spmc_client
        variables = self.flat.unravel(global_flat)
        train = first_block(block)

        def one(args):
            idx, size, mal, rank, key, teacher_flat = args
            teacher = self.flat.unravel(teacher_flat) if spmc else variables
            task = ClientTask(idx, size, mal, rank, key)
            out = self.local_train(variables, teacher, train, task, attack_on, hooks)
            return self.flat.ravel(out.variables), out.loss, out.projected

        return one

    @staticmethod
    def _client_inputs(data: SimData, ids: jax.Array, keys: jax.Array, teachers: jax.Array):
        """The participants' per-client inputs of `_client_fn`, stacked on the client axis."""
        return (
            data.idx[ids],
            data.sizes[ids],
            data.malicious[ids],
            data.rank[ids],
            keys[ids],
            teachers,
        )

    def _stream_clients(
        self, state: RunState, data: SimData, ids: jax.Array, keys: jax.Array, attack_on: jax.Array
    ):
        """Train the participants chunk by chunk and fold each chunk's rows into a weighted
        running sum (FedAvg / weighted FedAvg), never holding the (n, d) client matrix.

        Same weights as the rules: n_i (weighted) or 1, 0 for a non-finite row. Returns
        (new_global, client_weights, loss, projected, invalid (m,) bool).
        """
        n = self.n
        chunk = min(self.client_chunk or n, n)
        base = (
            data.sizes[ids].astype(jnp.float32)
            if self.cfg.defense == "fedavg_weighted"
            else jnp.ones((n,), jnp.float32)
        )
        xs = self._client_inputs(data, ids, keys, jnp.zeros((n, 1)))
        one = self._client_fn(data.train, state.global_flat, attack_on, state.hooks)
        order = _by_steps(xs[1], chunk)  # chunks of similar steps (float32 sum order only)
        if order is not None:
            xs, base = jax.tree.map(lambda a: a[order], (xs, base))

        def fold(acc, part):
            xs_c, b = part
            rows, loss, proj = jax.vmap(one)(xs_c)
            ok = jnp.all(jnp.isfinite(rows), axis=1)
            b = jnp.where(ok, b, 0.0)
            rows = jnp.where(ok[:, None], rows, 0.0)
            total, weight = acc
            total = total + jnp.matmul(b, rows, precision=jax.lax.Precision.HIGHEST)
            return (total, weight + jnp.sum(b)), (loss, proj, ok)

        acc = (jnp.zeros_like(state.global_flat), jnp.zeros((), jnp.float32))
        full = (n // chunk) * chunk
        head = jax.tree.map(lambda a: a[:full].reshape(n // chunk, chunk, *a.shape[1:]), xs)
        acc, (loss, proj, ok) = jax.lax.scan(
            fold, acc, (head, base[:full].reshape(n // chunk, chunk))
        )
        loss, proj, ok = loss.reshape(-1), proj.reshape(-1), ok.reshape(-1)
        if full < n:  # the remainder, one smaller chunk
            acc, (l2, p2, ok2) = fold(acc, (jax.tree.map(lambda a: a[full:], xs), base[full:]))
            loss, proj = jnp.concatenate([loss, l2]), jnp.concatenate([proj, p2])
            ok = jnp.concatenate([ok, ok2])
        if order is not None:  # back to `ids` order
            inv = jnp.argsort(order)
            loss, proj, ok, base = loss[inv], proj[inv], ok[inv], base[inv]
        total, weight = acc
        new_global = jnp.where(
            weight > 0, total / jnp.where(weight > 0, weight, 1.0), state.global_flat
        )
        client_weights = jnp.where(ok, base, 0.0) / jnp.where(weight > 0, weight, 1.0)
        return new_global, client_weights, loss, proj, ~ok

    def _train_clients(
        self, state: RunState, data: SimData, ids: jax.Array, keys: jax.Array, attack_on: jax.Array
    ):
        spmc = self.cfg.uses_spmc_client
        teachers = self._lookup_teachers(state, ids) if spmc else jnp.zeros((self.n, 1))
        xs = self._client_inputs(data, ids, keys, teachers)

        def train_block(block: ClientData, xs, global_flat, attack_on, hooks=()):
            """This device's participants, on this device's block of the train set."""
            one = self._client_fn(block, global_flat, attack_on, hooks)
            chunk = self.client_chunk
            if chunk is None or chunk >= xs[0].shape[0]:
                return jax.vmap(one)(xs)
            if chunk == 1:  # a plain scan (batch_size=1 would add a size-1 vmap axis)
                return jax.lax.map(one, xs)
            run = functools.partial(jax.lax.map, one, batch_size=chunk)
            return _permuted(run, xs, _by_steps(xs[1], chunk))

        if self.mesh is None:
            return train_block(data.train, xs, state.global_flat, attack_on, state.hooks)
        # Many devices: each trains its own participants (m/D of them: its block's clients)
        # on its own data block, or on the replicated train set; the client rows come out
        # sharded and the aggregation after it is left to sharding propagation.
        c, r = P(sharding_lib.CLIENT_AXIS), P()
        perm = None
        if self.train_order is not None:  # full participation: `ids` is every client
            perm = jnp.asarray(self.train_order, jnp.int32)
        elif self.balance_rounds:  # this round's participants
            perm = balanced_permutation(data.sizes[ids] // self.cfg.batch_size, self.mesh.size)
        sharded = jax.shard_map(
            train_block,
            mesh=self.mesh,
            in_specs=(c if self.n_blocks > 1 else r, c, r, r, r),
            out_specs=c,
            # No collectives inside: every device only reads its inputs. Without this, the
            # scans' carries (start: the replicated global model) fail the varying-axes check.
            check_vma=False,
        )
        # Rows come back in `ids` order: the rules see them as without the placement.
        return _permuted(
            lambda xs: sharded(data.train, xs, state.global_flat, attack_on, state.hooks),
            xs,
            perm,
        )

    def _round(self, state: RunState, data: SimData, r: jax.Array) -> tuple[RunState, RoundOut]:
        key = jax.random.fold_in(state.key, r)
        k_sample, k_clients, k_attack, k_agg = jax.random.split(key, 4)
        ids = self._sample_clients(k_sample)
        client_keys = jax.random.split(k_clients, self.N)
        attack_on = self._attack_active(r)
        if self.hooks:  # client hooks: the round's server-side state update, before training
            state = state._replace(hooks=self._hook_server_update(state, data, r, attack_on, key))
        if self.cfg.stream_aggregation:
            new_global, weights, loss, projected, n_bad = self._stream_clients(
                state, data, ids, client_keys, attack_on
            )
            out = RoundOut(ids, weights, loss, projected, n_bad)
            return state._replace(global_flat=new_global), out
        W, loss, projected = self._train_clients(state, data, ids, client_keys, attack_on)
        malicious = data.malicious[ids]
        for i, attack in enumerate(self.model_attacks):
            # cond, not where: outside the attack window the attack is neither computed nor
            # costs an (n, d) select.
            W = jax.lax.cond(
                attack_on,
                lambda W, a=attack, i=i: a.apply(
                    W, state.global_flat, malicious, jax.random.fold_in(k_attack, i)
                ),
                lambda W: W,
                W,
            )
        if self.hooks:  # client hooks: transforms of the trained rows (local DP, ...)
            W, hook_states = row_hooks(
                self.hooks,
                state.hooks,
                W,
                state.global_flat,
                malicious,
                attack_on,
                jax.random.fold_in(key, 0x600D),
            )
            state = state._replace(hooks=hook_states)  # `rows_state` hooks record
        W, valid = sanitize(W, state.global_flat)
        ctx = RoundContext(
            global_flat=state.global_flat,
            round=r,
            key=k_agg,
            n_samples=data.sizes[ids].astype(jnp.float32),
            valid=valid,
            client_ids=ids,
        )
        new_global, agg_state, info = self.aggregator(data).aggregate(W, state.agg_state, ctx)
        teachers, teacher_ids = state.teachers, state.teacher_ids
        if self.cfg.uses_spmc_client:
            t = spmc_lib.teachers(new_global, W, info.client_weights)
            if self.cfg.spmc_teachers == "all":
                teachers = teachers.at[ids].set(t)
            else:
                teachers, teacher_ids = t, ids
                if self._shard_teachers:  # pinned: the state's shardings never drift
                    assert self.mesh is not None
                    sh = sharding_lib.client_sharding(self.mesh)
                    teachers = jax.lax.with_sharding_constraint(teachers, sh)
                    teacher_ids = jax.lax.with_sharding_constraint(teacher_ids, sh)
        out = RoundOut(ids, info.client_weights, loss, projected, ~valid)
        new_state = RunState(new_global, agg_state, teachers, teacher_ids, state.key, state.hooks)
        return new_state, out

    def _hook_server_update(
        self, state: RunState, data: SimData, r: jax.Array, attack_on: jax.Array, key: jax.Array
    ) -> PyTree:
        """Client hooks' once-per-round state update (`client.server_update`)."""
        idx = jnp.asarray(self._attacker_idx)
        block = first_block(data.train)
        ctx = ServerContext(
            global_flat=state.global_flat,
            round=r,
            attack_on=attack_on,
            key=jax.random.fold_in(key, 0x5EED),
            attacker_x=self.test_transform(block.x[idx]),
            attacker_y=block.y[idx],
        )
        return server_update(self.hooks, state.hooks, ctx)

    def _run_rounds(self, state: RunState, data: SimData, count: int, start: jax.Array):
        return jax.lax.scan(lambda s, r: self._round(s, data, r), state, start + jnp.arange(count))

    def _evaluate(self, flat: jax.Array, data: SimData, hooks: PyTree = ()) -> dict[str, jax.Array]:
        if self._probe_stateful:  # a stateful trigger (client hook 0): the current trigger
            assert self.data_attack is not None and self.data_attack.test is not None
            test = self.data_attack.test
            trigger = lambda x, y: test(x, y, hooks[0])
            evaluator = make_evaluator(
                self.predict, self.test_transform, trigger, self.target, self.cfg.eval_batch
            )
            out = evaluator(flat, data.x_test, data.y_test)
        else:
            out = self.evaluator(flat, data.x_test, data.y_test)
        bset = self.backdoor_set
        if self.backdoor_evaluator is not None and bset is not None:
            asr = self.backdoor_evaluator(flat, jnp.asarray(bset.x), jnp.asarray(bset.y))["A"]
            # From the integer miss count (as the evaluator's R), so R never rounds below 0;
            # every image carries the backdoor label, so there is nothing to exclude.
            n_b = len(bset.y)
            hits = jnp.round(asr * n_b / 100.0)
            r = 100.0 * (n_b - hits) / n_b
            out = {**out, "R": r, "R_excl_target": r, "V": (out["A"] + r) / 2.0}
        return out


# ----------------------------------------------------------------------------- running
@dataclasses.dataclass
class RunResult:
    history: list[dict[str, Any]]
    state: RunState
    plan: Plan
    sim: Simulation


def _to_host(tree: PyTree) -> PyTree:
    """NumPy copy of (possibly multi-host, client-sharded) device arrays: every process gets all."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def block_rows(
    outs: RoundOut, metrics: dict[str, Any], start: int, malicious: np.ndarray, seconds: float
) -> list[dict[str, Any]]:
    """The history rows of one block of rounds (host arrays, `count` rounds stacked).

    Args:
      outs: the block's `RoundOut`, each field with a leading round axis.
      metrics: the evaluation after the block's last round (scalars A, R, R_excl_target, V).
      start: rounds completed before the block (its first row is round start + 1).
      malicious: (N,) bool, the registered clients' attacker mask.
      seconds: wall seconds per round of the block.
    """
    count = len(outs.client_ids)
    rows = []
    for j in range(count):
        ids = np.asarray(outs.client_ids[j])
        w = np.asarray(outs.client_weights[j], np.float64)
        bad = np.asarray(outs.nonfinite[j], bool)
        row: dict[str, Any] = {
            "round": start + j + 1,  # 1-based, as printed and as in the paper's figures
            "seconds": seconds,
            "client_ids": ids.tolist(),
            "client_weights": w.tolist(),
            "attacker_weight": float(w[malicious[ids]].sum() / max(w.sum(), 1e-30)),
            "loss": np.asarray(outs.loss[j]).tolist(),
            "projected": np.asarray(outs.projected[j]).tolist(),
            "nonfinite": int(bad.sum()),
            "nonfinite_ids": ids[bad].astype(int).tolist(),
        }
        last = j == count - 1
        for k in ("A", "R", "R_excl_target", "V"):
            v = float(metrics[k]) if last else None
            row[k] = None if v is None or math.isnan(v) else v
        rows.append(row)
    return rows


def run(
    cfg: Config,
    ds: Dataset,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    sim: Simulation | None = None,
    *,
    state: RunState | None = None,
    start_round: int = 0,
    history: list[dict[str, Any]] | None = None,
    on_checkpoint: Callable[[RunState, int], None] | None = None,
) -> RunResult:
    """Train the federation for `cfg.rounds` rounds, evaluating every `cfg.eval_every`.

    Args:
      cfg: the run's configuration.
      ds: the dataset (unused when `sim` is given).
      on_round: called with each round's row as soon as its block finishes.
      sim: a prepared Simulation (built from `cfg` and `ds` when None).
      state: the state after `start_round` completed rounds (resuming, e.g. restored by
        `spmc_jax.checkpoint`); None: `sim.init_state()`.
      start_round: rounds already completed; training runs rounds start_round..rounds-1.
        Blocks stay aligned to multiples of `cfg.eval_every`, so a resumed run evaluates
        the same rounds as the uninterrupted one (round r's randomness depends only on r
        and the state's key, so it also gets the same numbers).
      history: the rows of the completed rounds, kept in front of the new ones.
      on_checkpoint: called as `on_checkpoint(state, rounds_done)` after each evaluation
        block (after its rows went to `on_round`), e.g. to save a checkpoint.

    Returns:
      A RunResult whose `history` has one dict per round: round (1-based), A, R,
      R_excl_target, V (None on rounds not evaluated), seconds, client_ids, client_weights,
      attacker_weight, loss, projected, nonfinite (count of non-finite client rows) and
      nonfinite_ids (their registered client ids).

    Raises:
      ValueError: `start_round` outside [0, cfg.rounds], or > 0 without a `state`.
    """
    if not 0 <= start_round <= cfg.rounds:
        raise ValueError(f"start_round={start_round}; accepted: 0..{cfg.rounds} (cfg.rounds)")
    if start_round > 0 and state is None:
        raise ValueError(f"start_round={start_round} needs the state after those rounds")
    sim = sim or Simulation(cfg, ds)
    if sim.data is None:
        raise ValueError("the Simulation was built with place_data=False; accepted: one with data")
    state = sim.init_state() if state is None else state
    history = list(history or [])
    r = start_round
    malicious = np.asarray(sim.plan.malicious)
    while r < cfg.rounds:
        # To the next multiple of eval_every (from round 0 that is eval_every rounds).
        count = min(cfg.eval_every - r % cfg.eval_every, cfg.rounds - r)
        t0 = time.perf_counter()
        state, outs = sim.run_rounds(state, sim.data, count, jnp.asarray(r, jnp.int32))
        metrics = _to_host(sim.evaluate(state.global_flat, sim.data, state.hooks))
        outs = _to_host(outs)
        seconds = (time.perf_counter() - t0) / count
        for row in block_rows(outs, metrics, r, malicious, seconds):
            history.append(row)
            if on_round is not None:
                on_round(row)
        r += count
        if on_checkpoint is not None:
            on_checkpoint(state, r)
    return RunResult(history, state, sim.plan, sim)
