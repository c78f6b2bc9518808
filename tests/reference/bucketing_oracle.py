"""Oracle: Bucketing (Karimireddy, He & Jaggi, ICLR 2022, Algorithm 1) in float64 NumPy.

The random permutation is an input (the rule draws it from its PRNG key); the oracle does
the rest from the paper: consecutive buckets of s clients in permuted order, the mean
update of each bucket, then an inner aggregator on the bucket means.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def bucketing(
    global_flat,
    client_flat,
    order,
    bucket_size: int,
    inner: Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    valid=None,
):
    """Returns (new global, per-client weights).

    `inner(g, bucket_models, bucket_valid) -> (new global, bucket weights)`; invalid clients
    are left out of their bucket's mean, and a bucket without valid members is invalid.
    """
    g = np.asarray(global_flat, np.float64)
    w = np.asarray(client_flat, np.float64)
    n = w.shape[0]
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    buckets = [list(order[b : b + bucket_size]) for b in range(0, n, bucket_size)]
    means, bvalid = [], []
    for members in buckets:
        good = [i for i in members if valid[i]]
        means.append(np.mean([w[i] - g for i in good], axis=0) if good else np.zeros_like(g))
        bvalid.append(bool(good))
    new_global, bw = inner(g, g + np.asarray(means), np.asarray(bvalid))
    weights = np.zeros(n)
    for b, members in enumerate(buckets):
        good = [i for i in members if valid[i]]
        for i in good:
            weights[i] = bw[b] / len(good)
    return new_global, weights
