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

Client hooks (`ClientHook`) are the one extension point for everything that changes what a
client does beyond its data and SPMC: FedProx's proximal term, local DP, training-time
attacks (Neurotoxin, A3FL, IBA, Chameleon, 3DFed). A hook may (a) transform the gradient
inside the jitted step, (b) keep a small per-run state in `engine.RunState` that is updated
once per round outside the client vmap, before local training (a trigger being optimised, the
previous global model) and is read by the step and the data attack, (c) transform the (n, d)
matrix of trained client rows before aggregation (with `rows_state`, also recording in its
state what it sent, for the next round's `server` update: 3DFed's indicators), and (d)
replace a client's local objective (`objective`: a loss on the model's features or logits to
differentiate instead of the cross-entropy, which parameters the step may update, and when the
optimiser restarts; at most one hook per run). With no hooks every code path is the one
without them (bit-identical numbers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from spmc_jax.attacks.base import DataAttack

PyTree = Any

SPMC_ATTACKER_MODES = ("follow", "skip", "invert")


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
        issue 5: they control their own code). Same as `attackers="skip"`.
      attackers: what malicious clients do with the projection (`SPMC_ATTACKER_MODES`):
        'follow' it like benign clients, 'skip' it (λ = 0), or 'invert' it (λ → −λ: a
        conflicting tensor's component along the guidance gradient G_g is doubled instead
        of removed, G = G_d + λ·(⟨G_d, G_g⟩/‖G_g‖²)·G_g, pushing the model further from the
        teacher, which is where the backdoor lives).
    """

    lam: float = 1.0
    attackers_skip: bool = False
    attackers: str = "follow"

    def attacker_lam(self) -> float:
        """λ of a malicious client (benign clients use `lam`)."""
        mode = "skip" if self.attackers_skip else self.attackers
        if mode not in SPMC_ATTACKER_MODES:
            raise ValueError(
                f"SPMC attackers mode {mode!r}; accepted: {', '.join(SPMC_ATTACKER_MODES)}"
            )
        return {"follow": self.lam, "skip": 0.0, "invert": -self.lam}[mode]


# ----------------------------------------------------------------------------- hooks
@dataclasses.dataclass(frozen=True)
class ModelOps:
    """The model, for hooks that evaluate it (A3FL's trigger search, IBA's generator).

    Attributes:
      flat: the run's `Flattener` (variables <-> (d,) vector).
      logits: `logits(variables, x) -> (B, classes)` in eval mode (BatchNorm running stats).
    """

    flat: Any
    logits: Callable[[PyTree, jax.Array], jax.Array]


class ServerContext(NamedTuple):
    """What a hook's once-per-round `server` update sees (outside the client vmap).

    Attributes:
      global_flat: (d,) the round's global model (what the clients start from).
      round: int32 round index.
      attack_on: bool, the round is inside the attack window.
      key: this hook's PRNG key of the round.
      attacker_x: (B, H, W, C) normalised images from the malicious clients' data (a fixed
        sample of their pool; empty when no hook asks for it), for attacks the colluding
        attackers prepare together before training.
      attacker_y: (B,) their labels.
    """

    global_flat: jax.Array
    round: jax.Array
    attack_on: jax.Array
    key: jax.Array
    attacker_x: jax.Array
    attacker_y: jax.Array


class GradContext(NamedTuple):
    """What a hook's `grad` transform sees at every local step of one client.

    Attributes:
      params: the client's current parameters (pytree).
      global_params: the round's global parameters (the client's starting point).
      malicious: bool, this client is an attacker.
      attack_on: bool, the round is inside the attack window.
      key: a PRNG key for this hook, client and step.
      state: this hook's per-run state after the round's `server` update.
      step: int32 index of the batch within the local epoch (0-based; alternating
        schedules read it).
    """

    params: PyTree
    global_params: PyTree
    malicious: jax.Array
    attack_on: jax.Array
    key: jax.Array
    state: PyTree
    step: Any = 0


class RowsContext(NamedTuple):
    """What a hook's `rows` transform sees (after model attacks, before aggregation).

    Attributes:
      global_flat: (d,) the round's global model.
      malicious: (n,) bool over the round's participants.
      attack_on: bool.
      key: this hook's PRNG key of the round.
      state: this hook's state.
    """

    global_flat: jax.Array
    malicious: jax.Array
    attack_on: jax.Array
    key: jax.Array
    state: PyTree


class LossInputs(NamedTuple):
    """What a hook's `objective` sees at one local step of one client (inside the vmap).

    Attributes:
      x: (B, H, W, C) the batch after augmentation and the data attack.
      y: (B,) int labels after the data attack.
      y_clean: (B,) int labels before the data attack.
      poisoned: (B,) bool, the samples the data attack poisoned at this step (all False
        for benign clients, outside the attack window, and without a data attack).
      features: `features(params) -> (B, F)`: the penultimate-layer representation of `x`
        (the classifier layer's input), train mode, differentiable in `params`.
      logits: `logits(params) -> (B, classes)` of `x`, train mode.
      step: int32 index of this step among the client's active local steps of the round.
      steps: int32 number of the client's active local steps in the round (epochs × its
        full batches).
    """

    x: jax.Array
    y: jax.Array
    y_clean: jax.Array
    poisoned: jax.Array
    features: Callable[[PyTree], jax.Array]
    logits: Callable[[PyTree], jax.Array]
    step: jax.Array
    steps: jax.Array


class Objective(NamedTuple):
    """A hook's replacement of one client's local step (`ClientHook.objective`).

    Attributes:
      use: bool, differentiate `loss` instead of the cross-entropy at this step.
      loss: `loss(params) -> scalar`, the objective (read only where `use`).
      trainable: per-leaf multipliers of the optimiser's update, a pytree like the
        parameters (1: trained, 0: frozen, e.g. an encoder or a classifier head); None:
        every parameter is trained. A frozen leaf keeps its value exactly (weight decay
        and momentum included).
      restart: bool, a fresh optimiser state before this step (a training stage with its
        own optimiser, as a new `torch.optim.SGD` would be).
    """

    use: jax.Array
    loss: Callable[[PyTree], jax.Array]
    trainable: PyTree | None
    restart: jax.Array


class ClientHook(NamedTuple):
    """One client-side extension; every member optional (None: not used).

    Attributes:
      name: for messages.
      init: `init(init_flat) -> state`, the per-run state (a small pytree of arrays); None:
        the state is `()`.
      server: `server(state, ServerContext) -> state`, run once per round before local
        training (the state the clients see this round).
      grad: `grad(g, GradContext) -> g` on the parameter-gradient pytree, inside the jitted
        step, after SPMC's projection and before the optimiser.
      sample_weights: `sample_weights(flags, GradContext) -> (B,)` per-sample weights of
        the batch's data-loss gradient, replacing the mean's uniform 1/B (`flags`: the
        batch's poisoned samples, all False without a data attack); at most one hook of
        a run may set it (Bhagoji et al.'s alternating objectives).
      rows: `rows(W, RowsContext) -> W` on the (n, d) trained client rows, after model
        attacks and before the server's sanitising and aggregation.
      needs_attacker_data: the `server` update reads `ServerContext.attacker_x/y`.
      objective: `objective(LossInputs, GradContext) -> Objective`, inside the jitted
        step: where its `use` is set, the client's gradient is that of `Objective.loss`
        instead of the cross-entropy's (before SPMC's projection and the `grad` hooks).
      rows_state: `rows` returns `(W, state)`: the hook records what it sent this round
        (3DFed's indicators, read back from the next global model); its state then
        carries over to the next round's `server` update.
    """

    name: str
    init: Callable[[jax.Array], PyTree] | None = None
    server: Callable[[PyTree, ServerContext], PyTree] | None = None
    grad: Callable[[PyTree, GradContext], PyTree] | None = None
    rows: Callable[[jax.Array, RowsContext], Any] | None = None  # W, or (W, state)
    needs_attacker_data: bool = False
    sample_weights: Callable[[jax.Array, GradContext], jax.Array] | None = None
    objective: Callable[[LossInputs, GradContext], Objective] | None = None
    rows_state: bool = False


class HookInputs(NamedTuple):
    """Per-round inputs of every hook of a client's local training.

    Attributes:
      global_params: the round's global parameters.
      states: every hook's state, in `collect_hooks` order.
      epoch: int32 index of the current local epoch (set by `local_train`).
      epochs: the number of local epochs of the round.
    """

    global_params: PyTree
    states: tuple[PyTree, ...]
    epoch: Any = 0
    epochs: int = 1


def collect_hooks(
    data_attack: DataAttack | None, hooks: Sequence[ClientHook] = ()
) -> tuple[ClientHook, ...]:
    """The run's hooks in state order: the data attack's own hook (if any) first."""
    own = (data_attack.hook,) if data_attack is not None and data_attack.hook is not None else ()
    return tuple(own) + tuple(hooks)


def init_hook_states(hooks: Sequence[ClientHook], init_flat: jax.Array) -> tuple[PyTree, ...]:
    """Every hook's initial state (`()` for hooks without one)."""
    return tuple(h.init(init_flat) if h.init is not None else () for h in hooks)


def server_update(
    hooks: Sequence[ClientHook], states: tuple[PyTree, ...], ctx: ServerContext
) -> tuple[PyTree, ...]:
    """Run every hook's `server` update of the round (hook i gets key fold_in(ctx.key, i))."""
    return tuple(
        h.server(s, ctx._replace(key=jax.random.fold_in(ctx.key, i))) if h.server is not None else s
        for i, (h, s) in enumerate(zip(hooks, states, strict=True))
    )


def apply_row_hooks(
    hooks: Sequence[ClientHook],
    states: tuple[PyTree, ...],
    W: jax.Array,
    global_flat: jax.Array,
    malicious: jax.Array,
    attack_on: jax.Array,
    key: jax.Array,
) -> jax.Array:
    """Apply every hook's `rows` transform in order (hook i gets key fold_in(key, i))."""
    return row_hooks(hooks, states, W, global_flat, malicious, attack_on, key)[0]


def row_hooks(
    hooks: Sequence[ClientHook],
    states: tuple[PyTree, ...],
    W: jax.Array,
    global_flat: jax.Array,
    malicious: jax.Array,
    attack_on: jax.Array,
    key: jax.Array,
) -> tuple[jax.Array, tuple[PyTree, ...]]:
    """`apply_row_hooks` that also returns the states (updated by `rows_state` hooks)."""
    out = list(states)
    for i, (h, s) in enumerate(zip(hooks, states, strict=True)):
        if h.rows is not None:
            ctx = RowsContext(global_flat, malicious, attack_on, jax.random.fold_in(key, i), s)
            if h.rows_state:
                W, out[i] = h.rows(W, ctx)
            else:
                W = h.rows(W, ctx)
    return W, tuple(out)


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
    hooks: Sequence[ClientHook] = (),
) -> Callable[..., StepResult]:
    """Build ONE local SGD step `step(variables, opt_state, teacher, data, task, attack_on,
    perm, key, s, hook_inputs=None) -> StepResult` of one client: batch `s` of the epoch
    order `perm`.

    `make_local_train` loops it; `benchmarks/round_throughput.py` also jits it alone for its
    sequential per-step baseline (the shape of a PyTorch training loop). Arguments as in
    `make_local_train`; `key` is the epoch's step key (per-step keys are folded from it);
    `hook_inputs` (`HookInputs`) is required when `hooks` is not empty, in the order of
    `collect_hooks(data_attack, ...)`.
    """
    hooks = tuple(hooks)
    own = data_attack.hook if data_attack is not None else None
    own_pos = next((i for i, h in enumerate(hooks) if h is own), None)
    if own is not None and own_pos is None:
        raise ValueError("the data attack's hook must be among `hooks` (see collect_hooks)")
    grad_hooks = [(i, h) for i, h in enumerate(hooks) if h.grad is not None]
    weight_hooks = [(i, h) for i, h in enumerate(hooks) if h.sample_weights is not None]
    if len(weight_hooks) > 1:
        raise ValueError(
            f"client hooks {[h.name for _, h in weight_hooks]} all set per-sample loss "
            "weights; accepted: at most one"
        )
    obj_hooks = [(i, h) for i, h in enumerate(hooks) if h.objective is not None]
    if len(obj_hooks) > 1:
        raise ValueError(
            "at most one client hook may replace the local objective, got "
            f"{', '.join(h.name for _, h in obj_hooks)}"
        )

    def forward(variables: PyTree, x: jax.Array, **kw: Any):
        if "batch_stats" in variables:
            logits, upd = model.apply(variables, x, train=True, mutable=["batch_stats"], **kw)
            return logits, upd["batch_stats"]
        return model.apply(variables, x, train=True, **kw), None

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
        hook_inputs: HookInputs | None = None,
    ) -> StepResult:
        if hooks and hook_inputs is None:
            raise ValueError(f"{len(hooks)} client hook(s) need hook_inputs (HookInputs)")
        k_aug, k_att = jax.random.split(jax.random.fold_in(key, s))
        sel = task.idx[jax.lax.dynamic_slice(perm, (s * batch_size,), (batch_size,))]
        x = transform(k_aug, data.x[sel])
        y = y_clean = data.y[sel]
        flags = jnp.zeros(y.shape, bool)
        if data_attack is not None:
            flags = data.poison[sel] & task.malicious & attack_on
            if own_pos is None:
                x, y = data_attack.apply(x, y, flags, task.rank, k_att)
            else:  # a stateful trigger (A3FL, IBA) reads its hook's state
                assert hook_inputs is not None
                x, y = data_attack.apply(x, y, flags, task.rank, k_att, hook_inputs.states[own_pos])

        rest = {k: v for k, v in variables.items() if k != "params"}

        def student(p):
            return forward({**rest, "params": p}, x)

        logits, vjp_fn, new_stats = jax.vjp(student, variables["params"], has_aux=True)
        probs = jax.nn.softmax(logits)
        onehot = jax.nn.one_hot(y, logits.shape[-1], dtype=logits.dtype)
        loss = -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), axis=-1))
        k_hook = jax.random.fold_in(k_att, 1)

        def hook_ctx(i: int) -> GradContext:
            assert hook_inputs is not None
            return GradContext(
                params=variables["params"],
                global_params=hook_inputs.global_params,
                malicious=task.malicious,
                attack_on=attack_on,
                key=jax.random.fold_in(k_hook, i),
                state=hook_inputs.states[i],
                step=s,
            )

        if weight_hooks:
            i, h = weight_hooks[0]
            assert h.sample_weights is not None
            wts = h.sample_weights(flags, hook_ctx(i)).astype(logits.dtype)
            ct_data = (probs - onehot) * wts[:, None]
        else:
            ct_data = (probs - onehot) / batch_size
        g_guide = None
        if spmc is None:
            (g,) = vjp_fn(ct_data)
        else:
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
            # Both backward passes (data loss, guide loss) in one: the VJP vmapped over the
            # two cotangents, so every weight-gradient matmul reads its activations once with
            # twice the columns (issue 14; the same gradients up to float32 summation order).
            (gs,) = jax.vmap(vjp_fn)(jnp.stack([ct_data, delta / batch_size]))
            g = jax.tree.map(lambda a: a[0], gs)
            g_guide = jax.tree.map(lambda a: a[1], gs)
        obj = None
        if obj_hooks:  # a hook's own objective (Chameleon) where it says so
            assert hook_inputs is not None
            i, h = obj_hooks[0]
            assert h.objective is not None
            n_b = task.size // batch_size
            inputs = LossInputs(
                x=x,
                y=y,
                y_clean=y_clean,
                poisoned=flags,
                # Train mode; the BatchNorm statistics come from the forward pass above
                # (same batch and parameters up to the features, so the same statistics).
                features=lambda p: forward({**rest, "params": p}, x, penultimate=True)[0],
                logits=lambda p: forward({**rest, "params": p}, x)[0],
                step=(jnp.asarray(hook_inputs.epoch) * n_b + s).astype(jnp.int32),
                steps=(hook_inputs.epochs * n_b).astype(jnp.int32),
            )
            obj = h.objective(inputs, hook_ctx(i))
            g_obj = jax.grad(obj.loss)(variables["params"])
            g = jax.tree.map(lambda a, b: jnp.where(obj.use, a.astype(b.dtype), b), g_obj, g)
            fresh = optimizer.init(variables["params"])
            opt_state = jax.tree.map(lambda a, b: jnp.where(obj.restart, a, b), fresh, opt_state)
        n_proj = jnp.zeros((), jnp.float32)
        if spmc is not None:
            from spmc_jax.spmc import project, project_stats

            lam = jnp.where(task.malicious, spmc.attacker_lam(), spmc.lam)
            assert g_guide is not None
            n_proj = project_stats(g, g_guide).astype(jnp.float32) * (lam != 0)
            g = project(g, g_guide, lam)
        for i, h in grad_hooks:
            assert h.grad is not None
            g = h.grad(g, hook_ctx(i))
        updates, new_opt = optimizer.update(g, opt_state, variables["params"])
        if obj is not None and obj.trainable is not None:
            updates = jax.tree.map(lambda u, m: u * m.astype(u.dtype), updates, obj.trainable)
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
    hooks: Sequence[ClientHook] = (),
) -> Callable[..., LocalResult]:
    """Build `local_train(variables, teacher, data, task, attack_on, hook_states=())
    -> LocalResult`.

    Args:
      model: flax module called as `model.apply(vars, x, train=True)`.
      transform: `fn(key, x_uint8[B]) -> x[B, 32, 32, 3]` (augment + normalise).
      optimizer: the clients' optax transformation (fresh state every call).
      batch_size: B.
      steps_per_epoch: static max number of full batches of any client.
      epochs: local epochs E.
      data_attack: backdoor applied to malicious clients' flagged samples, or None.
      spmc: SPMC client options, or None for plain SGD on the data loss.
      hooks: client hooks in `collect_hooks` order; `hook_states` are their states.

    The returned function is pure and written for one client; `teacher` is ignored when
    `spmc` is None (pass the global variables).
    """
    one_step = make_client_step(
        model,
        transform,
        optimizer,
        batch_size=batch_size,
        data_attack=data_attack,
        spmc=spmc,
        hooks=hooks,
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
    """`local_train` of `make_local_train`, looping an existing `make_client_step` step.

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
        variables: PyTree,
        teacher: PyTree,
        data: ClientData,
        task: ClientTask,
        attack_on: jax.Array,
        hook_states: tuple[PyTree, ...] = (),
    ) -> LocalResult:
        opt_state = optimizer.init(variables["params"])
        n_batches = task.size // batch_size
        # Hooks see the round's global parameters: the client's starting point.
        inputs = HookInputs(variables["params"], tuple(hook_states), jnp.int32(0), epochs)

        def epoch(carry, e):
            perm, k_steps = epoch_order(task, e)
            extra = (inputs._replace(epoch=e),) if hook_states else ()

            def step(c):
                s, (variables, opt_state, loss_sum, proj_sum) = c
                out = one_step(
                    variables, opt_state, teacher, data, task, attack_on, perm, k_steps, s, *extra
                )
                sums = (loss_sum + out.loss, proj_sum + out.projected)
                return s + 1, (out.variables, out.opt_state, *sums)

            # Exactly this client's full batches: a while loop, not a scan over the largest
            # client's count. One client at a time (the CPU path) runs only its own steps
            # (Dirichlet MNIST: 840 steps, not 1340; issue 14). Under vmap (a chunk of
            # clients) the loop runs the chunk's largest count, the clients already done
            # keeping their carry, so the engine groups clients of similar counts into a
            # chunk (`engine.SORT_CHUNKS_BY_STEPS`).
            n = jnp.minimum(n_batches, steps_per_epoch)
            _, carry = jax.lax.while_loop(
                lambda c: c[0] < n, step, (jnp.zeros((), jnp.int32), carry)
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
