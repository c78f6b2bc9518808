"""`alter_min`: stealthy model poisoning with explicit boosting (Bhagoji, Chakraborty,
Mittal, Calo, "Analyzing Federated Learning through an Adversarial Lens", ICML 2019).

The malicious agent keeps its update close to what benign clients send (stealth: a weight-
distance penalty to an estimate δ̂ of the mean benign update, the previous round's global
update g_t − g_{t−1}) while boosting the part that carries the backdoor by λ so that it
survives averaging:

    local objective:  L_data(w) + ρ·‖w − g_t − δ̂‖²       (gradient term 2ρ·(w − g_t − δ̂))
    sent model:       w' = g_t + δ̂ + λ·(w − g_t − δ̂)     (explicit boosting of the deviation)

Default λ = n / m (the inverse of the attackers' aggregation weight, the paper's 1/α_m).
Simplification, stated: the paper alternates between boosted steps on the malicious
objective and steps on the stealth objective within each epoch; here the attacker trains
one joint objective on its (poisoned) batches and boosts its deviation from δ̂ at the end,
so compose it with a data attack: `--attack base+alter_min`. Benign clients and rounds
outside the attack window are untouched. State: (g_{t−1}, δ̂); round 0 has δ̂ = 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spmc_jax.attacks import register
from spmc_jax.attacks.base import AttackEnv, AttackSpec, keep_benign, restrict_to_params
from spmc_jax.client import ClientHook, GradContext, PyTree, RowsContext, ServerContext


def alter_min(env: AttackEnv, *, rho: float = 1e-4, boost: float = 0.0) -> ClientHook:
    """Stealth penalty + explicit boosting for the malicious clients.

    Args:
      env: attack environment; needs `env.model` (set by the engine).
      rho: ρ >= 0, weight of the distance to the benign-update estimate.
      boost: λ > 0; 0 means n / m.
    """
    if not rho >= 0 or boost < 0:
        raise ValueError(f"alter_min rho={rho}, boost={boost}; accepted: rho >= 0, boost >= 0")
    if env.model is None:
        raise ValueError("alter_min needs AttackEnv.model (client.ModelOps), set by the engine")
    flat = env.model.flat
    lam = boost if boost > 0 else env.n_clients / max(env.num_malicious, 1)

    def init(g0: jax.Array) -> PyTree:
        return (g0, jnp.zeros_like(g0))

    def server(state: PyTree, ctx: ServerContext) -> PyTree:
        prev, _ = state
        return (ctx.global_flat, ctx.global_flat - prev)

    def grad(g: PyTree, ctx: GradContext) -> PyTree:
        est = flat.unravel(ctx.state[1])["params"]
        on = ctx.malicious & ctx.attack_on
        return jax.tree.map(
            lambda gl, w, w0, e: jnp.where(on, gl + 2 * rho * (w - w0 - e), gl).astype(gl.dtype),
            g,
            ctx.params,
            ctx.global_params,
            est,
        )

    def rows(W: jax.Array, ctx: RowsContext) -> jax.Array:
        # Boosting around the centre c = g_t + δ̂: w' = c + λ·(w − c), parameters only.
        def boosted(Wp, cp, malicious, key):
            del key
            out = cp + lam * (Wp - cp)
            return keep_benign(out.astype(Wp.dtype), Wp, malicious & ctx.attack_on)

        centre = ctx.global_flat + ctx.state[1]
        return restrict_to_params(boosted, env.param_mask)(W, centre, ctx.malicious, ctx.key)

    return ClientHook(name="alter_min", init=init, server=server, grad=grad, rows=rows)


register(
    AttackSpec(
        "alter_min",
        "client",
        alter_min,
        "stealth distance to the benign-update estimate + explicit boosting (n/m) of the rest",
        paper="Bhagoji et al., Analyzing FL through an Adversarial Lens, ICML 2019",
    )
)
