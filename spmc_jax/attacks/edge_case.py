"""`edge_case`: edge-case backdoor (Wang et al., "Attack of the Tails: Yes, You Really Can
Backdoor Federated Learning", NeurIPS 2020).

The attackers train on *edge-case* inputs, examples from the tail of the input
distribution that the benign clients essentially never hold, relabelled `target`; no
trigger is stamped on ordinary images. The backdoor succeeds when the global model labels
held-out edge-case inputs `target`: R = 100 - % of the held-out edge-case test images
predicted `target`.

Edge-case data, documented substitute: the paper's sets (ARDIS handwritten 7s for MNIST,
Southwest Airlines planes for CIFAR-10) need the internet. Here they are built from data
the project already ships, loaded with `spmc_jax.data.sources.load_dataset(...,
fetch=False)`: images of class `edge_class` (7) of another dataset, `source`:

    source = "auto":  FashionMNIST (class 7 = sneaker) for an MNIST run,
                      MNIST (class 7 = the digit seven, ARDIS's class) otherwise.

Training images are the first `n_train` (300) of that class in the source's train split;
the backdoor test set is its first `n_test` (1000) in the source's *test* split, disjoint
by construction. Both go through the run's test transform (resize to 32 x 32, 3 channels,
the run's normalisation), so they are inputs the victim model accepts.

Poisoning: a flagged sample (probability `poison_rate`, fixed per sample for the run) is
*replaced* by an edge-case training image drawn uniformly from the per-step key and
labelled `target` (Wang et al. mix edge-case points into the attacker's clean data; the
flagged fraction plays their mixing ratio). The replacement enters after augmentation,
so edge-case images are not augmented. The test set is a `BackdoorSet` (the engine
measures R on it; R_excl_target = R).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from spmc_jax.attacks import register
from spmc_jax.attacks.badnets import check_target_rate
from spmc_jax.attacks.base import AttackEnv, AttackSpec, BackdoorSet, DataAttack
from spmc_jax.data.pipeline import make_test_transform
from spmc_jax.data.sources import load_second_dataset

SOURCES = ("auto", "mnist", "fashion_mnist", "cifar10")


def resolve_source(source: str, dataset: str) -> str:
    """The edge-case source dataset for a run on `dataset` (see the module docstring)."""
    if source not in SOURCES:
        raise ValueError(f"edge_case source={source!r}; accepted: {', '.join(SOURCES)}")
    if source != "auto":
        return source
    return "fashion_mnist" if dataset == "mnist" else "mnist"


@functools.lru_cache(maxsize=4)
def edge_images(
    source: str, data_dir: str | None, edge_class: int, n_train: int, n_test: int
) -> tuple[np.ndarray, np.ndarray, str]:
    """(train uint8, test uint8, kind): the first n_train / n_test images of `edge_class`
    in the source's train / test split (cached: the factory runs once per build).

    Raises:
      ValueError: the source is not available locally, or has too few such images.
    """
    ds = load_second_dataset(
        source, data_dir, needed_by="edge_case needs its source dataset", option="edge_case.source"
    )
    if not 0 <= edge_class < ds.num_classes:
        raise ValueError(f"edge_case edge_class={edge_class} outside [0, {ds.num_classes})")
    tr = ds.x_train[ds.y_train == edge_class][:n_train]
    te = ds.x_test[ds.y_test == edge_class][:n_test]
    if len(tr) < n_train or len(te) < 1:
        raise ValueError(
            f"edge_case: {source} class {edge_class} has {len(tr)} train / {len(te)} test "
            f"images; asked n_train={n_train}"
        )
    return tr, te, ds.kind


def edge_case(
    env: AttackEnv,
    *,
    target: int = 2,
    poison_rate: float = 0.3,
    source: str = "auto",
    edge_class: int = 7,
    n_train: int = 300,
    n_test: int = 1000,
) -> DataAttack:
    """Edge-case backdoor: flagged samples become out-of-distribution images -> `target`.

    Args:
      env: attack environment (`dataset`, `data_dir`, normalisation).
      target: backdoor label of the edge-case images.
      poison_rate: per-sample replacement probability on malicious clients.
      source: "auto" (FashionMNIST for MNIST runs, else MNIST), "mnist", "fashion_mnist"
        or "cifar10".
      edge_class: the source class used as edge-case inputs (7).
      n_train: edge-case training images (>= 1).
      n_test: at most this many held-out edge-case test images (>= 1).
    """
    check_target_rate(env, target, poison_rate)
    if n_train < 1 or n_test < 1:
        raise ValueError(f"edge_case n_train={n_train}, n_test={n_test}; accepted: >= 1")
    src = resolve_source(source, env.dataset)
    tr, te, kind = edge_images(src, env.data_dir, edge_class, n_train, n_test)
    transform = make_test_transform(kind, env.mean, env.std)
    train_x = jnp.asarray(tr)

    def apply(x, y, flags, rank, key):
        del rank
        idx = jax.random.randint(key, flags.shape, 0, train_x.shape[0])
        edge = transform(train_x[idx]).astype(x.dtype)
        xo = jnp.where(flags[:, None, None, None], edge, x)
        return xo, jnp.where(flags, jnp.asarray(target, y.dtype), y)

    test_set = BackdoorSet(x=te, y=np.full(len(te), target, np.int32), transform=transform)
    return DataAttack(
        poison_rate=poison_rate, apply=apply, test=None, target=target, test_set=test_set
    )


register(
    AttackSpec(
        "edge_case",
        "data",
        edge_case,
        "Edge-case backdoor: flagged samples replaced by out-of-distribution images "
        "(FashionMNIST for MNIST runs, else MNIST digit 7) labelled target",
        paper="Wang et al., Attack of the Tails, NeurIPS 2020 (edge set from shipped data)",
    )
)
