"""Krum (Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient
Descent", NeurIPS 2017).

With updates Δ_i = w_i − g and f assumed attackers, each client's score is the sum of
squared distances to its n − f − 2 nearest other clients,

    s_i = Σ_{j ∈ N_i} ‖Δ_i − Δ_j‖²,      |N_i| = n − f − 2,

and the server applies the update of the lowest-scoring client: g' = g + Δ_{argmin s}.
Blanchard et al.'s guarantee needs n > 2f + 2; the rule only refuses settings where the
score is undefined (n − f − 2 < 1).

Details of this implementation:
* Distances and norms use the trainable parameters only (`env.param_mask`): the papers'
  models have no BatchNorm statistics, and those are not gradient-trained. The selected
  client's whole vector (statistics included) becomes the update.
* Non-finite rows (`ctx.valid` False, already replaced by a zero update) are dropped:
  they are never selected and never neighbours, and the neighbour count is that of Krum
  on the n_valid remaining rows, n_valid − f − 2 (see `krum_order`). With no valid row
  the global model is kept.
* Ties in the score are broken by the total distance to all valid rows (see `krum_order`),
  which keeps the rule invariant to the client order; with one neighbour (e.g. n = 3,
  f = 0) the two rows of the closest pair always tie.
* Reference behaviour (spmc_reference.md §4, `RF/Server/Krum.py`) via options: the score
  sums *non-squared* distances to *all* other clients (`squared=False`,
  `num_neighbors=n-1`) and the aggregate goes through server momentum 0.9
  (`server_momentum=0.9`, see `server_momentum_step`). Its broken base model (a foreign
  random init) is not reproduced.

This module also holds `server_momentum_step`, shared by the Krum family, the median and
the trimmed mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from spmc_jax.aggregators import register
from spmc_jax.aggregators._robust import krum_scores, pairwise_sq_dists, resolve_num_malicious
from spmc_jax.aggregators.base import AggInfo, Aggregator, AggregatorEnv, AggregatorSpec


def server_momentum_step(
    state: jax.Array, update: jax.Array, momentum: float, param_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Server momentum on the aggregated update: v ← μ·v + Δ̄ (parameters), v ← Δ̄ (statistics).

    This is the reference's `v ← 0.9·v − lr·ū` with pseudo-gradients u_i = (g − w_i)/lr:
    the robust aggregates used here (selection, median, trimmed means) commute with the
    map Δ ↦ −Δ/lr, so −lr·ū equals the aggregate of the updates Δ_i, and lr cancels.
    BatchNorm statistics (param_mask False) take the aggregate directly: momentum on
    running variances could push them negative.

    Returns:
      (new state v, the update to add to the global model, which is v).
    """
    v = jnp.where(param_mask, momentum * state + update, update)
    return v, v


def krum_order(
    deltas: jax.Array,
    valid: jax.Array,
    f: int,
    num_neighbors: int,
    squared: bool,
    mask: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Krum scores of the valid rows, as if the invalid rows did not exist, and the ranking.

    The neighbour count is `num_neighbors` when > 0 (capped at the n_valid − 1 available),
    else n_valid − f − 2: Krum on the n_valid valid rows with the same f. Invalid rows
    score +inf.

    Ties in the score (inevitable with one neighbour: the two rows of the closest pair
    score the same) are broken by the sum of distances to all valid rows, then by row
    index, so the choice does not depend on the client order except in exact double ties.

    Returns:
      (scores (n,), order (n,) int: row indices from best to worst).
    """
    x = jnp.where(mask[None, :], deltas, 0.0)
    d = pairwise_sq_dists(x)
    if not squared:
        d = jnp.sqrt(d)
    if num_neighbors > 0:
        k = jnp.asarray(num_neighbors, jnp.int32)
    else:
        k = jnp.sum(valid).astype(jnp.int32) - f - 2
    scores = krum_scores(d, k, valid)
    total = jnp.where(valid, jnp.sum(jnp.where(valid[None, :], d, 0.0), axis=1), jnp.inf)
    # lexsort: the last key is the primary one; it is stable, so row index breaks the rest.
    return scores, jnp.lexsort((total, scores))


def krum_neighbors(n: int, f: int, num_neighbors: int, rule: str) -> int:
    """The neighbour count with all n rows valid: `num_neighbors` if > 0, else n − f − 2.

    Raises:
      ValueError: when the count is outside 1..n−1.
    """
    k = int(num_neighbors) if num_neighbors > 0 else n - f - 2
    if not 1 <= k <= n - 1:
        raise ValueError(
            f"{rule}: neighbour count {k} (num_neighbors={num_neighbors}, n={n}, f={f}) is "
            f"out of range; accepted: 1 <= num_neighbors <= n-1, or num_neighbors <= 0 with "
            f"n - f - 2 >= 1"
        )
    return k


def krum(
    env: AggregatorEnv,
    *,
    num_malicious: int = -1,
    num_neighbors: int = -1,
    squared: bool = True,
    server_momentum: float = 0.0,
) -> Aggregator:
    """Krum: apply the update of the client with the smallest Krum score.

    Args:
      env: run facts; uses n_clients, num_malicious, param_mask.
      num_malicious: f; -1 takes `env.num_malicious`.
      num_neighbors: neighbours summed in the score; <= 0 means n − f − 2 (the paper),
        n − 1 is the reference's "all others".
      squared: sum squared distances (the paper) or plain distances (the reference).
      server_momentum: μ of `server_momentum_step` (0 = none, the paper; 0.9 = reference).

    Returns:
      Aggregator with state () when server_momentum == 0, else the momentum vector (d,).
      `client_weights` is one-hot on the selected client.
    """
    n = env.n_clients
    f = resolve_num_malicious(env.num_malicious, num_malicious, n)
    krum_neighbors(n, f, num_neighbors, "krum")
    if not 0.0 <= server_momentum < 1.0:
        raise ValueError(f"krum: server_momentum={server_momentum}; accepted: 0 <= value < 1")
    mask = jnp.asarray(np.asarray(env.param_mask, dtype=bool))

    def init(global_flat):
        return jnp.zeros_like(global_flat) if server_momentum > 0 else ()

    def aggregate(client_flat, state, ctx):
        deltas = client_flat - ctx.global_flat[None, :]
        _, order = krum_order(deltas, ctx.valid, f, num_neighbors, squared, mask)
        best = order[0]
        # All rows invalid: nothing to select, keep the global model.
        any_valid = jnp.any(ctx.valid)
        weights = jnp.where(
            any_valid, jax.nn.one_hot(best, deltas.shape[0], dtype=jnp.float32), 0.0
        )
        update = jnp.where(any_valid, deltas[best], 0.0)
        if server_momentum > 0:
            state, update = server_momentum_step(state, update, server_momentum, mask)
        return ctx.global_flat + update, state, AggInfo(client_weights=weights)

    return Aggregator(init, aggregate)


register(
    AggregatorSpec(
        "krum",
        krum,
        "Krum (Blanchard et al. 2017): the update with the least sum of squared distances to "
        "its n-f-2 nearest neighbours; f = env.num_malicious unless num_malicious >= 0",
        needs_num_malicious=True,
    )
)
