"""FedProx's proximal term (Li et al., "Federated Optimization in Heterogeneous Networks",
MLSys 2020).

Every client minimises its data loss plus a proximal term around the round's global model
w_g:

    h_k(w) = F_k(w) + μ/2 · ‖w − w_g‖²,    ∇h_k(w) = ∇F_k(w) + μ · (w − w_g),

so each local step adds μ·(w − w_g) to the (SPMC-projected, if any) data gradient, on the
trainable parameters (BatchNorm statistics are not optimised). All clients, attackers
included, run it (it is the protocol's objective); μ = 0 is plain local SGD.
"""

from __future__ import annotations

import math

import jax

from spmc_jax.client import ClientHook, GradContext, PyTree


def prox_gradient(g: PyTree, params: PyTree, global_params: PyTree, mu: float) -> PyTree:
    """g + μ·(w − w_g), leaf by leaf (dtypes of `g` kept)."""
    return jax.tree.map(
        lambda gl, w, w0: (gl + mu * (w - w0)).astype(gl.dtype), g, params, global_params
    )


def fedprox(mu: float) -> ClientHook:
    """The FedProx hook with proximal strength μ.

    Args:
      mu: μ > 0 (finite).

    Raises:
      ValueError: μ not a finite positive number.
    """
    if not (math.isfinite(mu) and mu > 0):
        raise ValueError(f"--fedprox-mu {mu!r}; accepted: a finite number > 0 (0 = off)")

    def grad(g: PyTree, ctx: GradContext) -> PyTree:
        return prox_gradient(g, ctx.params, ctx.global_params, mu)

    return ClientHook(name="fedprox", grad=grad)
