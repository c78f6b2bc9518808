"""Clean accuracy A, backdoor failure rate R, and V = (A + R)/2 (spmc_reference.md §1.7).

* A: top-1 accuracy (%) of the global model on the clean test set.
* R: 100 − ASR (%), ASR = share of the triggered test set predicted as the target, where
  the reference triggers *all* test images, target-class images included (`R`).
* R_excl_target: the standard definition, target-class images excluded.
* V = (A + R)/2 with the reference R (the paper's headline metric).

The paper reports the mean over the last 5 rounds (`last_k_means`).

A model at chance accuracy scores R = 100 (it predicts the target no more than any class)
and so V ≈ (100/C + 100)/2 ≥ 55: `learned` flags such runs so they are never reported as
good defenses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def make_evaluator(
    predict: Callable[[jax.Array, jax.Array], jax.Array],
    transform: Callable[[jax.Array], jax.Array],
    trigger: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]] | None,
    target: int,
    batch: int = 500,
) -> Callable[[jax.Array, jax.Array, jax.Array], dict[str, jax.Array]]:
    """Build `evaluate(flat, x_test, y_test) -> {"A", "R", "R_excl_target", "V"}` (%, scalars).

    The test arrays are arguments (not closed-over constants) so the jitted evaluator does
    not embed the test set in the compiled program.

    Args:
      predict: `predict(flat, x) -> logits` in eval mode.
      transform: test transform, uint8 batch -> normalised batch.
      trigger: `(x, y) -> (x_triggered, y_target)`; None disables R (reported NaN).
      target: the backdoor target label (for R_excl_target).
      batch: evaluation batch size (the test set is padded to a multiple and masked).
    """

    def evaluate(flat: jax.Array, x_test: jax.Array, y_test: jax.Array) -> dict[str, jax.Array]:
        n = int(x_test.shape[0])
        b = min(batch, n)
        nb = -(-n // b)
        pad = nb * b - n
        widths = ((0, pad),) + ((0, 0),) * (x_test.ndim - 1)
        xs = jnp.pad(x_test, widths).reshape(nb, b, *x_test.shape[1:])
        ys = jnp.pad(y_test, (0, pad)).reshape(nb, b)
        ms = (jnp.arange(nb * b) < n).reshape(nb, b)

        def one(args):
            x, y, m = args
            xn = transform(x)
            correct = jnp.sum((jnp.argmax(predict(flat, xn), -1) == y) & m)
            if trigger is None:
                return correct, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)
            xt, yt = trigger(xn, y)
            hit = (jnp.argmax(predict(flat, xt), -1) == yt) & m
            return correct, jnp.sum(hit), jnp.sum(hit & (y != target))

        correct, hits, hits_excl = jax.lax.map(one, (xs, ys, ms))
        a = 100.0 * jnp.sum(correct) / n
        n_excl = jnp.sum(y_test != target)
        if trigger is None:
            r = r_excl = jnp.asarray(jnp.nan)
        else:
            # From integer misses, so R never rounds below 0 (100 − 100·hits/n can in float32).
            r = 100.0 * (n - jnp.sum(hits)) / n
            r_excl = 100.0 * (n_excl - jnp.sum(hits_excl)) / jnp.maximum(n_excl, 1)
        return {"A": a, "R": r, "R_excl_target": r_excl, "V": (a + r) / 2.0}

    return evaluate


def last_k_means(
    history: Sequence[dict[str, Any]], keys=("A", "R", "R_excl_target", "V"), k: int = 5
):
    """Mean of each key over the last `k` evaluated rounds (the paper's reporting)."""
    rows = [h for h in history if h.get("A") is not None][-k:]
    out: dict[str, Any] = {}
    for key in keys:
        vals = [h[key] for h in rows if h.get(key) is not None]
        out[key] = float(np.mean(vals)) if vals else None
    out["rounds_averaged"] = [h["round"] for h in rows]
    return out


# Percentage points above chance (100 / classes) that the reported clean accuracy must exceed
# for a run to count as having learned. A 2-round MNIST smoke run reaches ~29 % (README), a
# model that never moved from its random init stays within a point or two of 10 %.
CHANCE_MARGIN = 5.0


def learned(
    a_mean: float | None, num_classes: int, margin: float = CHANCE_MARGIN
) -> dict[str, Any]:
    """Whether the reported clean accuracy A (%) is more than `margin` points above chance.

    Returns:
      {"learned": bool, "chance": 100 / num_classes, "chance_margin": margin}; an A of None
      (nothing evaluated) counts as not learned.
    """
    chance = 100.0 / num_classes
    ok = a_mean is not None and not np.isnan(a_mean) and a_mean > chance + margin
    return {"learned": bool(ok), "chance": chance, "chance_margin": float(margin)}


def attacker_weight_share(weights: np.ndarray, malicious: np.ndarray) -> float:
    """Total aggregation weight the malicious clients received (sum of their normalised weights)."""
    w = np.asarray(weights, np.float64)
    total = w.sum()
    return float(w[np.asarray(malicious, bool)].sum() / total) if total > 0 else 0.0
