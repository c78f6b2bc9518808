"""Local training of ONE client; the engine `vmap`s it over the stacked client axis.

A client starts from the global model with a fresh optimiser (optax SGD, momentum, weight
decay; state reset every round as in the reference, §1.4), and runs `epochs` passes over its
data in batches of `batch_size` with the last partial batch dropped. Every client has the
same static number of steps (`epochs × steps_per_epoch` of the largest client); steps past a
client's own `size // batch_size` are masked no-ops, so unequal data sizes need no Python
loop. Each epoch draws a fresh permutation of the client's samples (SubsetRandomSampler).

Gradients: one forward pass and a VJP from the logits. The cross-entropy gradient w.r.t. the
logits is (softmax(s) − onehot(y))/B; SPMC's guidance gradient w.r.t. the logits is
(softmax(s) − softmax(t))/B for the teacher logits t (soft-label CE, T = 1, §3.2). Both are
pulled back through the same VJP, so SPMC costs one extra backward pass and one teacher
forward pass, not a second student forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from spmc_jax.attacks.base import DataAttack

PyTree = Any


class ClientData(NamedTuple):
    """On-device training data shared by every client (indexed per batch inside jit).

    Attributes:
      x: (N, H, W, C) uint8 images.
      y: (N,) int32 labels.
      poison: (N,) bool, the per-sample poisoning draw (fixed for the run).
    """

    x: jax.Array
    y: jax.Array
    poison: jax.Array


class ClientTask(NamedTuple):
    """Per-client inputs of one round (the vmapped axis).

    Attributes:
      idx: (max_samples,) int32 sample indices, padded.
      size: int32 number of valid entries in `idx` (n_i).
      malicious: bool.
      rank: int32 attacker rank among malicious clients (0..m-1), 0 for benign.
      key: PRNG key for this client and round.
    """

    idx: jax.Array
    size: jax.Array
    malicious: jax.Array
    rank: jax.Array
    key: jax.Array


class SpmcClientOptions(NamedTuple):
    """SPMC client-side self-purification options (§3).

    Attributes:
      lam: projection strength λ (1 = exact orthogonalisation of conflicting tensors).
      attackers_skip: malicious clients skip the projection (adaptive attacker, §5 of
        issue 5: they control their own code).
    """

    lam: float = 1.0
    attackers_skip: bool = False


class LocalResult(NamedTuple):
    variables: PyTree
    loss: jax.Array  # mean data loss over the active steps
    steps: jax.Array  # number of active steps
    projected: jax.Array  # mean number of projected tensors per active step (SPMC)


def make_optimizer(lr: float, momentum: float, weight_decay: float) -> optax.GradientTransformation:
    """PyTorch SGD semantics: d = g + wd·w; buf = m·buf + d (buf₀ = d); w ← w − lr·buf."""
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(lr, momentum=momentum if momentum > 0 else None),
    )


class StepResult(NamedTuple):
    variables: PyTree
    opt_state: PyTree
    loss: jax.Array  # data loss of this batch
    projected: jax.Array  # number of projected tensors (SPMC), 0 otherwise


def make_client_step(
    model: nn.Module,
    transform: Callable[[jax.Array, jax.Array], jax.Array],
    optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    data_attack: DataAttack | None = None,
    spmc: SpmcClientOptions | None = None,
) -> Callable[..., StepResult]:
    """Build ONE local SGD step `step(variables, opt_state, teacher, data, task, attack_on,
    perm, key, s) -> StepResult` of one client: batch `s` of the epoch order `perm`.

    `make_local_train` scans it; `benchmarks/round_throughput.py` also jits it alone for its
    sequential per-step baseline (the shape of a PyTorch training loop). Arguments as in
    `make_local_train`; `key` is the epoch's step key (per-step keys are folded from it).
    """

    def forward(variables: PyTree, x: jax.Array):
        if "batch_stats" in variables:
            logits, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
            return logits, upd["batch_stats"]
        return model.apply(variables, x, train=True), None

    def step(
        variables: PyTree,
        opt_state: PyTree,
        teacher: PyTree,
        data: ClientData,
        task: ClientTask,
        attack_on: jax.Array,
        perm: jax.Array,
        key: jax.Array,
        s: jax.Array,
    ) -> StepResult:
        k_aug, k_att = jax.random.split(jax.random.fold_in(key, s))
        sel = task.idx[jax.lax.dynamic_slice(perm, (s * batch_size,), (batch_size,))]
        x = transform(k_aug, data.x[sel])
        y = data.y[sel]
        if data_attack is not None:
            flags = data.poison[sel] & task.malicious & attack_on
            x, y = data_attack.apply(x, y, flags, task.rank, k_att)

        rest = {k: v for k, v in variables.items() if k != "params"}

        def student(p):
            return forward({**rest, "params": p}, x)

        logits, vjp_fn, new_stats = jax.vjp(student, variables["params"], has_aux=True)
        probs = jax.nn.softmax(logits)
        onehot = jax.nn.one_hot(y, logits.shape[-1], dtype=logits.dtype)
        loss = -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), axis=-1))
        (g,) = vjp_fn((probs - onehot) / batch_size)
        n_proj = jnp.zeros((), jnp.float32)
        if spmc is not None:
            from spmc_jax.spmc import project, project_stats

            lam = jnp.where(task.malicious & spmc.attackers_skip, 0.0, spmc.lam)
            # Teacher in train mode (BatchNorm on batch statistics), never updated.
            t_logits, _ = forward(teacher, x)
            t_probs = jax.lax.stop_gradient(jax.nn.softmax(t_logits))
            # Teacher == student (the first step of round 0, and of a client whose teacher is
            # the global model): G_g is exactly 0 by the equations and nothing is projected.
            # Separately compiled forward passes differ by rounding, and the scale-free
            # projection would then project onto that noise. The reference does project
            # there, on its own rounding noise (spmc_reference.md §3.3): a known divergence
            # that no option reproduces (README, "Differences from the reference").
            same = jnp.all(
                jnp.stack(
                    [
                        jnp.array_equal(a, b)
                        for a, b in zip(
                            jax.tree.leaves(teacher["params"]),
                            jax.tree.leaves(variables["params"]),
                            strict=True,
                        )
                    ]
                )
            )
            delta = jnp.where(same, 0.0, probs - t_probs)
            (g_guide,) = vjp_fn(delta / batch_size)
            n_proj = project_stats(g, g_guide).astype(jnp.float32) * (lam > 0)
            g = project(g, g_guide, lam)
        updates, new_opt = optimizer.update(g, opt_state, variables["params"])
        new_vars = dict(variables)
        new_vars["params"] = optax.apply_updates(variables["params"], updates)
        if new_stats is not None:
            new_vars["batch_stats"] = new_stats
        return StepResult(new_vars, new_opt, loss, n_proj)

    return step


def epoch_order(task: ClientTask, e: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(perm, step_key) of local epoch `e`: a fresh random order of the client's valid
    samples first, padding last (SubsetRandomSampler), and the key its steps fold from."""
    k_perm, k_steps = jax.random.split(jax.random.fold_in(task.key, e))
    valid = jnp.arange(task.idx.shape[0]) < task.size
    perm = jnp.argsort(jnp.where(valid, jax.random.uniform(k_perm, valid.shape), 2.0))
    return perm, k_steps


def make_local_train(
    model: nn.Module,
    transform: Callable[[jax.Array, jax.Array], jax.Array],
    optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    steps_per_epoch: int,
    epochs: int,
    data_attack: DataAttack | None = None,
    spmc: SpmcClientOptions | None = None,
) -> Callable[..., LocalResult]:
    """Build `local_train(variables, teacher, data, task, attack_on) -> LocalResult`.

    Args:
      model: flax module called as `model.apply(vars, x, train=True)`.
      transform: `fn(key, x_uint8[B]) -> x[B, 32, 32, 3]` (augment + normalise).
      optimizer: the clients' optax transformation (fresh state every call).
      batch_size: B.
      steps_per_epoch: static max number of full batches of any client.
      epochs: local epochs E.
      data_attack: backdoor applied to malicious clients' flagged samples, or None.
      spmc: SPMC client options, or None for plain SGD on the data loss.

    The returned function is pure and written for one client; `teacher` is ignored when
    `spmc` is None (pass the global variables).
    """
    one_step = make_client_step(
        model, transform, optimizer, batch_size=batch_size, data_attack=data_attack, spmc=spmc
    )
    return local_train_from_step(
        one_step,
        optimizer,
        batch_size=batch_size,
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
    )


def local_train_from_step(
    one_step: Callable[..., StepResult],
    optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    steps_per_epoch: int,
    epochs: int,
) -> Callable[..., LocalResult]:
    """`local_train` of `make_local_train`, scanning an existing `make_client_step` step.

    Args:
      one_step: the client's SGD step (`make_client_step`).
      optimizer: the optax transformation that step was built with (fresh state per call).
      batch_size, steps_per_epoch, epochs: as in `make_local_train`.
    """
    if steps_per_epoch < 1:
        raise ValueError(
            f"steps_per_epoch={steps_per_epoch}: every client needs at least one full batch of "
            f"{batch_size}"
        )

    def local_train(
        variables: PyTree, teacher: PyTree, data: ClientData, task: ClientTask, attack_on: jax.Array
    ) -> LocalResult:
        opt_state = optimizer.init(variables["params"])
        n_batches = task.size // batch_size

        def step(carry, s, perm, key):
            variables, opt_state, loss_sum, proj_sum = carry
            active = s < n_batches
            out = one_step(variables, opt_state, teacher, data, task, attack_on, perm, key, s)

            def keep(new, old):
                return jax.tree.map(lambda a, b: jnp.where(active, a, b), new, old)

            carry = (
                keep(out.variables, variables),
                keep(out.opt_state, opt_state),
                loss_sum + jnp.where(active, out.loss, 0.0),
                proj_sum + jnp.where(active, out.projected, 0.0),
            )
            return carry, None

        def epoch(carry, e):
            perm, k_steps = epoch_order(task, e)
            carry, _ = jax.lax.scan(
                lambda c, s: step(c, s, perm, k_steps), carry, jnp.arange(steps_per_epoch)
            )
            return carry, None

        # Accumulators in the default float dtype: float64 under jax_enable_x64, so a float64
        # model's per-step loss fits the scan carry.
        zero = jnp.zeros((), jax.dtypes.canonicalize_dtype(jnp.float64))
        (variables, _, loss_sum, proj_sum), _ = jax.lax.scan(
            epoch, (variables, opt_state, zero, zero), jnp.arange(epochs)
        )
        steps = (n_batches * epochs).astype(zero.dtype)
        denom = jnp.maximum(steps, 1.0)
        return LocalResult(variables, loss_sum / denom, steps, proj_sum / denom)

    return local_train
