"""`iba`: a learned, imperceptible, input-specific trigger (Nguyen, Nguyen, Le, Wong, Tran,
Doan, "IBA: Towards Irreversible Backdoor Attacks in Federated Learning", NeurIPS 2023).

The attackers train a trigger generator G_ξ and poison with an additive trigger bounded by
ε in pixel units:

    T_ξ(x) = ε · tanh(G_ξ(x)) / std,     x' = x + T_ξ(x),  y' = target

(‖T_ξ(x)‖∞ ≤ ε per pixel before normalisation; dividing by the per-channel std puts it in
normalised units). Before every attacked round the colluding attackers take `gen_steps` SGD
steps on ξ against the current global model θ_g on their data (`ServerContext.attacker_x`):

    ξ ← ξ − η·∇_ξ CE(f_θg(x + T_ξ(x)), target),

so the trigger follows the model, then train their local models on x' as usual.

G (`generator="unet"`, the paper's): a U-Net autoencoder (Ronneberger et al. 2015; the
trigger generator of LIRA, Doan et al. ICCV 2021, which IBA builds on). `depth`
down-sampling blocks — a double conv (conv3x3 → ReLU → conv3x3 → ReLU) of width `width`·2^i,
then 2x2 max pooling (floor) — a double-conv bottleneck of width `width`·2^depth, then
`depth` up-sampling blocks — bilinear up-sampling to the matching down block's size,
concatenation with that block's output (the skip connection) and a double conv of width
`width`·2^i — and a 1x1 conv back to the image channels, whose output the tanh bounds. A
full-size U-Net of this form has width 64 and depth 3; the defaults (8, 2) keep the CPU
cost low. Parameters start from PyTorch's default initialisation (the authors' code is
PyTorch).
`generator="conv"`: the smaller conv3x3(C→width) → ReLU → conv3x3(width→C) of earlier
versions. The paper's further model-side steps (PGD on the update, training only
low-importance neurons) compose here as `+pgd` / `+neurotoxin`. State: ξ, seeded by
`seed`. The backdoor test set applies the current T_ξ.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spmc_jax.attacks import register
from spmc_jax.attacks.a3fl import cross_entropy
from spmc_jax.attacks.badnets import check_target_rate
from spmc_jax.attacks.base import AttackEnv, AttackSpec, DataAttack, relabel
from spmc_jax.client import ClientHook, PyTree, ServerContext
from spmc_jax.models.layers import Conv, max_pool

GENERATORS = ("unet", "conv")


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


def _interpolation_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) bilinear weights, half-pixel centres, edges clamped (align_corners
    False: output o samples the input at (o + ½)·n_in/n_out − ½)."""
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0, n_in - 1.0)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    m = np.zeros((n_out, n_in), np.float32)
    np.add.at(m, (np.arange(n_out), i0), 1.0 - (src - i0))
    np.add.at(m, (np.arange(n_out), i1), src - i0)
    return m


def bilinear_upsample(x: jax.Array, height: int, width: int) -> jax.Array:
    """Bilinear resize of NHWC `x` to (height, width): two small matmuls with static
    interpolation matrices (the same values as `jax.image.resize(..., "bilinear")` when
    up-sampling, at a fraction of its compile time)."""
    mh = jnp.asarray(_interpolation_matrix(x.shape[1], height))
    mw = jnp.asarray(_interpolation_matrix(x.shape[2], width))
    return jnp.einsum("ph,nhwc,qw->npqc", mh, x, mw)


def init_unet(net: nn.Module, image_shape: tuple[int, ...], seed: int) -> PyTree:
    """The U-Net's parameters with PyTorch's default init, U(−1/√fan_in, 1/√fan_in) for
    every kernel and bias (fan_in = kh·kw·C_in), drawn in NumPy from `seed`: flax's own
    `init` compiles the whole network with its random draws (about a minute on CPU)."""
    shapes = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, *image_shape)))["params"]
    rng = np.random.default_rng(seed)
    out = {}
    for name in sorted(shapes):
        kernel = shapes[name]["kernel"].shape
        bound = 1.0 / np.sqrt(np.prod(kernel[:-1]))
        out[name] = {
            "kernel": jnp.asarray(rng.uniform(-bound, bound, kernel), jnp.float32),
            "bias": jnp.asarray(rng.uniform(-bound, bound, kernel[-1:]), jnp.float32),
        }
    return out


class UNetGenerator(nn.Module):
    """The U-Net autoencoder G of the module docstring; returns G(x), before the tanh.

    Attributes:
      channels: the image channels C (the output has the input's shape).
      width: the first block's width; block i has width·2^i.
      depth: down-sampling (and up-sampling) blocks.
    """

    channels: int
    width: int = 8
    depth: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def double_conv(h: jax.Array, features: int, name: str) -> jax.Array:
            for j in range(2):
                h = nn.relu(Conv(features, 3, padding=1, impl="patches", name=f"{name}_{j}")(h))
            return h

        skips = []
        h = x
        for i in range(self.depth):
            h = double_conv(h, self.width * 2**i, f"down{i}")
            skips.append(h)
            h = max_pool(h)
        h = double_conv(h, self.width * 2**self.depth, "bottleneck")
        for i in reversed(range(self.depth)):
            skip = skips[i]
            h = bilinear_upsample(h, skip.shape[1], skip.shape[2])
            h = double_conv(jnp.concatenate([h, skip], axis=-1), self.width * 2**i, f"up{i}")
        return Conv(self.channels, 1, name="out")(h)


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
    generator: str = "unet",
    width: int = 8,
    depth: int = 2,
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
      generator: "unet" (the paper's U-Net autoencoder) or "conv" (conv → ReLU → conv).
      width: the generator's width (>= 1): the U-Net's first block, the conv's hidden layer.
      depth: the U-Net's down-/up-sampling blocks (>= 1; each halves the image, floor).
      gen_steps: generator SGD steps per attacked round (>= 0).
      gen_lr: generator learning rate (> 0).
      seed: generator initialisation seed.
    """
    check_target_rate(env, target, poison_rate)
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"iba eps={eps}; accepted: a pixel-unit bound in (0, 1]")
    if generator not in GENERATORS:
        raise ValueError(f"iba generator={generator!r}; accepted: {GENERATORS}")
    if width < 1 or depth < 1 or gen_steps < 0 or not gen_lr > 0:
        raise ValueError(
            f"iba width={width}, depth={depth}, gen_steps={gen_steps}, gen_lr={gen_lr}; "
            "accepted: width >= 1, depth >= 1, gen_steps >= 0, gen_lr > 0"
        )
    if generator == "unet" and min(env.image_shape[:2]) < 2**depth:
        raise ValueError(
            f"iba depth={depth} halves a {env.image_shape[0]}x{env.image_shape[1]} image "
            f"below 1 pixel; accepted: depth <= log2 of the smaller side"
        )
    if env.model is None:
        raise ValueError("iba needs AttackEnv.model (client.ModelOps), set by the engine")
    ops = env.model
    std = jnp.asarray(env.std, jnp.float32)
    channels = env.image_shape[-1]

    trigger: Callable[[PyTree, jax.Array], jax.Array]
    if generator == "unet":
        net = UNetGenerator(channels, width, depth)

        def init(g0: jax.Array) -> PyTree:
            return init_unet(net, env.image_shape, seed)

        def trigger(p: PyTree, x: jax.Array) -> jax.Array:
            return eps * jnp.tanh(cast(jax.Array, net.apply({"params": p}, x))) / std

    else:

        def init(g0: jax.Array) -> PyTree:
            return init_generator(jax.random.key(seed), channels, width)

        def trigger(p: PyTree, x: jax.Array) -> jax.Array:
            return generator_trigger(p, x, eps, std)

    def train(gen: PyTree, ctx: ServerContext) -> PyTree:
        variables = ops.flat.unravel(ctx.global_flat)
        x = ctx.attacker_x
        tgt = jnp.full(x.shape[:1], target, jnp.int32)

        def loss(p: PyTree) -> jax.Array:
            return cross_entropy(ops.logits(variables, x + trigger(p, x)), tgt)

        def step(p: PyTree, _: None) -> tuple[PyTree, None]:
            g = jax.grad(loss)(p)
            return jax.tree.map(lambda a, b: a - gen_lr * b, p, g), None

        out, _ = jax.lax.scan(step, gen, None, length=gen_steps)
        return out

    def server(gen: PyTree, ctx: ServerContext) -> PyTree:
        return jax.lax.cond(ctx.attack_on, train, lambda p, c: p, gen, ctx)

    def poison(x: jax.Array, flags: jax.Array, gen: PyTree) -> jax.Array:
        t = trigger(gen, x).astype(x.dtype)
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
        "learned trigger: a U-Net generator's eps-bounded additive trigger, trained each round",
        paper="Nguyen et al., IBA: Towards Irreversible Backdoor Attacks in FL, NeurIPS 2023",
    )
)
