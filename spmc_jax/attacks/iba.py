"""`iba`: a learned, imperceptible, input-specific trigger (Nguyen, Nguyen, Le, Wong, Tran,
Doan, "IBA: Towards Irreversible Backdoor Attacks in Federated Learning", NeurIPS 2023).

The attackers train a small trigger generator G_ξ and poison with an additive trigger bounded
by ε in pixel units:

    T_ξ(x) = ε · tanh(G_ξ(x)) / std,     x' = x + T_ξ(x),  y' = target

(‖T_ξ(x)‖∞ ≤ ε per pixel before normalisation; dividing by the per-channel std puts it in
normalised units). Before every attacked round the colluding attackers take `gen_steps` SGD
steps on ξ against the current global model θ_g on their data (`ServerContext.attacker_x`):

    ξ ← ξ − η·∇_ξ CE(f_θg(x + T_ξ(x)), target),

so the trigger follows the model, then train their local models on x' as usual. G is
conv3x3(C→hidden) → ReLU → conv3x3(hidden→C) (the paper uses a U-Net autoencoder; this
smaller network keeps the CPU cost low). The paper's further model-side steps (PGD on the
update, training only low-importance neurons) compose here as `+pgd` / `+neurotoxin`.
State: ξ, seeded by `seed`. The backdoor test set applies the current T_ξ.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from spmc_jax.attacks import register
from spmc_jax.attacks.a3fl import cross_entropy
from spmc_jax.attacks.badnets import check_target_rate
from spmc_jax.attacks.base import AttackEnv, AttackSpec, DataAttack, relabel
from spmc_jax.client import ClientHook, PyTree, ServerContext


def conv3x3(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """'SAME' 3x3 convolution, NHWC input, HWIO kernel."""
    y = jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return y + b


def generator_trigger(params: PyTree, x: jax.Array, eps: float, std: jax.Array) -> jax.Array:
    """T(x) = ε·tanh(G(x))/std in normalised units, G = conv → ReLU → conv."""
    h = jax.nn.relu(conv3x3(x, params["w1"], params["b1"]))
    return eps * jnp.tanh(conv3x3(h, params["w2"], params["b2"])) / std


def init_generator(key: jax.Array, channels: int, hidden: int) -> PyTree:
    """He-normal kernels, zero biases."""
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (3, 3, channels, hidden)) * np.sqrt(2.0 / (9 * channels)),
        "b1": jnp.zeros((hidden,)),
        "w2": jax.random.normal(k2, (3, 3, hidden, channels)) * np.sqrt(2.0 / (9 * hidden)),
        "b2": jnp.zeros((channels,)),
    }


def iba(
    env: AttackEnv,
    *,
    target: int = 2,
    poison_rate: float = 0.3,
    eps: float = 0.05,
    hidden: int = 8,
    gen_steps: int = 5,
    gen_lr: float = 0.1,
    seed: int = 0,
) -> DataAttack:
    """IBA learned-trigger backdoor.

    Args:
      env: attack environment; needs `env.model` (set by the engine).
      target: backdoor target label.
      poison_rate: per-sample poisoning probability on malicious clients.
      eps: L∞ bound of the trigger in pixel units, in (0, 1].
      hidden: generator width (>= 1).
      gen_steps: generator SGD steps per attacked round (>= 0).
      gen_lr: generator learning rate (> 0).
      seed: generator initialisation seed.
    """
    check_target_rate(env, target, poison_rate)
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"iba eps={eps}; accepted: a pixel-unit bound in (0, 1]")
    if hidden < 1 or gen_steps < 0 or not gen_lr > 0:
        raise ValueError(
            f"iba hidden={hidden}, gen_steps={gen_steps}, gen_lr={gen_lr}; accepted: "
            "hidden >= 1, gen_steps >= 0, gen_lr > 0"
        )
    if env.model is None:
        raise ValueError("iba needs AttackEnv.model (client.ModelOps), set by the engine")
    ops = env.model
    std = jnp.asarray(env.std, jnp.float32)
    channels = env.image_shape[-1]

    def init(g0: jax.Array) -> PyTree:
        return init_generator(jax.random.key(seed), channels, hidden)

    def train(gen: PyTree, ctx: ServerContext) -> PyTree:
        variables = ops.flat.unravel(ctx.global_flat)
        x = ctx.attacker_x
        tgt = jnp.full(x.shape[:1], target, jnp.int32)

        def loss(p: PyTree) -> jax.Array:
            return cross_entropy(ops.logits(variables, x + generator_trigger(p, x, eps, std)), tgt)

        def step(p: PyTree, _: None) -> tuple[PyTree, None]:
            g = jax.grad(loss)(p)
            return jax.tree.map(lambda a, b: a - gen_lr * b, p, g), None

        out, _ = jax.lax.scan(step, gen, None, length=gen_steps)
        return out

    def server(gen: PyTree, ctx: ServerContext) -> PyTree:
        return jax.lax.cond(ctx.attack_on, train, lambda p, c: p, gen, ctx)

    def poison(x: jax.Array, flags: jax.Array, gen: PyTree) -> jax.Array:
        t = generator_trigger(gen, x, eps, std).astype(x.dtype)
        return jnp.where(flags[:, None, None, None], x + t, x)

    def apply(x, y, flags, rank, key, gen):
        del rank, key
        return poison(x, flags, gen), relabel(y, flags, target)

    def test(x, y, gen):
        flags = jnp.ones(x.shape[:1], bool)
        return poison(x, flags, gen), relabel(y, flags, target)

    hook = ClientHook(name="iba", init=init, server=server, needs_attacker_data=True)
    return DataAttack(poison_rate=poison_rate, apply=apply, test=test, target=target, hook=hook)


register(
    AttackSpec(
        "iba",
        "client_data",
        iba,
        "learned trigger: a small generator's eps-bounded additive trigger, trained each round",
        paper="Nguyen et al., IBA: Towards Irreversible Backdoor Attacks in FL, NeurIPS 2023",
    )
)
