"""Oracle: DeepSight (Rieger et al., NDSS 2022, Algorithm 1) in float64 NumPy with
scikit-learn's HDBSCAN for every clustering, for a linear softmax model whose output layer
is the whole model (kernel flat[k_slice] as (F, C), bias flat[b_slice]). The random
inputs of the DDifs are an input (the rule draws them from its PRNG key).
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.cluster import HDBSCAN


def _hdbscan(dist, mcs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        est = HDBSCAN(
            min_cluster_size=mcs, min_samples=1, metric="precomputed", allow_single_cluster=True
        )
        return est.fit(dist).labels_


def _softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def deepsight(W, g, valid, param_mask, k_slice, k_shape, b_slice, xs, tau=1 / 3, mcs=2):
    """Returns (new_global, weights, suspicious, accepted) over all n rows."""
    W = np.asarray(W, np.float64)
    g = np.asarray(g, np.float64)
    n = W.shape[0]
    idx = np.flatnonzero(valid)
    deltas = W - g[None, :]
    m = len(idx)
    neups = np.zeros((m, k_shape[1]))
    te = np.zeros(m)
    bias = np.zeros((m, k_shape[1]))
    for a, i in enumerate(idx):
        dw = deltas[i, k_slice].reshape(k_shape)
        db = deltas[i, b_slice]
        energy = np.abs(dw).sum(0) + np.abs(db)
        neups[a] = energy**2 / np.sum(energy**2)
        xi = max(0.01, 1 / k_shape[1]) * neups[a].max()
        te[a] = np.sum(neups[a] > xi)
        bias[a] = db
    suspicious = te <= np.median(te) / 2

    def logits(flat, x):
        return x @ flat[k_slice].reshape(k_shape) + flat[b_slice]

    xs = np.asarray(xs, np.float64)
    ddifs = np.zeros((xs.shape[0], m, k_shape[1]))
    for s in range(xs.shape[0]):
        pg = _softmax(logits(g, xs[s]))
        for a, i in enumerate(idx):
            ddifs[s, a] = np.mean(_softmax(logits(W[i], xs[s])) / pg, axis=0)

    def euclid(v):
        return np.sqrt(((v[:, None, :] - v[None, :, :]) ** 2).sum(-1))

    unit = bias / np.linalg.norm(bias, axis=1, keepdims=True)
    cos_d = np.clip(1 - unit @ unit.T, 0, 2)
    np.fill_diagonal(cos_d, 0.0)
    labelings = [_hdbscan(cos_d, mcs), _hdbscan(euclid(neups), mcs)]
    labelings += [_hdbscan(euclid(ddifs[s]), mcs) for s in range(xs.shape[0])]
    agree = np.zeros((m, m))
    for lab in labelings:
        agree += (lab[:, None] == lab[None, :]) & (lab[:, None] >= 0)
    ens = 1 - agree / len(labelings)
    np.fill_diagonal(ens, 0.0)
    final = _hdbscan(ens, mcs)
    acc = np.zeros(m, bool)
    for a in range(m):
        if final[a] < 0:
            acc[a] = not suspicious[a]
        else:
            members = final == final[a]
            acc[a] = suspicious[members].mean() < tau
    pm = np.asarray(param_mask, bool)
    norms = np.linalg.norm(deltas[:, pm], axis=1)
    s_med = np.median(norms[idx])
    weights = np.zeros(n)
    n_acc = acc.sum()
    for a, i in enumerate(idx):
        if acc[a]:
            weights[i] = min(1.0, s_med / norms[i]) / n_acc
    sus_full = np.zeros(n, bool)
    sus_full[idx] = suspicious
    acc_full = np.zeros(n, bool)
    acc_full[idx] = acc
    return g + weights @ deltas, weights, sus_full, acc_full
