"""Oracle: the reference Dirichlet label-skew partition, restated loop by loop.

Written from spmc_reference.md §1.2 in the style of the reference code: Python lists, the
legacy *global* NumPy RNG seeded with ``np.random.seed(seed)`` (the global state is saved and
restored around the call), per-element comparisons. It deliberately shares no code with
``spmc_jax.data.partition`` so that a match is evidence, not a tautology.
"""

from __future__ import annotations

import numpy as np


def oracle_dirichlet_partition(
    labels, n_parties, beta, seed, train_ratio=0.9, min_require_size=10, n_class=None
):
    """Return the client index lists (Python lists of ints) and the shuffled validation list."""
    labels = [int(v) for v in labels]
    if n_class is None:
        n_class = max(labels) + 1
    n_all = len(labels)
    n_train = int(train_ratio * n_all)

    saved = np.random.get_state()
    try:
        np.random.seed(seed)
        # Step 1: the validation indices (the last 10 %) are shuffled in place first.
        val_idx = list(range(n_train, n_all))
        np.random.shuffle(val_idx)

        # Step 2: retry until every client holds at least `min_require_size` samples.
        min_size = 0
        while min_size < min_require_size:
            idx_batch = [[] for _ in range(n_parties)]
            for k in range(n_class):
                idx_k = [i for i in range(n_train) if labels[i] == k]
                np.random.shuffle(idx_k)
                proportions = np.random.dirichlet(np.repeat(beta, n_parties))
                proportions = np.array(
                    [
                        p * (len(idx_j) < n_train / n_parties)
                        for p, idx_j in zip(proportions, idx_batch, strict=True)
                    ]
                )
                proportions = proportions / proportions.sum()
                bounds = (np.cumsum(proportions) * len(idx_k)).astype(int)[:-1]
                starts = [0, *bounds.tolist()]
                ends = [*bounds.tolist(), len(idx_k)]
                for j in range(n_parties):
                    idx_batch[j] = idx_batch[j] + idx_k[starts[j] : ends[j]]
            min_size = min(len(idx_j) for idx_j in idx_batch)

        # Step 3: shuffle each client's list, clients in order.
        for j in range(n_parties):
            np.random.shuffle(idx_batch[j])
    finally:
        np.random.set_state(saved)
    return idx_batch, val_idx
