"""Oracle: Finetuning = uniform FedAvg of the valid clients, then the server's proxy
training step (passed in as a function), in float64 NumPy for the average.
"""

from __future__ import annotations

import numpy as np


def finetuning(W, valid, train_fn):
    """Return (new_global, weights) with new_global = train_fn(mean of valid rows)."""
    W = np.asarray(W, np.float64)
    rows = [W[i] for i in range(W.shape[0]) if valid[i]]
    w = np.array([1.0 / len(rows) if v else 0.0 for v in valid])
    return train_fn(np.mean(rows, axis=0)), w
