"""`alter_min`: stealthy model poisoning by alternating minimization with explicit boosting
(Bhagoji, Chakraborty, Mittal, Calo, "Analyzing Federated Learning through an Adversarial
Lens", ICML 2019, Sec. 4).

The malicious agent has two objectives, on its poisoned samples D_mal (those its data
attack flagged, relabelled) and on its clean samples D_ben:

    malicious:  L_mal(w) = CE(D_mal; w), boosted by λ
    stealth:    L_st(w)  = CE(D_ben; w) + ρ·‖w − g_t − δ̂‖²     (gradient term 2ρ·(w − g_t − δ̂))

with δ̂ an estimate of the mean benign update, the previous round's global update
g_t − g_{t−1} (round 0: δ̂ = 0). mode "alternating" (default, the paper's alternating
minimization): local training alternates between the two. Per cycle of 1 + k local steps
(k = `stealth_steps`; cycles restart with each local epoch), step 0 is one SGD step on the
malicious objective, explicitly boosted,

    ŵ = w − η·∇L_mal(w),     w̃ = w + λ·(ŵ − w) = w − η·λ·∇L_mal(w),

and steps 1..k minimise the stealth objective from w̃ (in the paper each epoch first
minimises the adversarial objective, boosts that step, then minimises the stealth
objective from the boosted weights, possibly for more steps). Each step spends its
batch on one objective: the poisoned samples on a malicious step (mean over them), the
clean ones on a stealth step (mean over them). The sent model is the last iterate, with no
further boosting. Granularity, stated: the paper alternates per epoch of each objective;
here the unit is one batch (a local step); an attacker with a single batch per epoch
therefore takes only malicious steps. λ·∇ enters the clients' optimiser, so with
momentum or weight decay the boosting is of the malicious gradient rather than exactly of
the step (exact for plain SGD, the paper's setting).

mode "joint" (cheap variant): the attacker trains one joint objective, data loss on its
whole (poisoned) batches + ρ·‖w − g_t − δ̂‖², and sends w' = g_t + δ̂ + λ·(w − g_t − δ̂)
(explicit boosting of its deviation from the benign estimate at the end).

Default λ = n / m (the inverse of the attackers' aggregation weight, the paper's 1/α_m).
The malicious objective needs poisoned samples: compose with a data attack (`--attack
base+alter_min`); without one its steps have no samples and change nothing. Benign
clients and rounds outside the attack window train normally. State: (g_{t−1}, δ̂).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spmc_jax.attacks import register
from spmc_jax.attacks.base import AttackEnv, AttackSpec, keep_benign, restrict_to_params
from spmc_jax.client import ClientHook, GradContext, PyTree, RowsContext, ServerContext

MODES = ("alternating", "joint")


def alter_min(
    env: AttackEnv,
    *,
    rho: float = 1e-4,
    boost: float = 0.0,
    mode: str = "alternating",
    stealth_steps: int = 1,
) -> ClientHook:
    """Alternating minimization (or the joint variant) with explicit boosting.

    Args:
      env: attack environment; needs `env.model` (set by the engine).
      rho: ρ >= 0, weight of the distance to the benign-update estimate.
      boost: λ > 0; 0 means n / m.
      mode: "alternating" (the paper's) or "joint".
      stealth_steps: k >= 1, stealth steps after each malicious step ("alternating").
    """
    if not rho >= 0 or boost < 0:
        raise ValueError(f"alter_min rho={rho}, boost={boost}; accepted: rho >= 0, boost >= 0")
    if mode not in MODES:
        raise ValueError(f"alter_min mode={mode!r}; accepted: {', '.join(MODES)}")
    if stealth_steps < 1:
        raise ValueError(f"alter_min stealth_steps={stealth_steps}; accepted: integer >= 1")
    if env.model is None:
        raise ValueError("alter_min needs AttackEnv.model (client.ModelOps), set by the engine")
    flat = env.model.flat
    lam = boost if boost > 0 else env.n_clients / max(env.num_malicious, 1)
    cycle = 1 + int(stealth_steps)

    def init(g0: jax.Array) -> PyTree:
        return (g0, jnp.zeros_like(g0))

    def server(state: PyTree, ctx: ServerContext) -> PyTree:
        prev, _ = state
        return (ctx.global_flat, ctx.global_flat - prev)

    def penalised(g: PyTree, ctx: GradContext, on: jax.Array) -> PyTree:
        """g + 2ρ(w − g_t − δ̂) where `on`, g elsewhere."""
        est = flat.unravel(ctx.state[1])["params"]
        return jax.tree.map(
            lambda gl, w, w0, e: jnp.where(on, gl + 2 * rho * (w - w0 - e), gl).astype(gl.dtype),
            g,
            ctx.params,
            ctx.global_params,
            est,
        )

    if mode == "joint":

        def grad(g: PyTree, ctx: GradContext) -> PyTree:
            return penalised(g, ctx, ctx.malicious & ctx.attack_on)

        def rows(W: jax.Array, ctx: RowsContext) -> jax.Array:
            # Boosting around the centre c = g_t + δ̂: w' = c + λ·(w − c), parameters only.
            def boosted(Wp, cp, malicious, key):
                del key
                out = cp + lam * (Wp - cp)
                return keep_benign(out.astype(Wp.dtype), Wp, malicious & ctx.attack_on)

            centre = ctx.global_flat + ctx.state[1]
            return restrict_to_params(boosted, env.param_mask)(W, centre, ctx.malicious, ctx.key)

        return ClientHook(name="alter_min", init=init, server=server, grad=grad, rows=rows)

    def malicious_step(ctx: GradContext) -> jax.Array:
        return jnp.asarray(ctx.step) % cycle == 0

    def sample_weights(flags: jax.Array, ctx: GradContext) -> jax.Array:
        on = ctx.malicious & ctx.attack_on
        clean = ~flags
        mal_w = lam * flags / jnp.maximum(jnp.sum(flags), 1)  # λ · mean over D_mal
        ben_w = clean / jnp.maximum(jnp.sum(clean), 1)  # mean over D_ben
        uniform = jnp.full(flags.shape, 1.0 / flags.shape[0])
        return jnp.where(on, jnp.where(malicious_step(ctx), mal_w, ben_w), uniform)

    def grad_alt(g: PyTree, ctx: GradContext) -> PyTree:
        return penalised(g, ctx, ctx.malicious & ctx.attack_on & ~malicious_step(ctx))

    return ClientHook(
        name="alter_min",
        init=init,
        server=server,
        grad=grad_alt,
        sample_weights=sample_weights,
    )


register(
    AttackSpec(
        "alter_min",
        "client",
        alter_min,
        "alternating minimization: boosted (n/m) steps on the poisoned samples, then stealth "
        "steps (clean loss + distance to the benign-update estimate); mode=joint: one objective",
        paper="Bhagoji et al., Analyzing FL through an Adversarial Lens, ICML 2019",
    )
)
