"""BackdoorIndicator (Li, Dai et al., "BackdoorIndicator: Leveraging OOD Data for Proactive
Backdoor Detection in Federated Learning", USENIX Security 2024).

The server plants an *indicator task* in the global model before sending it: out-of-
distribution (OOD) samples x^o_1 … x^o_M with labels ℓ_j assigned uniformly over the C
classes (balanced: ℓ_j = π(j) mod C), trained in with a proximal term,

    g_sent = argmin_w  CE(f_w(x^o), ℓ) + (μ/2)‖w − ḡ‖²       (`plant_steps` gradient steps
                                                              of size `plant_lr` from ḡ)

Backdoor training (whose poisoned samples are themselves OOD for the benign task, mapped
to one target class) preserves the indicator of the target class, while benign training
erodes it. For each returned model w_i the server finds the class the model predicts most
often on the indicator samples, c_i = argmax_c #{j : f_{w_i}(x^o_j) = c}, and its
indicator accuracy on that class,

    IA_i = #{j : ℓ_j = c_i, f_{w_i}(x^o_j) = c_i} / #{j : ℓ_j = c_i},

and flags w_i as a backdoor carrier when IA_i ≥ `threshold`. The new global model is the
mean of the unflagged clients' models, with the indicator planted again (every round, as
the authors' default interval of 1).

OOD data (`ood`): as in the paper, the indicator samples are images of *another dataset*
(the paper uses e.g. CIFAR-100 for CIFAR-10). The project ships three datasets, loaded
locally with `spmc_jax.data.sources.load_dataset(..., fetch=False)`:

    ood = "auto":  FashionMNIST for an MNIST run, MNIST for a FashionMNIST run, and
                   FashionMNIST for a CIFAR-10 run (grey clothing items, resized to 32 x 32
                   and replicated to 3 channels: no CIFAR-like natural colour image ships,
                   and MNIST digits are already `edge_case`'s backdoor data for CIFAR-10)
    ood = "mnist" | "fashion_mnist" | "cifar10": that dataset (even the run's own one,
                   which is then not OOD: for experiments only)
    ood = "scramble":  the first M server proxy images with their pixels (all coordinates,
                   channels included) scrambled by one fixed random permutation (seed
                   `ood_seed`): no second dataset needed; the spatial structure of every
                   class is gone but the pixel statistics stay. "auto" also means this when
                   the env carries no dataset (unit-test envs whose proxy is not images).

The M samples are drawn without replacement (seed `ood_seed`) from the OOD dataset's
train split and go through the run's test transform (resize to 32 x 32, 3 channels, the
run's normalisation), so they are inputs the model accepts. Note: for MNIST runs the
`edge_case` attack's backdoor images are FashionMNIST sneakers, i.e. drawn from the same
OOD dataset as the indicator (the project has no fourth dataset). Planting uses plain
gradient descent on the whole indicator set through `ProxyOps.logits` (eval mode:
BatchNorm statistics are not changed, as the authors restore the pre-planting
statistics).

Details: detection starts once a planted model has been sent (round ≥ 1; round 0's clients
trained from the unplanted initial model). If every valid client is flagged, all valid
clients are averaged (a round never stalls). The model that is evaluated is the planted
one. Non-finite rows (`ctx.valid` False) get weight 0. Needs `env.proxy` (its logits;
its images too for "scramble").

client_weights: 1/|K| on the kept clients K.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from spmc_jax.aggregators import register
from spmc_jax.aggregators.base import (
    AggInfo,
    Aggregator,
    AggregatorEnv,
    AggregatorSpec,
    ProxyOps,
    weighted_mean,
)
from spmc_jax.data.pipeline import make_test_transform
from spmc_jax.data.sources import load_second_dataset

OOD_SOURCES = ("auto", "mnist", "fashion_mnist", "cifar10", "scramble")


class IndicatorState(NamedTuple):
    """planted: the global model at the start of the round carries the indicator."""

    planted: jax.Array


def resolve_ood(ood: str, dataset: str) -> str:
    """The OOD source for a run on `dataset` ("" = unknown; see the module docstring)."""
    if ood not in OOD_SOURCES:
        raise ValueError(f"indicator: ood={ood!r}; accepted: {', '.join(OOD_SOURCES)}")
    if ood != "auto":
        return ood
    return {"mnist": "fashion_mnist", "fashion_mnist": "mnist", "cifar10": "fashion_mnist"}.get(
        dataset, "scramble"
    )


def balanced_labels(m: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """ℓ_j = π(j) mod C for a random permutation π of 0..m−1 (every class m/C times ± 1)."""
    return rng.permutation(m) % num_classes


def indicator_set(
    x: jax.Array, n_samples: int, num_classes: int, seed: int
) -> tuple[jax.Array, jax.Array]:
    """The "scramble" indicator samples (first M inputs, pixels scrambled by one fixed
    permutation) and their balanced labels."""
    x = x[:n_samples]
    m = x.shape[0]
    rng = np.random.default_rng(seed)
    flat = x.reshape(m, -1)
    perm = rng.permutation(flat.shape[1])
    labels = balanced_labels(m, num_classes, rng)
    return flat[:, perm].reshape(x.shape), jnp.asarray(labels, jnp.int32)


@functools.lru_cache(maxsize=4)
def ood_images(
    source: str, data_dir: str | None, n_samples: int, seed: int
) -> tuple[np.ndarray, np.ndarray, str]:
    """(uint8 images, their train-split indices, kind): M images of `source`'s train split
    drawn without replacement with seed `seed` (cached: validation and the run build the
    rule once each).

    Raises:
      ValueError: the source is not available locally or has fewer than M images.
    """
    ds = load_second_dataset(
        source, data_dir, needed_by="indicator needs its OOD dataset", option="--defense-opt ood"
    )
    if n_samples > len(ds.x_train):
        raise ValueError(
            f"indicator: n_samples={n_samples} > the {len(ds.x_train)} {source} train images"
        )
    idx = np.sort(np.random.default_rng(seed).choice(len(ds.x_train), n_samples, replace=False))
    return ds.x_train[idx], idx, ds.kind


def ood_model_inputs(env: AggregatorEnv, source: str, n_samples: int, seed: int) -> jax.Array:
    """The M OOD images of dataset `source` as model inputs (M, 32, 32, 3) float32 through
    the run's test transform (resize, 3 channels, the run's normalisation)."""
    if not env.mean or not env.std:
        raise ValueError(
            f"indicator: ood={source!r} needs the run's normalisation (AggregatorEnv.mean/std)"
        )
    raw, _, kind = ood_images(source, env.data_dir, n_samples, seed)
    return make_test_transform(kind, env.mean, env.std)(jnp.asarray(raw))


def indicator_accuracy(logits: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
    """IA of one model from its indicator logits (M, C): accuracy on the samples labelled
    with the class it predicts most often."""
    pred = jnp.argmax(logits, axis=1)
    top = jnp.argmax(jnp.bincount(pred, length=num_classes))
    has = labels == top
    hit = has & (pred == top)
    return jnp.sum(hit) / jnp.maximum(jnp.sum(has), 1)


def plant(
    proxy: ProxyOps,
    start: jax.Array,
    x: jax.Array,
    labels: jax.Array,
    steps: int,
    lr: float,
    mu: float,
) -> jax.Array:
    """`steps` full-batch gradient steps on CE(indicator) + (μ/2)‖w − start‖² from `start`."""

    def loss(w):
        logp = jax.nn.log_softmax(proxy.logits(w, x))
        ce = -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))
        return ce + 0.5 * mu * jnp.sum((w - start) ** 2)

    grad = jax.grad(loss)
    return jax.lax.fori_loop(0, steps, lambda _, w: w - lr * grad(w), start)


def indicator(
    env: AggregatorEnv,
    *,
    n_samples: int = 64,
    threshold: float = 0.95,
    plant_steps: int = 100,
    plant_lr: float = 0.05,
    mu: float = 0.1,
    ood: str = "auto",
    ood_seed: int = 0,
) -> Aggregator:
    """Build BackdoorIndicator (see the module docstring).

    Args:
      env: run facts; uses proxy (required) and param_mask (planting changes only
        parameters: BatchNorm statistics get no gradient in eval mode).
      n_samples: M, indicator samples (>= 2; with "scramble" fewer if the proxy set is
        smaller).
      threshold: IA at or above which a client is flagged, in (0, 1].
      plant_steps, plant_lr, mu: the planting optimisation (steps >= 1, lr > 0, μ >= 0).
      ood: the OOD source, one of OOD_SOURCES (see the module docstring).
      ood_seed: seed of the OOD sample draw (or pixel scramble) and the label assignment.
    """
    if env.proxy is None:
        raise ValueError(
            "indicator needs server proxy data (env.proxy is None) to plant and read the "
            "indicator task; run with a proxy split or choose a defense that does not need one"
        )
    if n_samples < 2:
        raise ValueError(f"indicator: n_samples={n_samples}; accepted: integer >= 2")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"indicator: threshold={threshold}; accepted: 0 < value <= 1")
    if plant_steps < 1 or plant_lr <= 0 or mu < 0:
        raise ValueError(
            f"indicator: plant_steps={plant_steps}, plant_lr={plant_lr}, mu={mu}; accepted: "
            "plant_steps >= 1, plant_lr > 0, mu >= 0"
        )
    source = resolve_ood(ood, env.dataset)  # a bad name fails here, before any loading
    proxy = env.proxy
    mask = jnp.asarray(np.asarray(env.param_mask, bool))
    # Another dataset's images: loaded and transformed once, here (a constant of the round).
    x_ood = None if source == "scramble" else ood_model_inputs(env, source, n_samples, ood_seed)

    def init(global_flat):
        return IndicatorState(planted=jnp.asarray(False))

    def aggregate(client_flat, state, ctx):
        if x_ood is None:
            x, _ = proxy.inputs()
            probe = x[:1]
        else:
            probe = x_ood[:1]
        num_classes = jax.eval_shape(proxy.logits, ctx.global_flat, probe).shape[-1]
        if x_ood is None:
            x_o, lab = indicator_set(x, n_samples, num_classes, ood_seed)
        else:
            x_o = x_ood
            labels = balanced_labels(n_samples, num_classes, np.random.default_rng(ood_seed))
            lab = jnp.asarray(labels, jnp.int32)
        logits = jax.lax.map(lambda w: proxy.logits(w, x_o), client_flat)
        ia = jax.vmap(lambda lg: indicator_accuracy(lg, lab, num_classes))(logits)
        flagged = state.planted & (ia >= threshold)
        keep = ctx.valid & ~flagged
        keep = jnp.where(jnp.any(keep), keep, ctx.valid)
        w = keep.astype(jnp.float32) / jnp.maximum(jnp.sum(keep), 1)
        avg = ctx.global_flat + weighted_mean(client_flat - ctx.global_flat[None, :], w)
        planted = plant(proxy, avg, x_o, lab, plant_steps, plant_lr, mu)
        new_global = jnp.where(mask, planted, avg)
        return new_global, IndicatorState(planted=jnp.asarray(True)), AggInfo(client_weights=w)

    return Aggregator(init, aggregate)


register(
    AggregatorSpec(
        "indicator",
        indicator,
        "BackdoorIndicator (Li et al., USENIX Sec'24): plant an OOD indicator task (another "
        "dataset's images, ood=auto: FashionMNIST, MNIST for FashionMNIST runs; balanced "
        "labels) in the global model; flag clients whose indicator accuracy on their top "
        "class is >= 0.95; needs proxy data",
        needs_proxy=True,
    )
)
