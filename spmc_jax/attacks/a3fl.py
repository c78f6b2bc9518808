"""`a3fl`: an adversarially adaptive trigger (Zhang, Jia, Li, Gong, Chen, "A3FL:
Adversarially Adaptive Backdoor Attacks to Federated Learning", NeurIPS 2023).

The trigger is a patch δ under a static mask M (a `size` x `size` square, every channel);
a poisoned sample is x' = (1 − M)⊙x + M⊙δ with label `target`. Before every attacked round
the colluding attackers re-optimise δ against the global model θ_g *and* against a copy
θ_adv adversarially trained to unlearn the current trigger (the defence the benign clients'
training amounts to):

    θ_adv ← θ_adv − η_adv·∇_θ CE(f_θ(x'), y)           (adv_steps SGD steps, true labels)
    δ ← clip(δ − α·sign(∇_δ [CE(f_θg(x'), t) + λ·CE(f_θadv(x'), t)]), lo, hi)   (steps)

on the attackers' data (`ServerContext.attacker_x/y`), with [lo, hi] the normalised image
range (pixel values 0..1). The paper alternates the two inside its trigger loop and weighs
the adversarial model by its similarity to θ_g; here they run one after the other with a
fixed weight λ (`adv_weight`), which keeps the round's cost static. The state is δ (H, W, C),
initialised to a white patch (BadNets), and the backdoor test set stamps the current δ.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from spmc_jax.attacks import register
from spmc_jax.attacks.badnets import check_target_rate, square_mask, square_origin
from spmc_jax.attacks.base import AttackEnv, AttackSpec, DataAttack, relabel
from spmc_jax.client import ClientHook, PyTree, ServerContext


def stamp_pattern(
    x: jax.Array, flags: jax.Array, mask: np.ndarray, pattern: jax.Array
) -> jax.Array:
    """(1 − M)⊙x + M⊙δ for the flagged samples; others unchanged."""
    m = jnp.asarray(mask)[None] & flags[:, None, None, None]
    return jnp.where(m, pattern[None].astype(x.dtype), x)


def cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Mean CE of integer labels."""
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))


def trigger_step(
    pattern: jax.Array,
    grad: jax.Array,
    mask: np.ndarray,
    alpha: float,
    lo: jax.Array,
    hi: jax.Array,
) -> jax.Array:
    """One signed-gradient descent step on the masked pattern, clipped to [lo, hi]."""
    new = jnp.clip(pattern - alpha * jnp.sign(grad), lo, hi)
    return jnp.where(jnp.asarray(mask), new, pattern)


def a3fl(
    env: AttackEnv,
    *,
    target: int = 2,
    poison_rate: float = 0.3,
    size: int = 5,
    position: str = "top_left",
    steps: int = 5,
    alpha: float = 0.05,
    adv_steps: int = 2,
    adv_lr: float = 0.01,
    adv_weight: float = 1.0,
) -> DataAttack:
    """A3FL adaptive trigger.

    Args:
      env: attack environment; needs `env.model` (set by the engine).
      target: backdoor target label.
      poison_rate: per-sample poisoning probability on malicious clients.
      size, position: the trigger square (as `badnets`).
      steps: signed-gradient trigger steps per attacked round (>= 0).
      alpha: trigger step size in normalised units (> 0).
      adv_steps: SGD steps of the trigger-unlearning adversarial model (>= 0; 0: optimise
        against the global model only).
      adv_lr: that model's learning rate (> 0).
      adv_weight: λ, the adversarial model's weight in the trigger loss (>= 0).
    """
    check_target_rate(env, target, poison_rate)
    if steps < 0 or adv_steps < 0:
        raise ValueError(f"a3fl steps={steps}, adv_steps={adv_steps}; accepted: integers >= 0")
    if not alpha > 0 or not adv_lr > 0 or not adv_weight >= 0:
        raise ValueError(
            f"a3fl alpha={alpha}, adv_lr={adv_lr}, adv_weight={adv_weight}; accepted: "
            "alpha > 0, adv_lr > 0, adv_weight >= 0"
        )
    if env.model is None:
        raise ValueError("a3fl needs AttackEnv.model (client.ModelOps), set by the engine")
    ops = env.model
    mask = square_mask(env.image_shape, size, square_origin(position, size, env.image_shape))
    lo = env.to_normalized(0.0)  # (C,) the image range in normalised units
    hi = env.to_normalized(1.0)
    white = jnp.broadcast_to(hi, env.image_shape)

    def init(g0: jax.Array) -> PyTree:
        return jnp.where(jnp.asarray(mask), white, 0.0).astype(jnp.float32)

    def optimise(pattern: jax.Array, ctx: ServerContext) -> jax.Array:
        variables = ops.flat.unravel(ctx.global_flat)
        x, y = ctx.attacker_x, ctx.attacker_y
        on = jnp.ones(x.shape[:1], bool)
        tgt = jnp.full_like(y, target)

        def logits_with(params: PyTree, p: jax.Array) -> jax.Array:
            return ops.logits({**variables, "params": params}, stamp_pattern(x, on, mask, p))

        # The adversarial model: the global one trained to ignore the current trigger.
        def adv_step(params: PyTree, _: None) -> tuple[PyTree, None]:
            g = jax.grad(lambda q: cross_entropy(logits_with(q, pattern), y))(params)
            return jax.tree.map(lambda a, b: a - adv_lr * b, params, g), None

        adv, _ = jax.lax.scan(adv_step, variables["params"], None, length=adv_steps)

        def loss(p: jax.Array) -> jax.Array:
            base = cross_entropy(logits_with(variables["params"], p), tgt)
            if adv_steps == 0:
                return base
            return base + adv_weight * cross_entropy(logits_with(adv, p), tgt)

        def t_step(p: jax.Array, _: None) -> tuple[jax.Array, None]:
            return trigger_step(p, jax.grad(loss)(p), mask, alpha, lo, hi), None

        out, _ = jax.lax.scan(t_step, pattern, None, length=steps)
        return out

    def server(pattern: PyTree, ctx: ServerContext) -> PyTree:
        return jax.lax.cond(ctx.attack_on, optimise, lambda p, c: p, pattern, ctx)

    def apply(x, y, flags, rank, key, pattern):
        del rank, key
        return stamp_pattern(x, flags, mask, pattern), relabel(y, flags, target)

    def test(x, y, pattern):
        flags = jnp.ones(x.shape[:1], bool)
        return stamp_pattern(x, flags, mask, pattern), relabel(y, flags, target)

    hook = ClientHook(name="a3fl", init=init, server=server, needs_attacker_data=True)
    return DataAttack(poison_rate=poison_rate, apply=apply, test=test, target=target, hook=hook)


register(
    AttackSpec(
        "a3fl",
        "client_data",
        a3fl,
        "adaptive trigger: patch re-optimised each round vs the global and an unlearned model",
        paper="Zhang et al., A3FL: Adversarially Adaptive Backdoor Attacks to FL, NeurIPS 2023",
    )
)
