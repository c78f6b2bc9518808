"""Coordinate-wise trimmed mean (Yin et al., "Byzantine-Robust Distributed Learning: Towards
Optimal Statistical Rates", ICML 2018).

With updates Δ_i = w_i − g and trim β per side, every coordinate of the new model drops
the β smallest and β largest client values and averages the rest:

    g'_k = g_k + (1/(n − 2β)) Σ_{i ∈ U_k} Δ_{i,k},   U_k = ranks β .. n−β−1 at coordinate k.

β defaults to the assumed attacker count f (`env.num_malicious`, or the `num_malicious`
option); it must satisfy 2β < n. Non-finite rows (`ctx.valid` False) are excluded; if
fewer than 2β + 1 valid rows remain, the trim is lowered to ⌊(n_valid − 1)/2⌋ (the median).

Reference behaviour (spmc_reference.md §4, `RF/Server/TrimmedMean.py`): per coordinate,
the mean of the 5 values closest to the median, with server momentum 0.9:
`closest_k=5, server_momentum=0.9`.

`client_weights`: each client's share of the kept entries over all coordinates (sums to
1; see `median.py`).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from spmc_jax.aggregators import register
from spmc_jax.aggregators._robust import (
    closest_to_median_mean_kept,
    coordinate_trimmed_mean_kept,
    resolve_num_malicious,
)
from spmc_jax.aggregators.base import AggInfo, Aggregator, AggregatorEnv, AggregatorSpec
from spmc_jax.aggregators.krum import server_momentum_step


def trimmed_mean(
    env: AggregatorEnv,
    *,
    beta: int = -1,
    num_malicious: int = -1,
    closest_k: int = 0,
    server_momentum: float = 0.0,
) -> Aggregator:
    """Coordinate-wise β-trimmed mean of the updates.

    Args:
      env: run facts; uses n_clients, num_malicious, param_mask.
      beta: values trimmed per side; < 0 means f.
      num_malicious: f; -1 takes `env.num_malicious` (only used when beta < 0).
      closest_k: if > 0, average instead the `closest_k` values closest to the coordinate
        median (the reference's variant, 5 there); beta is then unused.
      server_momentum: μ of `krum.server_momentum_step` (0 = paper, 0.9 = reference).

    Returns:
      Aggregator; state () or the momentum vector (d,).
    """
    n = env.n_clients
    b = int(beta) if beta >= 0 else resolve_num_malicious(env.num_malicious, num_malicious, n)
    if closest_k > 0:
        if closest_k > n:
            raise ValueError(f"trimmed_mean: closest_k={closest_k} > n={n}; accepted: 1..n")
    elif 2 * b >= n:
        raise ValueError(
            f"trimmed_mean: trim beta={b} with n={n} leaves nothing; accepted: 0 <= beta, "
            f"2*beta < n (beta defaults to num_malicious)"
        )
    if not 0.0 <= server_momentum < 1.0:
        raise ValueError(
            f"trimmed_mean: server_momentum={server_momentum}; accepted: 0 <= value < 1"
        )
    mask = jnp.asarray(np.asarray(env.param_mask, dtype=bool))

    def init(global_flat):
        return jnp.zeros_like(global_flat) if server_momentum > 0 else ()

    def aggregate(client_flat, state, ctx):
        deltas = client_flat - ctx.global_flat[None, :]
        if closest_k > 0:
            update, share = closest_to_median_mean_kept(deltas, closest_k, ctx.valid)
        else:
            update, share = coordinate_trimmed_mean_kept(deltas, b, ctx.valid)
        if server_momentum > 0:
            state, update = server_momentum_step(state, update, server_momentum, mask)
        return ctx.global_flat + update, state, AggInfo(client_weights=share.astype(jnp.float32))

    return Aggregator(init, aggregate)


register(
    AggregatorSpec(
        "trimmed_mean",
        trimmed_mean,
        "Coordinate-wise trimmed mean (Yin et al. 2018), beta per side, default beta = f = "
        "env.num_malicious unless num_malicious >= 0",
        needs_num_malicious=True,
    )
)
