"""`neurotoxin`: durable backdoors through rarely-updated coordinates (Zhang, Panda, Song,
Yang, Mahoney, Mittal, Ramchandran, Gonzalez, "Neurotoxin: Durable Backdoors in Federated
Learning", ICML 2022).

The attackers estimate the benign clients' update direction by last round's global update
Δ = g_t − g_{t−1}, find the top-k% coordinates of |Δ| (the ones benign training moves most,
which would overwrite a backdoor there soonest) and project every local gradient onto the
complement:

    S = top-⌈ratio·p⌉ indices of |Δ| over the p trainable parameters,
    ∇' = ∇ ⊙ 1[i ∉ S].

A training-time attack (a client hook, kind "client"): compose it with a data attack,
`--attack base+neurotoxin` (and, like the paper, with norm-bounding `pgd` if wanted). Benign
clients and rounds outside the attack window are untouched. State: (g_{t−1}, mask), updated
once per round before local training; in round 0 there is no previous update and nothing
is masked. Weight decay still acts on masked coordinates (it is part of the optimiser, as
in the authors' code, which masks `p.grad` before `optimizer.step`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from spmc_jax.attacks import register
from spmc_jax.attacks.base import AttackEnv, AttackSpec
from spmc_jax.client import ClientHook, GradContext, PyTree, ServerContext


def keep_mask(
    prev: jax.Array, cur: jax.Array, ratio: float, param_mask: np.ndarray | None
) -> jax.Array:
    """(d,) float32: 0 on the top-⌈ratio·p⌉ |cur − prev| parameter coordinates, 1 elsewhere
    (non-parameter coordinates: 1); all 1 when nothing moved.

    Args:
      prev, cur: (d,) last round's and this round's global models.
      ratio: the top fraction excluded, in (0, 1].
      param_mask: (d,) bool, trainable coordinates (None: all).
    """
    d = cur.shape[0]
    pidx = np.arange(d) if param_mask is None else np.flatnonzero(param_mask)
    delta = jnp.abs(cur[pidx] - prev[pidx])
    k = max(1, math.ceil(ratio * pidx.size))
    _, top = jax.lax.top_k(delta, k)
    mask = jnp.ones((d,), jnp.float32).at[jnp.asarray(pidx)[top]].set(0.0)
    return jnp.where(jnp.any(delta > 0), mask, jnp.ones((d,), jnp.float32))


def neurotoxin(env: AttackEnv, *, ratio: float = 0.1) -> ClientHook:
    """Neurotoxin gradient masking for the malicious clients.

    Args:
      env: attack environment; needs `env.model` (set by the engine) to map the flat mask
        onto the parameter pytree.
      ratio: top fraction of coordinates (by |last global update|) the attackers leave
        alone, in (0, 1]. The paper sweeps it; 0.1 is FLPoison's and BackFed's default.
    """
    if not (0.0 < ratio <= 1.0):
        raise ValueError(f"neurotoxin ratio={ratio}; accepted: a fraction in (0, 1]")
    if env.model is None:
        raise ValueError("neurotoxin needs AttackEnv.model (client.ModelOps), set by the engine")
    flat = env.model.flat
    param_mask = env.param_mask

    def init(g0: jax.Array) -> PyTree:
        return (g0, jnp.ones_like(g0))

    def server(state: PyTree, ctx: ServerContext) -> PyTree:
        prev, _ = state
        return (ctx.global_flat, keep_mask(prev, ctx.global_flat, ratio, param_mask))

    def grad(g: PyTree, ctx: GradContext) -> PyTree:
        mask = flat.unravel(ctx.state[1])["params"]
        on = ctx.malicious & ctx.attack_on
        return jax.tree.map(lambda gl, m: jnp.where(on, gl * m.astype(gl.dtype), gl), g, mask)

    return ClientHook(name="neurotoxin", init=init, server=server, grad=grad)


register(
    AttackSpec(
        "neurotoxin",
        "client",
        neurotoxin,
        "training-time: attackers' gradients avoid the top-ratio coords of |last global update|",
        paper="Zhang et al., Neurotoxin: Durable Backdoors in Federated Learning, ICML 2022",
    )
)
