"""Coordinate-wise median (Yin et al., "Byzantine-Robust Distributed Learning: Towards
Optimal Statistical Rates", ICML 2018).

With updates Δ_i = w_i − g, every coordinate of the new model is the median of the
clients' values at that coordinate:

    g'_k = g_k + median_i Δ_{i,k}     (mean of the two middle values when the count is even).

Non-finite rows (`ctx.valid` False) are excluded from every median. All coordinates are
treated alike (BatchNorm statistics too: a median of statistics is a statistic of one
client). Needs no attacker count.

`client_weights`: the fraction of the (kept values over all coordinates) that came from
each client, i.e. (#coordinates where client i supplied a middle value) / (total kept
entries); sums to 1 and is 1/n in expectation for exchangeable clients. Ties are broken
by row order.

Option `server_momentum` applies the reference's server momentum (see
`krum.server_momentum_step`); 0 (the paper) by default.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from spmc_jax.aggregators import register
from spmc_jax.aggregators._robust import coordinate_trimmed_mean_kept
from spmc_jax.aggregators.base import AggInfo, Aggregator, AggregatorEnv, AggregatorSpec
from spmc_jax.aggregators.krum import server_momentum_step


def median(env: AggregatorEnv, *, server_momentum: float = 0.0) -> Aggregator:
    """Coordinate-wise median of the updates.

    Args:
      env: run facts; uses n_clients and param_mask (for the momentum option).
      server_momentum: μ of `krum.server_momentum_step` (0 = none).

    Returns:
      Aggregator; state () or the momentum vector (d,).
    """
    n = env.n_clients
    if not 0.0 <= server_momentum < 1.0:
        raise ValueError(f"median: server_momentum={server_momentum}; accepted: 0 <= value < 1")
    mask = jnp.asarray(np.asarray(env.param_mask, dtype=bool))
    # Trimming ⌊(n−1)/2⌋ per side leaves the middle one (odd count) or two (even count);
    # with dropped rows the helper lowers the trim to ⌊(n_valid−1)/2⌋, again the median.
    trim = (n - 1) // 2

    def init(global_flat):
        return jnp.zeros_like(global_flat) if server_momentum > 0 else ()

    def aggregate(client_flat, state, ctx):
        deltas = client_flat - ctx.global_flat[None, :]
        update, share = coordinate_trimmed_mean_kept(deltas, trim, ctx.valid)
        if server_momentum > 0:
            state, update = server_momentum_step(state, update, server_momentum, mask)
        return ctx.global_flat + update, state, AggInfo(client_weights=share.astype(jnp.float32))

    return Aggregator(init, aggregate)


register(
    AggregatorSpec(
        "median",
        median,
        "Coordinate-wise median of the updates (Yin et al. 2018); needs no attacker count",
    )
)
