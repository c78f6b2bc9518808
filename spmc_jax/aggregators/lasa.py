"""LASA (Xu, Zhang, Li & Zhang, "Achieving Byzantine-Resilient Federated Learning via
Layer-Adaptive Sparsified Model Aggregation", WACV 2025, arXiv:2409.01435, Algorithm 1).

With updates Δ_i = w_i − g on the trainable parameters and the valid clients V:

    1. clipping       Δ_i ← Δ_i · min(1, M / ‖Δ_i‖),   M = median_{i∈V} ‖Δ_i‖
    2. sparsification Δ̃_i = Δ_i ⊙ TopK(|Δ_i|): per client, keep the k = ⌊(1 − s)·d_w⌋
                      largest-magnitude coordinates of the weight tensors (those with ≥ 2
                      dimensions; biases are kept whole), s = `sparsity` = 0.3
    3. per layer l (each parameter tensor of `env.layout`):
         norm filter  B_n^l = {i : MZ(‖Δ̃_i^l‖) < λ_n}
         sign filter  B_s^l = {i : MZ(ρ_i^l) < λ_s},
                      ρ_i^l = ½ (1 + Σ_k sgn(Δ̃_ik^l) / Σ_k |sgn(Δ̃_ik^l)|)
                      (sign purity; ½ for an all-zero layer)
         where MZ(x_i) = |x_i − median_V(x)| / std_V(x)  (median z-score; 0 when std = 0)
         B^l = B_n^l ∩ B_s^l (all of V if empty),   g'^l = g^l + (1/|B^l|) Σ_{i∈B^l} Δ̃_i^l
    λ_n = `norm_bound` = 2.0, λ_s = `sign_bound` = 1.0 (the defaults of FLPoison's LASA).

The median z-score is invariant to an affine map of x, so the authors' extra factor in
their code's sign purity does not change B_s^l.

Details: BatchNorm statistics (param_mask False) are neither clipped nor sparsified nor
filtered; they take the mean over V. With an empty `env.layout` (a rule built without a
model, e.g. in library use) all parameter coordinates form one layer and all are eligible
for sparsification. Non-finite rows (`ctx.valid` False) are outside V everywhere.

client_weights: each client's coordinate-weighted share, Σ_l (d_l / d) · 1[i ∈ B^l] / |B^l|.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from spmc_jax.aggregators import register
from spmc_jax.aggregators._robust import coordinate_median
from spmc_jax.aggregators.base import AggInfo, Aggregator, AggregatorEnv, AggregatorSpec


def median_z(x: jax.Array, valid: jax.Array) -> jax.Array:
    """|x − median| / std over the valid entries (population std; 0 where std = 0)."""
    med = coordinate_median(x[:, None], valid)[0]
    m = jnp.maximum(jnp.sum(valid), 1)
    mean = jnp.sum(jnp.where(valid, x, 0.0)) / m
    std = jnp.sqrt(jnp.sum(jnp.where(valid, (x - mean) ** 2, 0.0)) / m)
    return jnp.where(std > 0, jnp.abs(x - med) / jnp.where(std > 0, std, 1.0), 0.0)


def top_k_mask(x: jax.Array, k: int) -> jax.Array:
    """Per row, True on the k largest |x| (ties at the k-th value all kept)."""
    if k >= x.shape[1]:
        return jnp.ones(x.shape, bool)
    a = jnp.abs(x)
    thr = jax.lax.top_k(a, k)[0][:, -1]
    return a >= thr[:, None]


def lasa(
    env: AggregatorEnv,
    *,
    sparsity: float = 0.3,
    norm_bound: float = 2.0,
    sign_bound: float = 1.0,
) -> Aggregator:
    """Build LASA (see the module docstring).

    Args:
      env: run facts; uses param_mask and layout.
      sparsity: fraction s of the weight-tensor coordinates zeroed per client, 0 <= s < 1.
      norm_bound: λ_n, median z-score bound of the layer norms, > 0.
      sign_bound: λ_s, median z-score bound of the layer sign purities, > 0.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"lasa: sparsity={sparsity}; accepted: 0 <= value < 1")
    for name, v in (("norm_bound", norm_bound), ("sign_bound", sign_bound)):
        if v <= 0:
            raise ValueError(f"lasa: {name}={v}; accepted: > 0")
    pmask = np.asarray(env.param_mask, bool)
    if env.layout:
        layers = [(e.start, e.stop) for e in env.layout if e.is_param]
        weight = np.zeros(pmask.shape[0], bool)
        for e in env.layout:
            if e.is_param and len(e.shape) >= 2:
                weight[e.start : e.stop] = True
    else:
        idx = np.flatnonzero(pmask)
        layers = [(int(idx[0]), int(idx[-1]) + 1)] if idx.size else []
        weight = pmask.copy()
    layer_of = np.full(pmask.shape[0], -1)
    for li, (a, b) in enumerate(layers):
        layer_of[a:b] = li
    if np.any(layer_of[pmask] < 0) or np.any(layer_of[~pmask] >= 0):
        raise ValueError("lasa: env.layout does not cover exactly the parameter coordinates")
    w_idx = jnp.asarray(np.flatnonzero(weight), jnp.int32)
    k = int((1.0 - sparsity) * w_idx.shape[0])
    d_params = max(int(pmask.sum()), 1)
    mask = jnp.asarray(pmask)

    def init(global_flat):
        return ()

    def aggregate(client_flat, state, ctx):
        valid = ctx.valid
        deltas = client_flat - ctx.global_flat[None, :]
        dp = jnp.where(mask[None, :], deltas, 0.0)
        norms = jnp.linalg.norm(dp, axis=1)
        med = coordinate_median(norms[:, None], valid)[0]
        dp = dp * jnp.minimum(1.0, med / jnp.where(norms > 0, norms, 1.0))[:, None]
        if k < w_idx.shape[0]:
            sub = dp[:, w_idx]
            dp = dp.at[:, w_idx].set(jnp.where(top_k_mask(sub, k), sub, 0.0))
        n_valid = jnp.maximum(jnp.sum(valid), 1)
        stats = jnp.sum(jnp.where(valid[:, None], deltas, 0.0), axis=0) / n_valid
        update = jnp.where(mask, 0.0, stats)
        share = jnp.zeros(client_flat.shape[0], jnp.float32)
        for a, b in layers:
            x = dp[:, a:b]
            sg = jnp.sign(x)
            nz = jnp.sum(jnp.abs(sg), axis=1)
            purity = 0.5 * (1.0 + jnp.sum(sg, axis=1) / jnp.where(nz > 0, nz, 1.0))
            keep = (
                valid
                & (median_z(jnp.linalg.norm(x, axis=1), valid) < norm_bound)
                & (median_z(purity, valid) < sign_bound)
            )
            keep = jnp.where(jnp.any(keep), keep, valid)
            wl = keep.astype(jnp.float32) / jnp.maximum(jnp.sum(keep), 1)
            layer_update = jnp.matmul(wl, x, precision=jax.lax.Precision.HIGHEST)
            update = update.at[a:b].set(layer_update)
            share = share + wl * ((b - a) / d_params)
        return ctx.global_flat + update, state, AggInfo(client_weights=share)

    return Aggregator(init, aggregate)


register(
    AggregatorSpec(
        "lasa",
        lasa,
        "LASA (Xu et al., WACV'25): clip to the median norm, top-k sparsify (sparsity=0.3), "
        "per-layer median-z-score filters on norm and sign purity, mean of the kept per layer",
    )
)
