"""FLDetector (Zhang, Cao, Jia & Gong, "FLDetector: Defending Federated Learning Against
Model Poisoning Attacks via Detecting Malicious Clients", KDD 2022, Algorithms 1–2).

The server checks each client's *model-updates consistency*: a benign client's update at
round t should be close to the one predicted from its previous update with the Cauchy mean
value theorem, Δ_i^t ≈ Δ_i^{t−1} + Ĥ^t (w^t − w^{t−1}), with Ĥ^t an L-BFGS approximation
of the Hessian built from the last N global model differences Δw^k = w^k − w^{k−1} and
global update differences Δḡ^k = ḡ^k − ḡ^{k−1} (ḡ^k = the update this rule applied at
round k, computed at w^k). With S = [Δw^{t−N} … Δw^{t−1}], Y likewise (Byrd, Nocedal &
Schnabel 1994, compact form; the paper's Algorithm 1):

    A = SᵀY,  L = strict lower triangle of A,  D = diag(A),  σ = Δḡ^{t−1}ᵀΔw^{t−1} / ‖Δw^{t−1}‖²
    Ĥ^t v = σ v − [σS  Y] [[σSᵀS, L], [Lᵀ, −D]]⁻¹ [σSᵀv; Yᵀv],    v = w^t − w^{t−1}
    d_i^t = ‖Δ_i^{t−1} + Ĥ^t v − Δ_i^t‖,   d̂^t = d^t / ‖d^t‖_1
    s_i^t = mean of d̂_i over the last N rounds                    (suspicion score)

If the gap statistic on the suspicion scores says there is more than one cluster, 2-means
splits them and the cluster with the larger mean is flagged malicious (Algorithm 2). Until
then the global update is the mean of the valid participants' updates (the paper's FedAvg
base rule). Updates here are Δ_i = w_i − w (−lr times the paper's gradients: the
consistency relation and the L-BFGS pairs are linear, so only the scale of d changes, and
d̂ is normalised).

Detection, removal and restart (as in the paper: "the server removes the detected clients
and restarts training from scratch without them"). Inside a fixed-round jitted simulation
this is, once, at the first round r whose detection flags anyone:

    * the flagged clients join the removed set R (registered ids) for the rest of the run;
    * the round returns the round-0 model g_0 (the one `init` received) instead of an
      aggregate (client_weights all 0: no update was applied), and the L-BFGS history,
      the previous model/update, the per-client last updates and the suspicion window
      are zeroed, as for a fresh run;
    * every later round is FedAvg over the valid participants not in R (weight 0 for R),
      with no further detection: exactly one restart.

The round counter keeps running (the restarted training gets the rounds left), and state
outside this rule (client hooks, SPMC teachers, the attack window) is not reset. If every
valid participant of a later round is removed, the round keeps the global model. The
gap statistic and 2-means are exact 1-D computations (`_kmeans1d.py`, tested against
scikit-learn's KMeans). Under partial participation a client's previous update is its last
submitted one and its suspicion is the mean over the rounds of the window in which it had
a prediction; only that round's participants can be flagged.

State (per registered client, rows indexed by ctx.client_ids): the last update (N_reg, d),
whether it exists, and the window of normalised distances (N, N_reg) with its mask; plus
the L-BFGS pairs (N, d) each, the previous global model and update, g_0, the removed set
and the restart round (−1: none yet). Detection starts at round `start_round` and needs
≥ 1 L-BFGS pair (from round 2 on) and ≥ 3 scored clients.

client_weights: 1/|K| on the kept clients K (valid, not removed); all 0 on the restart
round.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from spmc_jax.aggregators import register
from spmc_jax.aggregators._kmeans1d import gap_says_clustered, two_means
from spmc_jax.aggregators.base import (
    AggInfo,
    Aggregator,
    AggregatorEnv,
    AggregatorSpec,
    weighted_mean,
)


class FLDetectorState(NamedTuple):
    """See the module docstring; `s`, `y`: L-BFGS pairs oldest → newest, `n_pairs` filled
    (the newest at the end); `scores`, `scored`: (N, N_reg) distance window; `init_global`:
    g_0; `removed`: (N_reg,) bool; `restart_round`: int32, −1 until the restart."""

    last_update: jax.Array
    has_last: jax.Array
    scores: jax.Array
    scored: jax.Array
    s: jax.Array
    y: jax.Array
    n_pairs: jax.Array
    prev_global: jax.Array
    prev_agg: jax.Array
    rounds_seen: jax.Array
    init_global: jax.Array
    removed: jax.Array
    restart_round: jax.Array


def lbfgs_hvp(s: jax.Array, y: jax.Array, n_pairs: jax.Array, v: jax.Array) -> jax.Array:
    """Compact L-BFGS product Ĥ v from the pairs s, y (N, d) (the last `n_pairs` filled).

    Unfilled pairs are neutralised (zero columns, identity rows of the middle matrix). A
    singular system or no pair gives 0.
    """
    win = s.shape[0]
    filled = jnp.arange(win) >= win - n_pairs
    s = jnp.where(filled[:, None], s, 0.0)
    y = jnp.where(filled[:, None], y, 0.0)
    hi = jax.lax.Precision.HIGHEST
    a = jnp.matmul(s, y.T, precision=hi)  # A_jk = s_jᵀ y_k
    ss = jnp.matmul(s, s.T, precision=hi)
    sl, yl = s[-1], y[-1]
    den = jnp.dot(sl, sl, precision=hi)
    sigma = jnp.where(den > 0, jnp.dot(yl, sl, precision=hi) / jnp.where(den > 0, den, 1.0), 0.0)
    low = jnp.tril(a, -1)
    both = filled[:, None] & filled[None, :]
    eye = jnp.eye(win, dtype=bool)
    top = jnp.concatenate([jnp.where(both, sigma * ss, eye), jnp.where(both, low, 0.0)], 1)
    bot = jnp.concatenate([jnp.where(both, low.T, 0.0), jnp.where(both, -a * eye, eye)], 1)
    mid = jnp.concatenate([top, bot], 0)
    rhs = jnp.concatenate([sigma * jnp.matmul(s, v, precision=hi), jnp.matmul(y, v, precision=hi)])
    p = jnp.linalg.solve(mid, rhs)
    hv = sigma * v - jnp.matmul(jnp.concatenate([sigma * s, y], 0).T, p, precision=hi)
    ok = (n_pairs > 0) & jnp.all(jnp.isfinite(hv))
    return jnp.where(ok, hv, 0.0)


def fldetector(
    env: AggregatorEnv, *, window: int = 10, start_round: int = 0, n_refs: int = 20
) -> Aggregator:
    """Build FLDetector (see the module docstring).

    Args:
      env: run facts; uses n_registered (per-client state).
      window: N, the L-BFGS history length and the suspicion window (rounds), >= 1.
      start_round: first round at which detection may flag clients, >= 0.
      n_refs: B, uniform reference sets of the gap statistic, >= 2.
    """
    if window < 1:
        raise ValueError(f"fldetector: window={window}; accepted: integer >= 1")
    if start_round < 0:
        raise ValueError(f"fldetector: start_round={start_round}; accepted: integer >= 0")
    if n_refs < 2:
        raise ValueError(f"fldetector: n_refs={n_refs}; accepted: integer >= 2")
    n_reg = env.n_registered
    win = int(window)

    def init(global_flat, removed=None, restart_round=-1):
        d, dt = global_flat.shape[0], global_flat.dtype  # float64 under x64
        z = jnp.zeros((win, d), dt)
        return FLDetectorState(
            last_update=jnp.zeros((n_reg, d), dt),
            has_last=jnp.zeros(n_reg, bool),
            scores=jnp.zeros((win, n_reg), dt),
            scored=jnp.zeros((win, n_reg), bool),
            s=z,
            y=z,
            n_pairs=jnp.int32(0),
            prev_global=jnp.zeros(d, dt),
            prev_agg=jnp.zeros(d, dt),
            rounds_seen=jnp.int32(0),
            init_global=global_flat,
            removed=jnp.zeros(n_reg, bool) if removed is None else removed,
            restart_round=jnp.asarray(restart_round, jnp.int32),
        )

    def aggregate(client_flat, st: FLDetectorState, ctx):
        g = ctx.global_flat
        ids, valid = ctx.client_ids, ctx.valid
        deltas = client_flat - g[None, :]
        hv = lbfgs_hvp(st.s, st.y, st.n_pairs, g - st.prev_global)
        predicted = st.last_update[ids] + hv[None, :]
        has_pred = valid & st.has_last[ids] & (st.n_pairs > 0)
        dist = jnp.where(has_pred, jnp.linalg.norm(predicted - deltas, axis=1), 0.0)
        dist = dist / jnp.maximum(jnp.sum(dist), 1e-30)
        any_pred = jnp.any(has_pred)
        row = jnp.zeros(n_reg, jnp.float32).at[ids].set(dist)
        row_ok = jnp.zeros(n_reg, bool).at[ids].set(has_pred)
        scores = jnp.where(any_pred, jnp.roll(st.scores, -1, 0).at[-1].set(row), st.scores)
        scored = jnp.where(any_pred, jnp.roll(st.scored, -1, 0).at[-1].set(row_ok), st.scored)
        cnt = jnp.sum(scored[:, ids], axis=0)
        susp = jnp.sum(jnp.where(scored[:, ids], scores[:, ids], 0.0), axis=0) / jnp.maximum(cnt, 1)
        cand = valid & (cnt > 0) & ~st.removed[ids]
        k_gap = jax.random.fold_in(ctx.key, 1)
        done = st.restart_round >= 0
        active = ~done & (st.rounds_seen >= start_round) & any_pred
        clustered = active & gap_says_clustered(susp, cand, k_gap, n_refs)
        _, _, upper = two_means(susp, cand)
        flagged = clustered & upper
        restart = jnp.any(flagged)
        keep = valid & ~st.removed[ids]
        w = keep.astype(jnp.float32) / jnp.maximum(jnp.sum(keep), 1)
        agg = weighted_mean(deltas, w)
        first = st.rounds_seen == 0
        new_s = jnp.roll(st.s, -1, 0).at[-1].set(g - st.prev_global)
        new_y = jnp.roll(st.y, -1, 0).at[-1].set(agg - st.prev_agg)
        going = FLDetectorState(
            last_update=st.last_update.at[ids].set(
                jnp.where(valid[:, None], deltas, st.last_update[ids])
            ),
            has_last=st.has_last.at[ids].set(st.has_last[ids] | valid),
            scores=scores,
            scored=scored,
            s=jnp.where(first, st.s, new_s),
            y=jnp.where(first, st.y, new_y),
            n_pairs=jnp.where(first, st.n_pairs, jnp.minimum(st.n_pairs + 1, win)),
            prev_global=g,
            prev_agg=agg,
            rounds_seen=st.rounds_seen + 1,
            init_global=st.init_global,
            removed=st.removed,
            restart_round=st.restart_round,
        )
        # The restart: remove the flagged clients, back to g_0 with a fresh history.
        fresh = init(
            st.init_global,
            removed=st.removed.at[ids].set(st.removed[ids] | flagged),
            restart_round=ctx.round,
        )
        state = jax.tree.map(lambda a, b: jnp.where(restart, a, b), fresh, going)
        new_global = jnp.where(restart, st.init_global, g + agg)
        return new_global, state, AggInfo(client_weights=jnp.where(restart, 0.0, w))

    return Aggregator(init, aggregate)


register(
    AggregatorSpec(
        "fldetector",
        fldetector,
        "FLDetector (Zhang et al., KDD'22): L-BFGS-predicted vs actual updates, suspicion "
        "over window=10 rounds, gap statistic + 2-means flag the high cluster; once flagged: "
        "removed for good and training restarts from the round-0 model (once)",
    )
)
