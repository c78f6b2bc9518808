"""DeepSight (Rieger, Nguyen, Miettinen & Sadeghi, "DeepSight: Mitigating Backdoor Attacks
in Federated Learning Through Deep Model Inspection", NDSS 2022, Algorithm 1).

For client models w_i with updates Δ_i = w_i − g, output layer (kernel ΔW_i, in × C, and
bias Δb_i, C; located through `env.layout` / `env.output_layer`):

1. NEUPs: ε_ij = Σ_k |ΔW_i[k, j]| + |Δb_i[j]| (update energy of output neuron j),
   c_ij = ε_ij² / Σ_j ε_ij².
2. Threshold exceedings: TE_i = #{j : c_ij > max(0.01, 1/C) · max_j c_ij}; a model is
   labelled suspicious when TE_i ≤ median(TE) / 2 (backdoor training concentrates the
   update energy on few output neurons).
3. DDifs: for S seeds, N random inputs x (standard normal in the model's normalised
   input space, drawn from ctx.key): DDif_i,s = (1/N) Σ_x softmax(w_i(x)) / softmax(g(x)),
   a (C,) vector (`env.proxy.logits`).
4. Clustering: HDBSCAN (in JAX, min_cluster_size `min_cluster_size`, min_samples 1,
   single cluster allowed) separately on the cosine distances of the bias updates Δb_i,
   on the Euclidean distances of the NEUPs and of each seed's DDifs; the ensemble
   distance D_ij = 1 − (fraction of these clusterings that put i and j in the same
   cluster) is clustered once more by HDBSCAN.
5. Acceptance: a cluster is accepted when fewer than τ (1/3) of its members are
   suspicious; an unclustered (noise) model is accepted when it is not suspicious.
6. Clipping: accepted updates are clipped to the median update norm S (all valid
   clients), γ_i = min(1, S/‖Δ_i‖), and averaged: g' = g + (1/L) Σ_accepted γ_i Δ_i.

Choices where the paper leaves freedom: N = `n_samples` random inputs per seed (the
paper uses 20 000; the default keeps the CPU round cheap), S = 3 seeds,
min_cluster_size = 2. If no model is accepted the global model is kept.

Needs the server's proxy operations (for the model's logits and input shape) and the
output layer in `env.layout`. Invalid (non-finite) rows take no part and get weight 0.
client_weights = γ_i / L on the accepted clients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from spmc_jax.aggregators import register
from spmc_jax.aggregators._cluster import cosine_distances, hdbscan_precomputed
from spmc_jax.aggregators.base import AggInfo, Aggregator, AggregatorEnv, AggregatorSpec


def output_slices(env: AggregatorEnv) -> tuple[slice, tuple[int, int], slice]:
    """(kernel slice, kernel shape (in, C), bias slice) of the output layer in the flat vector.

    Raises:
      ValueError: when `env.layout` has no kernel and bias under `env.output_layer`.
    """
    tag = f"['params']['{env.output_layer}']"
    kernel = [e for e in env.layout if tag in e.name and e.name.endswith("['kernel']")]
    bias = [e for e in env.layout if tag in e.name and e.name.endswith("['bias']")]
    if not env.output_layer or len(kernel) != 1 or len(bias) != 1:
        raise ValueError(
            f"deepsight needs the output layer's kernel and bias in env.layout; "
            f"output_layer={env.output_layer!r}, layout names: {[e.name for e in env.layout]}"
        )
    k, b = kernel[0], bias[0]
    shape = (int(np.prod(k.shape[:-1])), int(k.shape[-1]))
    return slice(k.start, k.stop), shape, slice(b.start, b.stop)


def neups_and_te(dw: jax.Array, db: jax.Array) -> tuple[jax.Array, jax.Array]:
    """NEUPs (n, C) and threshold exceedings (n,) from output-layer updates (n, in, C), (n, C)."""
    energy = jnp.sum(jnp.abs(dw), axis=1) + jnp.abs(db)
    sq = energy**2
    neups = sq / jnp.maximum(jnp.sum(sq, axis=1, keepdims=True), 1e-30)
    n_classes = neups.shape[1]
    xi = max(0.01, 1.0 / n_classes) * jnp.max(neups, axis=1, keepdims=True)
    return neups, jnp.sum(neups > xi, axis=1)


def _euclidean(x: jax.Array) -> jax.Array:
    d = jnp.sqrt(jnp.maximum(jnp.sum((x[:, None, :] - x[None, :, :]) ** 2, axis=-1), 0.0))
    return jnp.where(jnp.eye(x.shape[0], dtype=bool), 0.0, d)


def ensemble_distance(labelings: jax.Array) -> jax.Array:
    """D_ij = 1 − mean over clusterings of [l(i) == l(j) != −1]; (M, n) labels -> (n, n)."""
    same = (labelings[:, :, None] == labelings[:, None, :]) & (labelings[:, :, None] >= 0)
    d = 1.0 - jnp.mean(same.astype(jnp.float32), axis=0)
    return jnp.where(jnp.eye(labelings.shape[1], dtype=bool), 0.0, d)


def deepsight_accept(
    labels: jax.Array, suspicious: jax.Array, valid: jax.Array, tau: float
) -> jax.Array:
    """Accepted (n,) bool: members of clusters with < τ suspicious, or non-suspicious noise."""
    same = (labels[:, None] == labels[None, :]) & valid[None, :] & valid[:, None]
    size = jnp.sum(same, axis=1)
    frac = jnp.sum(same & suspicious[None, :], axis=1) / jnp.maximum(size, 1)
    return valid & jnp.where(labels >= 0, frac < tau, ~suspicious)


def deepsight(
    env: AggregatorEnv,
    *,
    tau: float = 1.0 / 3.0,
    n_samples: int = 128,
    n_seeds: int = 3,
    min_cluster_size: int = 2,
) -> Aggregator:
    """Build DeepSight (see the module docstring).

    Args:
      env: run facts; uses param_mask, layout, output_layer and proxy (logits, inputs).
      tau: the largest suspicious fraction of an accepted cluster (exclusive).
      n_samples: random inputs per seed for the DDifs.
      n_seeds: DDif seeds (one clustering each).
      min_cluster_size: HDBSCAN's smallest cluster (>= 2).
    """
    if env.proxy is None:
        raise ValueError("deepsight needs the server's proxy data (model logits); none given")
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"deepsight: tau={tau}; accepted: 0 < tau <= 1")
    if n_samples < 1 or n_seeds < 1:
        raise ValueError(f"deepsight: n_samples={n_samples}, n_seeds={n_seeds}; accepted: >= 1")
    if min_cluster_size < 2:
        raise ValueError(f"deepsight: min_cluster_size={min_cluster_size}; accepted: >= 2")
    if env.n_clients < 2:
        raise ValueError(f"deepsight needs n_clients >= 2, got {env.n_clients}")
    ks, kshape, bs = output_slices(env)
    proxy = env.proxy
    mask = jnp.asarray(np.asarray(env.param_mask, bool))

    def init(global_flat):
        return ()

    def ddifs(client_flat, global_flat, key):
        x_shape = proxy.inputs()[0].shape[1:]
        xs = jax.random.normal(key, (n_seeds, n_samples, *x_shape))
        p_g = jax.vmap(lambda x: jax.nn.softmax(proxy.logits(global_flat, x)))(xs)

        def one(flat):
            p = jax.vmap(lambda x: jax.nn.softmax(proxy.logits(flat, x)))(xs)
            return jnp.mean(p / jnp.maximum(p_g, 1e-30), axis=1)  # (S, C)

        return jax.lax.map(one, client_flat)  # (n, S, C)

    def aggregate(client_flat, state, ctx):
        valid = ctx.valid
        n = client_flat.shape[0]
        deltas = client_flat - ctx.global_flat[None, :]
        dw = deltas[:, ks].reshape(n, *kshape)
        db = deltas[:, bs]
        neups, te = neups_and_te(dw, db)
        med_te = jnp.nanmedian(jnp.where(valid, te.astype(jnp.float32), jnp.nan))
        suspicious = te <= med_te / 2.0
        dd = ddifs(client_flat, ctx.global_flat, ctx.key)
        mcs = jnp.asarray(min_cluster_size)

        def cluster(dist):
            return hdbscan_precomputed(dist, mcs, 1, valid, allow_single_cluster=True)

        dists = [cosine_distances(db), _euclidean(neups)]
        dists += [_euclidean(dd[:, s]) for s in range(n_seeds)]
        labelings = jax.vmap(cluster)(jnp.stack(dists))  # one HDBSCAN compilation
        labels = cluster(ensemble_distance(labelings))
        accepted = deepsight_accept(labels, suspicious, valid, tau)

        norms = jnp.linalg.norm(jnp.where(mask[None, :], deltas, 0.0), axis=1)
        s = jnp.nanmedian(jnp.where(valid, norms, jnp.nan))
        gamma = jnp.minimum(1.0, s / jnp.maximum(norms, 1e-12))
        w = jnp.where(accepted, gamma, 0.0) / jnp.maximum(jnp.sum(accepted), 1)
        new_global = ctx.global_flat + jnp.matmul(w, deltas, precision=jax.lax.Precision.HIGHEST)
        return new_global, state, AggInfo(client_weights=w.astype(jnp.float32))

    return Aggregator(init, aggregate)


register(
    AggregatorSpec(
        "deepsight",
        deepsight,
        "DeepSight (NDSS'22): NEUP threshold exceedings label suspicious models; HDBSCAN "
        "ensemble of bias-cosine, NEUP and DDif clusterings; drop clusters >= tau suspicious; "
        "clip to the median norm",
        needs_proxy=True,
    )
)
