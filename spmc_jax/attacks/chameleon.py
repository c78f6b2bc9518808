"""`chameleon`: durable backdoors through the poisoned images' peers (Dai & Li, "Chameleon:
Adapting to Peer Images for Planting Durable Backdoors in Federated Learning", ICML 2023).

Benign images of the target class ("facilitators") keep a backdoor alive in later benign
rounds; benign images of the poisoned images' own class ("obstructors") erase it. Chameleon
therefore trains the attackers' feature encoder h (the model up to the classifier layer) so
that poisoned images (trigger stamped, labelled target) sit among the facilitators' features
and away from the obstructors', then trains only the classifier head on that frozen encoder.
An attacker's local training in an attacked round has two stages:

1. Contrastive (the first n₁ = ⌊`contrastive_fraction`·steps⌋ local steps, at least one
   and, with two steps or more, leaving one; classifier head frozen): on the poisoned batch,
   with z_i = h(x_i)/‖h(x_i)‖, labels y (poisoned → target) and y° (before poisoning),
   the supervised contrastive loss (Khosla et al. 2020) with Chameleon's two weights:

       a_ij = κ_ij · z_i·z_j / τ,
       κ_ij = κ if {i, j} = {p, o}: p poisoned (relabelled, y_p ≠ y°_p) and o one of its
              obstructors (clean, y_o = y°_p), else 1,
       ℓ_i  = −(w_i / |P(i)|) Σ_{p∈P(i)} [a_ip − log Σ_{k≠i} exp(a_ik)],
              P(i) = {j ≠ i : y_j = y_i},  ℓ_i = 0 when P(i) is empty,
       w_i  = ω (`fac_scale`) if y_i = target else 1,
       L    = (1/B) Σ_i ℓ_i.

   Poisoned images are positives of the facilitators (same label), obstructors are their
   negatives, and ω up-weights the anchors of the target class.
2. Classifier (the remaining steps; encoder frozen, a fresh optimiser as the authors' second
   optimiser): cross-entropy on the poisoned batch, updating the classifier layer only.

Benign clients, and the attackers outside the attack window, train as usual (the step's
cross-entropy on every parameter). The formulas follow the authors' code (`SupConLoss` of
github.com/ybdai7/Chameleon-durable-backdoor, with base temperature = τ): ω is their
`contrastive_loss_scale_weight` (6 in their pixel-trigger CIFAR-10 config) and κ their
`contrastive_loss_down_scale_weight` (1 in their configs: plain SupCon negatives). Their code
takes the obstructors to be one hard-coded class; here they are each poisoned image's own
original class. Their encoder output is contrasted directly (no projection head), as here.

Differences, by the simulator's design: every client runs the same static number of local
steps, so the two stages split the attackers' `epochs × batches` steps by
`contrastive_fraction` (the authors: 10 contrastive and 2-3 classifier epochs with their own
learning-rate schedules, longer than benign training); both stages use the run's optimiser
and learning rate. The authors' norm bound on the attackers' models composes as `+pgd`.
Under SPMC the attackers' contrastive gradient goes through the client-side projection like
a cross-entropy gradient would (`--attackers-projection` decides). Every client of the round
computes the contrastive gradient (the vmapped step evaluates it for benign rows too and
discards it there): about one more forward/backward pass per step.

The trigger is a registered stamped trigger (`trigger`, default the reference `base`), built
with this attack's `target` and `poison_rate`: `--attack chameleon` is a complete backdoor
attack, `chameleon+scaling` etc. compose model attacks after it.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from spmc_jax.attacks import get_attack, register
from spmc_jax.attacks.badnets import check_target_rate
from spmc_jax.attacks.base import AttackEnv, AttackSpec, DataAttack
from spmc_jax.client import ClientHook, GradContext, LossInputs, Objective, PyTree

# Stamped triggers `trigger` accepts: registered data attacks with a test-time trigger, one
# target, and `target` / `poison_rate` options.
TRIGGERS = ("base", "badnets", "pixel", "pattern", "blended", "dba")


def chameleon_supcon(
    feats: jax.Array,
    y: jax.Array,
    y_clean: jax.Array,
    poisoned: jax.Array,
    target: int,
    temperature: float,
    fac_scale: float,
    obstructor_scale: float,
) -> jax.Array:
    """Chameleon's weighted supervised contrastive loss L of one batch (module docstring).

    Args:
      feats: (B, F) encoder features (normalised here).
      y: (B,) labels after poisoning (poisoned images carry the target).
      y_clean: (B,) labels before poisoning.
      poisoned: (B,) bool.
      target: the backdoor label (anchors with y = target are weighted by `fac_scale`).
      temperature: τ > 0.
      fac_scale: ω, the weight of the target-class anchors.
      obstructor_scale: κ, the factor on poisoned-obstructor similarities.
    """
    # F.normalize, z / max(‖z‖, 1e-12), with the max taken on ‖z‖²: a zero feature row (a
    # dead ReLU layer) then has a finite gradient (√ is not differentiable at 0).
    sq = jnp.sum(feats * feats, axis=1, keepdims=True)
    z = feats / jnp.sqrt(jnp.maximum(sq, 1e-24))
    b = z.shape[0]
    eye = jnp.eye(b, dtype=bool)
    # (p, o): p poisoned (its label was changed), o clean with p's original label.
    obst = (
        (poisoned & (y_clean != y))[:, None] & ~poisoned[None, :] & (y[None, :] == y_clean[:, None])
    )
    obst = obst | obst.T
    a = (z @ z.T / temperature) * jnp.where(obst, obstructor_scale, 1.0).astype(z.dtype)
    log_den = jax.nn.logsumexp(jnp.where(eye, -jnp.inf, a), axis=1)
    pos = (y[:, None] == y[None, :]) & ~eye
    n_pos = jnp.sum(pos, axis=1)
    w = jnp.where(y == target, fac_scale, 1.0).astype(z.dtype)
    per = jnp.sum(jnp.where(pos, a - log_den[:, None], 0.0), axis=1) / jnp.maximum(n_pos, 1)
    return jnp.mean(-w * per)


def contrastive_steps(steps: jax.Array, fraction: float) -> jax.Array:
    """n₁, the contrastive stage's length: ⌊fraction·steps⌋ kept in [1, steps − 1] (both
    stages run whenever steps ≥ 2; a single step is contrastive)."""
    n1 = jnp.floor(fraction * steps).astype(jnp.int32)
    return jnp.clip(n1, 1, jnp.maximum(steps - 1, 1))


def head_mask(params: PyTree, output_layer: str) -> PyTree:
    """A pytree like `params`: True on the classifier layer's leaves."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[0], "key", None) == output_layer, params
    )


def chameleon(
    env: AttackEnv,
    *,
    trigger: str = "base",
    target: int = 2,
    poison_rate: float = 0.3,
    temperature: float = 0.07,
    fac_scale: float = 6.0,
    obstructor_scale: float = 1.0,
    contrastive_fraction: float = 0.75,
) -> DataAttack:
    """Chameleon's two-stage attacker training with a stamped trigger.

    Args:
      env: attack environment; needs `env.model` and `env.output_layer` (set by the engine).
      trigger: the stamped trigger, one of `TRIGGERS` (built with its default geometry).
      target: backdoor target label.
      poison_rate: per-sample poisoning probability on malicious clients.
      temperature: τ of the contrastive loss (> 0; the authors' 0.07).
      fac_scale: ω, weight of the target-class anchors (poisoned images and facilitators),
        > 0 (1: plain SupCon).
      obstructor_scale: κ, factor on the similarities between a poisoned image and its
        obstructors (> 0; 1: plain SupCon negatives, > 1 pushes them apart harder).
      contrastive_fraction: share of the attackers' local steps in the contrastive stage,
        in (0, 1) (0.75 ≈ the authors' 10 contrastive : 3 classifier epochs).
    """
    if trigger not in TRIGGERS:
        raise ValueError(f"chameleon trigger={trigger!r}; accepted: {', '.join(TRIGGERS)}")
    check_target_rate(env, target, poison_rate)
    bad = {
        k: v
        for k, v in (
            ("temperature", temperature),
            ("fac_scale", fac_scale),
            ("obstructor_scale", obstructor_scale),
        )
        if not (math.isfinite(v) and v > 0)
    }
    if bad:
        raise ValueError(f"chameleon {bad}; accepted: finite numbers > 0")
    if not 0.0 < contrastive_fraction < 1.0:
        raise ValueError(
            f"chameleon contrastive_fraction={contrastive_fraction}; accepted: a fraction in (0, 1)"
        )
    if env.model is None:
        raise ValueError("chameleon needs AttackEnv.model (client.ModelOps), set by the engine")
    tag = f"['params']['{env.output_layer}']"
    if not env.output_layer or not any(tag in n for n in env.model.flat.names):
        raise ValueError(
            f"chameleon needs the classifier layer (AttackEnv.output_layer="
            f"{env.output_layer!r}) among the model's parameters {list(env.model.flat.names)}"
        )
    base: DataAttack = get_attack(trigger, env, target=target, poison_rate=poison_rate)
    output_layer = env.output_layer

    def objective(inputs: LossInputs, ctx: GradContext) -> Objective:
        on = ctx.malicious & ctx.attack_on
        n1 = contrastive_steps(inputs.steps, contrastive_fraction)
        stage1 = inputs.step < n1

        def loss(params: PyTree) -> jax.Array:
            return chameleon_supcon(
                inputs.features(params),
                inputs.y,
                inputs.y_clean,
                inputs.poisoned,
                target,
                temperature,
                fac_scale,
                obstructor_scale,
            )

        # Stage 1 trains everything but the head, stage 2 only the head (attackers, window).
        trainable = jax.tree.map(
            lambda h: jnp.where(on, jnp.where(stage1, 1.0 - float(h), float(h)), 1.0),
            head_mask(ctx.params, output_layer),
        )
        return Objective(
            use=on & stage1, loss=loss, trainable=trainable, restart=on & (inputs.step == n1)
        )

    # The trigger is stateless; the hook's state `()` is passed to apply/test and ignored.
    def apply(x: jax.Array, y: jax.Array, flags: jax.Array, rank: Any, key: Any, state=()):
        del state
        return base.apply(x, y, flags, rank, key)

    def test(x: jax.Array, y: jax.Array, state=()):
        del state
        assert base.test is not None
        return base.test(x, y)

    hook = ClientHook(name="chameleon", objective=objective)
    return DataAttack(poison_rate=poison_rate, apply=apply, test=test, target=target, hook=hook)


register(
    AttackSpec(
        "chameleon",
        "client_data",
        chameleon,
        "attackers train the encoder contrastively (poisoned ~ target-class peers, away from "
        "their own class), then the classifier head on it",
        paper="Dai & Li, Chameleon: Adapting to Peer Images for Planting Durable Backdoors in "
        "FL, ICML 2023",
    )
)
