"""`a3fl`: an adversarially adaptive trigger (Zhang, Jia, Chen, Lin, Wu, "A3FL:
Adversarially Adaptive Backdoor Attacks to Federated Learning", NeurIPS 2023).

The trigger is a patch δ under a static mask M (a `size` x `size` square, every channel);
a poisoned sample is x' = (1 − M)⊙x + M⊙δ with label `target`. Before every attacked round
the colluding attackers re-optimise δ against the global model θ_g *and* against an
adversarially crafted model θ' — θ_g trained to unlearn the current trigger (what the
benign clients' training does to a backdoor):

    θ' ← θ' − η_adv·∇_θ CE(f_θ(x ⊕ δ), y),  θ' starting at θ_g   (adv_steps SGD, true labels)
    λ  = λ₀ · sim(θ', θ_g)                                         (weight_rule "similarity")
    δ  ← clip(δ − α·sign(∇_δ [CE(f_θg(x ⊕ δ), t) + λ·CE(f_θ'(x ⊕ δ), t)]), lo, hi)

on the attackers' data (`ServerContext.attacker_x/y`), with [lo, hi] the normalised image
range (pixel values 0..1). λ = λ₀·sim(θ', θ_g) is the paper's balancing coefficient, with
sim the cosine similarity of the two models' parameters, taken per weight tensor and
averaged over every kernel (parameter with >= 2 dimensions, so dense-only models have one
too). The authors' code averages over conv layers only and takes the cosine of the two
models' last gradients instead; the paper's formula names the models, as here.

The `steps` trigger steps run in blocks of `adv_every`: before each block θ' is crafted
afresh from θ_g with the current δ and its λ recomputed (0: one block, one adversarial
model). `weight_rule="fixed"` keeps λ = λ₀ (an ablation). The state is (δ (H, W, C), the
last λ used): δ starts as a white patch (BadNets), λ at 0 (no adversarial model yet); the
backdoor test set stamps the current δ.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from spmc_jax.attacks import register
from spmc_jax.attacks.badnets import check_target_rate, square_mask, square_origin
from spmc_jax.attacks.base import AttackEnv, AttackSpec, DataAttack, relabel
from spmc_jax.client import ClientHook, PyTree, ServerContext

WEIGHT_RULES = ("similarity", "fixed")


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


def kernel_cosine(a: PyTree, b: PyTree, eps: float = 1e-12) -> jax.Array:
    """sim(a, b): the mean over the kernels (leaves with >= 2 dimensions) of the cosine
    ⟨a_l, b_l⟩ / max(‖a_l‖·‖b_l‖, eps); 1-D leaves (biases, norm scales) take no part.

    Raises:
      ValueError: if the trees hold no kernel.
    """
    pairs = [
        (x, y)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        if jnp.ndim(x) >= 2
    ]
    if not pairs:
        raise ValueError("a3fl similarity weight: the model has no kernel (>= 2-D parameter)")
    cos = [
        jnp.vdot(x, y) / jnp.maximum(jnp.linalg.norm(x) * jnp.linalg.norm(y), eps) for x, y in pairs
    ]
    return jnp.mean(jnp.stack(cos))


def adversarial_weight(adv: PyTree, glob: PyTree, lam0: float, rule: str) -> jax.Array:
    """A3FL's balancing coefficient: λ₀·sim(θ', θ_g) ("similarity") or λ₀ ("fixed")."""
    if rule == "fixed":
        return jnp.asarray(lam0, jnp.float32)
    if rule == "similarity":
        return lam0 * kernel_cosine(adv, glob)
    raise ValueError(f"a3fl weight_rule={rule!r}; accepted: {WEIGHT_RULES}")


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
    weight_rule: str = "similarity",
    adv_every: int = 0,
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
      adv_weight: λ₀, the scale of the adversarial model's weight in the trigger loss (>= 0).
      weight_rule: "similarity" (the paper: λ = λ₀·sim(θ', θ_g)) or "fixed" (λ = λ₀).
      adv_every: trigger steps between re-crafted adversarial models (>= 0; 0: one,
        crafted before the first step).
    """
    check_target_rate(env, target, poison_rate)
    if steps < 0 or adv_steps < 0:
        raise ValueError(f"a3fl steps={steps}, adv_steps={adv_steps}; accepted: integers >= 0")
    if not alpha > 0 or not adv_lr > 0 or not adv_weight >= 0:
        raise ValueError(
            f"a3fl alpha={alpha}, adv_lr={adv_lr}, adv_weight={adv_weight}; accepted: "
            "alpha > 0, adv_lr > 0, adv_weight >= 0"
        )
    if weight_rule not in WEIGHT_RULES:
        raise ValueError(f"a3fl weight_rule={weight_rule!r}; accepted: {WEIGHT_RULES}")
    if adv_every < 0:
        raise ValueError(f"a3fl adv_every={adv_every}; accepted: an integer >= 0 (0: once)")
    if env.model is None:
        raise ValueError("a3fl needs AttackEnv.model (client.ModelOps), set by the engine")
    ops = env.model
    kernels = [leaf for leaf in ops.flat.layout if leaf.is_param and len(leaf.shape) >= 2]
    if weight_rule == "similarity" and adv_steps > 0 and not kernels:
        raise ValueError(
            "a3fl weight_rule='similarity' needs a model with a kernel (>= 2-D parameter); "
            f"accepted for this model: {('fixed',)} or adv_steps=0"
        )
    mask = square_mask(env.image_shape, size, square_origin(position, size, env.image_shape))
    lo = env.to_normalized(0.0)  # (C,) the image range in normalised units
    hi = env.to_normalized(1.0)
    white = jnp.broadcast_to(hi, env.image_shape)
    every = adv_every or max(steps, 1)
    blocks = [every] * (steps // every) + ([steps % every] if steps % every else [])

    def init(g0: jax.Array) -> PyTree:
        return jnp.where(jnp.asarray(mask), white, 0.0).astype(jnp.float32), jnp.float32(0.0)

    def optimise(state: PyTree, ctx: ServerContext) -> PyTree:
        pattern, lam = state
        variables = ops.flat.unravel(ctx.global_flat)
        x, y = ctx.attacker_x, ctx.attacker_y
        on = jnp.ones(x.shape[:1], bool)
        tgt = jnp.full_like(y, target)

        def logits_with(params: PyTree, p: jax.Array) -> jax.Array:
            return ops.logits({**variables, "params": params}, stamp_pattern(x, on, mask, p))

        glob = variables["params"]

        def craft(p: jax.Array) -> tuple[PyTree, jax.Array]:
            """θ': θ_g trained `adv_steps` SGD steps to ignore trigger p; and its λ."""

            def adv_step(params: PyTree, _: None) -> tuple[PyTree, None]:
                g = jax.grad(lambda q: cross_entropy(logits_with(q, p), y))(params)
                return jax.tree.map(lambda a, b: a - adv_lr * b, params, g), None

            adv, _ = jax.lax.scan(adv_step, glob, None, length=adv_steps)
            return adv, adversarial_weight(adv, glob, adv_weight, weight_rule)

        def loss(p: jax.Array, adv: PyTree, lam: jax.Array) -> jax.Array:
            base = cross_entropy(logits_with(glob, p), tgt)
            if adv_steps == 0:
                return base
            return base + lam * cross_entropy(logits_with(adv, p), tgt)

        def t_step(carry: tuple, _: None) -> tuple[tuple, None]:
            p, adv, lam = carry
            return (
                trigger_step(p, jax.grad(loss)(p, adv, lam), mask, alpha, lo, hi),
                adv,
                lam,
            ), None

        out = pattern
        for length in blocks:
            adv, lam = craft(out) if adv_steps else (glob, jnp.float32(0.0))
            (out, _, _), _ = jax.lax.scan(t_step, (out, adv, lam), None, length=length)
        return out, jnp.asarray(lam, jnp.float32)

    def server(state: PyTree, ctx: ServerContext) -> PyTree:
        return jax.lax.cond(ctx.attack_on, optimise, lambda s, c: s, state, ctx)

    def apply(x, y, flags, rank, key, state):
        del rank, key
        return stamp_pattern(x, flags, mask, state[0]), relabel(y, flags, target)

    def test(x, y, state):
        flags = jnp.ones(x.shape[:1], bool)
        return stamp_pattern(x, flags, mask, state[0]), relabel(y, flags, target)

    hook = ClientHook(name="a3fl", init=init, server=server, needs_attacker_data=True)
    return DataAttack(poison_rate=poison_rate, apply=apply, test=test, target=target, hook=hook)


register(
    AttackSpec(
        "a3fl",
        "client_data",
        a3fl,
        "adaptive trigger: patch re-optimised each round vs the global model and an unlearned "
        "one weighted by its similarity to the global model",
        paper="Zhang et al., A3FL: Adversarially Adaptive Backdoor Attacks to FL, NeurIPS 2023",
    )
)
