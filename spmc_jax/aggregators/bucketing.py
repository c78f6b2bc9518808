"""Bucketing (Karimireddy, He & Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets
via Bucketing", ICLR 2022, Algorithm 1), wrapping any registered rule.

With updates Δ_i = w_i − g of the n participants, a random permutation π and bucket size s:

    buckets  B_b = {π(b·s), …, π(min((b+1)·s, n) − 1)},   b = 0 … ⌈n/s⌉ − 1
    means    y_b = (1/|B_b|) Σ_{i ∈ B_b} Δ_i
    g'       = g + Aggr(y_0, …, y_{⌈n/s⌉−1})

where Aggr is any registered rule (`inner`; default "median", the coordinate-wise median,
which accepts any bucket count, while Krum needs ⌈n/s⌉ ≥ f + 3), run on the bucket means
as if they were ⌈n/s⌉ clients. Averaging s updates shrinks the benign heterogeneity by
about √s while each attacker still spoils at most one bucket, so the inner rule sees at
most f bad inputs among ⌈n/s⌉ (its `num_malicious` is min(f, ⌈n/s⌉)).

Details of this implementation:
* π is drawn per round from ctx.key as the order of per-client random priorities
  u_i = U(fold_in(key, client_id_i)), so the buckets depend on who the clients are, not on
  the row order (the rule is invariant to a permutation of the rows).
* Non-finite rows (`ctx.valid` False) do not enter their bucket's mean; a bucket whose
  members are all invalid is an invalid input to the inner rule (zero weight).
* The inner rule gets the bucket means as models g + y_b, n_samples = the members' total,
  client_ids = bucket indices 0 … ⌈n/s⌉ − 1 (per-client state of the inner rule, e.g.
  FoolsGold's history, therefore follows bucket positions, not clients), a key split from
  ctx.key, and its own state inside this rule's state.
* `inner_opts` passes options to the inner rule as "key=value" pairs separated by ";",
  e.g. `inner=trimmed_mean, inner_opts="trim=1"`.

client_weights: client i in bucket b gets v_b / (number of valid members of b), where v_b
is the inner rule's weight of bucket b.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from spmc_jax.aggregators import REGISTRY, get_aggregator, register
from spmc_jax.aggregators.base import (
    AggInfo,
    Aggregator,
    AggregatorEnv,
    AggregatorSpec,
    RoundContext,
)
from spmc_jax.registry import parse_kv


def bucket_order(key: jax.Array, client_ids: jax.Array) -> jax.Array:
    """The round's permutation π: row indices sorted by per-client random priorities."""
    prio = jax.vmap(lambda c: jax.random.uniform(jax.random.fold_in(key, c)))(client_ids)
    return jnp.argsort(prio, stable=True)


def bucket_assignment(order: jax.Array, bucket_size: int) -> jax.Array:
    """Bucket index (n,) of each row: row order[p] goes to bucket p // bucket_size."""
    n = order.shape[0]
    return jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32) // bucket_size)


def _parse_inner_opts(text: str) -> dict[str, str]:
    items = [s for s in text.split(";") if s.strip()]
    try:
        return parse_kv(items, "bucketing inner_opts")
    except ValueError as e:
        raise ValueError(
            f"bucketing: inner_opts={text!r} is not valid ({e}); accepted: "
            f"'key=value;key=value' options of the inner rule"
        ) from None


def bucketing(
    env: AggregatorEnv, *, bucket_size: int = 2, inner: str = "median", inner_opts: str = ""
) -> Aggregator:
    """Build Bucketing around the registered rule `inner` (see the module docstring).

    Args:
      env: run facts; the inner rule gets a copy with n_clients = ⌈n/s⌉,
        num_malicious = min(f, ⌈n/s⌉) and total_clients = ⌈n/s⌉.
      bucket_size: s >= 1 (s = 1 is the inner rule on a random order of the clients).
      inner: name of a registered rule other than "bucketing".
      inner_opts: the inner rule's options, "key=value;key=value".

    Raises:
      ValueError: for s < 1, an unknown or recursive inner rule, or inner options that
        the inner rule refuses (with the inner rule's message).
    """
    if bucket_size < 1:
        raise ValueError(f"bucketing: bucket_size={bucket_size}; accepted: integer >= 1")
    if inner == "bucketing":
        raise ValueError("bucketing: inner='bucketing'; accepted: any other registered rule")
    if inner not in REGISTRY.names():
        raise ValueError(
            f"bucketing: unknown inner rule {inner!r}; accepted: "
            f"{', '.join(x for x in REGISTRY.names() if x != 'bucketing')}"
        )
    n = env.n_clients
    s = int(bucket_size)
    nb = -(-n // s)
    inner_env = AggregatorEnv(
        n_clients=nb,
        num_malicious=min(env.num_malicious, nb),
        lr=env.lr,
        rounds=env.rounds,
        param_mask=env.param_mask,
        total_clients=nb,
        proxy=env.proxy,
        layout=env.layout,
        output_layer=env.output_layer,
    )
    try:
        agg = get_aggregator(
            inner, inner_env, inputs_sanitized=True, **_parse_inner_opts(inner_opts)
        )
    except ValueError as e:
        raise ValueError(f"bucketing (inner {inner!r} on {nb} buckets of {s}): {e}") from None

    def init(global_flat: jax.Array) -> Any:
        return agg.init(global_flat)

    def aggregate(client_flat, state, ctx: RoundContext):
        g = ctx.global_flat
        k_perm, k_inner = jax.random.split(ctx.key)
        bucket = bucket_assignment(bucket_order(k_perm, ctx.client_ids), s)
        member = (bucket[None, :] == jnp.arange(nb)[:, None]) & ctx.valid[None, :]  # (nb, n)
        m = member.astype(client_flat.dtype)
        count = jnp.sum(m, axis=1)
        deltas = client_flat - g[None, :]
        means = jnp.matmul(m, deltas, precision=jax.lax.Precision.HIGHEST)
        means = means / jnp.maximum(count, 1.0)[:, None]
        inner_ctx = RoundContext(
            global_flat=g,
            round=ctx.round,
            key=k_inner,
            n_samples=m @ ctx.n_samples.astype(m.dtype),
            valid=count > 0,
            client_ids=jnp.arange(nb, dtype=jnp.int32),
        )
        new_global, state, info = agg.aggregate(g[None, :] + means, state, inner_ctx)
        per_member = info.client_weights / jnp.maximum(count, 1.0)
        weights = jnp.where(ctx.valid, per_member[bucket], 0.0).astype(jnp.float32)
        return new_global, state, AggInfo(client_weights=weights)

    return Aggregator(init, aggregate)


register(
    AggregatorSpec(
        "bucketing",
        bucketing,
        "Bucketing (Karimireddy et al., ICLR'22): average random buckets of bucket_size=2 "
        "clients, then any rule (inner=median, inner_opts='k=v;k=v') on the bucket means",
    )
)
