"""The LoRA training step: differentiate the trainable tree only, jitted with explicit shardings.

A classifier here is a linen module called as ``model.apply({"params": p}, input_ids,
attention_mask, token_type_ids, deterministic=..., rngs=...) -> logits (batch, classes)``, like
:mod:`flaxlora.models`. The train state holds the adapters, the fully trained extras and the
optimizer state; the frozen base params are a separate argument that the loss closes over, so
no gradient is ever formed for them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh

from flaxlora import pytree
from flaxlora.lora.adapters import apply_lora, init_adapter, with_extras
from flaxlora.lora.config import LoraConfig
from flaxlora.lora.factored import apply_factored
from flaxlora.lora.targets import resolve_targets, trainable_paths
from flaxlora.lora.variants import RESIDUAL_INITS
from flaxlora.pytree import PyTree
from flaxlora.quant.dense import quantized_dense
from flaxlora.training import sharding
from flaxlora.training.metrics import weighted_cross_entropy

Batch = dict[str, jax.Array]
LogitsFn = Callable[[PyTree, PyTree, Batch, "jax.Array | None"], jax.Array]


class TrainState(struct.PyTreeNode):
    """Everything that changes during training.

    ``trainable`` is ``{"lora": adapter tree, "extras": fully trained params}``; ``rng`` holds
    the raw key data of the step keys (step ``i`` uses ``fold_in(rng, i)``, so a resumed run
    draws the same dropout masks); ``skipped_in_a_row`` () int32 counts the updates skipped in a
    row for a non-finite loss or gradient up to now (not checkpointed: a resumed run counts from 0).
    """

    step: jax.Array
    trainable: PyTree
    opt_state: PyTree
    rng: jax.Array
    skipped_in_a_row: jax.Array


def init_train_state(
    params: PyTree,
    config: LoraConfig,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    mesh: Mesh | None = None,
) -> tuple[TrainState, PyTree]:
    """``(state, frozen)``: a fresh adapter and optimizer, and the frozen base.

    Runs jitted, under ``mesh`` if given, where every new array is created in its final sharding
    (:func:`state_shardings`; a PiSSA/OLoRA residual in its weight's), so no device ever holds
    more than its shards. ``frozen`` is ``params`` less the fully trained extras (held once, in
    float32, in ``state.trainable["extras"]``; :func:`~flaxlora.lora.adapters.with_extras` puts
    them back), with the residual ``W - s a@b`` at the targets for PiSSA/OLoRA.
    """
    init = _state_initializer(params, config, tx)
    shardings = None
    if mesh is not None:
        state_shape, residuals_shape = jax.eval_shape(init, params, rng)
        shardings = _init_shardings(params, tx, mesh, state_shape, residuals_shape)
    state, residuals = jax.jit(init, out_shardings=shardings)(params, rng)
    return state, _frozen(params, config, residuals)


def init_member_states(
    params: PyTree,
    config: LoraConfig,
    tx: optax.GradientTransformation,
    seeds: Sequence[int],
    mesh: Mesh | None = None,
    extras: Sequence[dict[str, jax.Array]] | None = None,
) -> tuple[tuple[TrainState, ...], PyTree]:
    """``(states, frozen)``: K = ``len(seeds)`` members on one frozen base, member i's state
    :func:`init_train_state`'s with ``jax.random.key(seeds[i])``, all made by one program.

    extras: per member, ``{path: value}`` of fully trained params that start from another value
    than ``params`` holds (e.g. each member's classifier, initialised from its own seed).
    PiSSA/OLoRA inits (a residual base per member) are refused for K > 1.
    """
    if config.init in RESIDUAL_INITS and len(seeds) > 1:
        raise ValueError(f"init {config.init!r} gives each member its own residual base: members need one frozen base")
    init = _state_initializer(params, config, tx)

    def member(params: PyTree, seed: jax.Array, own: dict[str, jax.Array]) -> tuple[TrainState, PyTree]:
        state, residuals = init(params, jax.random.key(seed))
        flat = pytree.flatten(state.trainable["extras"])
        flat.update({p: v.astype(flat[p].dtype) for p, v in own.items()})
        return state.replace(trainable={**state.trainable, "extras": pytree.unflatten(flat)}), residuals

    def states(params: PyTree, seeds: jax.Array, extras: list[dict[str, jax.Array]]):
        if len(seeds) == 1:
            state, residuals = member(params, seeds[0], extras[0])
            return (state,), residuals
        stacked_extras = {p: jnp.stack([e[p] for e in extras]) for p in extras[0]}
        stacked, residuals = jax.vmap(member, in_axes=(None, 0, 0))(params, seeds, stacked_extras)
        return unstack(stacked, len(seeds)), jax.tree.map(lambda x: x[0], residuals)

    extras = list(extras) if extras else [{} for _ in seeds]
    if len(extras) != len(seeds) or any(set(e) != set(extras[0]) for e in extras):
        raise ValueError(f"extras: one dict per member ({len(seeds)}), all with the same paths")
    shardings = None
    if mesh is not None:
        state_shape, residuals_shape = jax.eval_shape(lambda p: init(p, jax.random.key(0)), params)
        state_sharding, residual_sharding = _init_shardings(params, tx, mesh, state_shape, residuals_shape)
        shardings = ((state_sharding,) * len(seeds), residual_sharding)
    members, residuals = jax.jit(states, out_shardings=shardings)(params, np.asarray(seeds, np.uint32), extras)
    return members, _frozen(params, config, residuals)


def _state_initializer(params: PyTree, config: LoraConfig, tx: optax.GradientTransformation):
    """``init(params, key) -> (state, {path: PiSSA/OLoRA residual})``, to be jitted."""
    extras_paths = trainable_paths(params, config)
    residual_paths = list(resolve_targets(params, config)) if config.init in RESIDUAL_INITS else []

    def init(params: PyTree, rng: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        init_rng, step_rng = jax.random.split(rng)
        base, lora = init_adapter(params, config, init_rng)
        flat = pytree.flatten(base)
        trainable = {"lora": lora, "extras": pytree.unflatten({p: flat[p].astype(jnp.float32) for p in extras_paths})}
        state = TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=tx.init(trainable),
                           rng=jax.random.key_data(step_rng), skipped_in_a_row=jnp.zeros((), jnp.int32))
        return state, {p: flat[p] for p in residual_paths}

    return init


def _init_shardings(params: PyTree, tx: optax.GradientTransformation, mesh: Mesh, state_shape: TrainState,
                    residuals_shape: dict[str, jax.ShapeDtypeStruct]):
    """(state shardings, {path: residual sharding}): the state per :func:`state_shardings`, a
    residual in its weight's sharding."""
    placed = pytree.flatten(jax.tree.map(lambda x: x.sharding, params))
    return state_shardings(state_shape, tx, mesh, placed), {p: placed[p] for p in residuals_shape}


def _frozen(params: PyTree, config: LoraConfig, residuals: dict[str, jax.Array]) -> PyTree:
    """``params`` less the fully trained extras, with the residuals at their paths."""
    extras_paths = set(trainable_paths(params, config))
    flat = {**pytree.flatten(params), **residuals}
    return pytree.unflatten({p: x for p, x in flat.items() if p not in extras_paths})


def stack(states: Sequence[TrainState]) -> TrainState:
    """Members' states as one, each leaf with a leading member axis (inside jit: one copy of small trees)."""
    return jax.tree.map(lambda *x: jnp.stack(x), *states)


def unstack(stacked: TrainState, members: int) -> tuple[TrainState, ...]:
    """The inverse of :func:`stack`."""
    return tuple(jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(members))


def state_shardings(state: TrainState, tx: optax.GradientTransformation, mesh: Mesh,
                    param_shardings: dict[str, jax.sharding.Sharding]) -> TrainState:
    """Where each part of ``state`` (arrays or shapes) lives on ``mesh``: the fully trained extras
    and their optimizer moments sharded like the weights they train (FSDP for full fine-tuning),
    adapters, step and key replicated (they are small).

    param_shardings: ``{path: sharding}`` of the model's params.
    """
    rep = sharding.replicated(mesh)
    trainable = {
        "lora": jax.tree.map(lambda _: rep, state.trainable["lora"]),
        "extras": jax.tree_util.tree_map_with_path(lambda p, _: param_shardings[pytree.path_str(p)],
                                                   state.trainable["extras"]),
    }
    # An optimizer-state leaf that copies a trainable leaf (AdamW's moments) ends in its path and
    # has its shape: it takes that leaf's sharding. (optax.tree_map_params cannot see through
    # multi_transform's masked states.)
    by_path = {p: (s, state_shape) for (p, s), state_shape in zip(
        pytree.flatten(trainable).items(), pytree.flatten(state.trainable).values())}

    def like_param(path, leaf) -> jax.sharding.Sharding:
        parts = pytree.path_str(path).split("/")
        for i in range(len(parts)):
            match = by_path.get("/".join(parts[i:]))
            if match and tuple(match[1].shape) == tuple(leaf.shape):
                return match[0]
        return rep

    opt_state = jax.tree_util.tree_map_with_path(like_param, state.opt_state)
    return TrainState(step=rep, trainable=trainable, opt_state=opt_state, rng=rep, skipped_in_a_row=rep)


LORA_PATHS = ("merged", "factored")
DECAYS = ("linear", "cosine")


def check_lora_path(lora_path: str, config: LoraConfig) -> None:
    """ValueError unless ``lora_path`` is one of ``LORA_PATHS`` and can apply ``config``."""
    if lora_path not in LORA_PATHS:
        raise ValueError(f"lora_path must be one of {LORA_PATHS}, got {lora_path!r}")
    if lora_path == "merged" and config.dropout > 0:
        raise ValueError("LoRA dropout acts on the adapter's input: use lora_path='factored' with dropout > 0")


def check_decay(decay: str) -> None:
    if decay not in DECAYS:
        raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")


def logits_fn(model: nn.Module, config: LoraConfig, lora_path: str = "factored") -> LogitsFn:
    """``f(frozen, trainable, batch, rng) -> logits (batch, classes)``; ``rng=None`` evaluates.

    lora_path: ``"factored"`` computes ``x@W + s (dropout(x)@a)@b``: it never copies a weight, and
    the backward pass forms only the input gradient of a frozen ``W`` (no weight-sized gradient);
    ``"merged"`` forms ``W + s a@b`` once per call and back-propagates a weight-sized gradient
    into it (no LoRA dropout; also for targets that are not Dense kernels, e.g. embeddings).
    """
    check_lora_path(lora_path, config)

    def apply(frozen: PyTree, trainable: PyTree, batch: Batch, rng: jax.Array | None = None) -> jax.Array:
        args = (batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        deterministic = rng is None
        model_rng, lora_rng = (None, None) if deterministic else jax.random.split(rng)
        kwargs = dict(deterministic=deterministic, rngs={} if deterministic else {"dropout": model_rng})
        base = with_extras(frozen, trainable["extras"])
        if lora_path == "merged":
            with quantized_dense():  # a quantized frozen kernel that is no target: x @ deq(W)
                return model.apply({"params": apply_lora(base, trainable["lora"], config)}, *args, **kwargs)
        return apply_factored(model, {"params": base}, trainable["lora"], config, *args, lora_rng=lora_rng, **kwargs)

    return apply


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """Static options of the train step.

    accum_steps: micro-batches per step (gradient accumulation); the batch splits along axis 0
      and the step's gradient is the weighted mean over all of them, as one big batch would give.
    label_smoothing: cross-entropy label smoothing.
    rdrop: R-Drop (Liang et al. 2021): each example runs through the model twice, with two dropout
      masks, and the loss is the mean of the two cross-entropies plus ``rdrop`` times their
      predictions' symmetric KL divergence (half of KL(p1||p2) + KL(p2||p1)); 0: one pass.
    max_skipped_steps: once this many updates in a row were skipped (non-finite), the step
      leaves the state as it is, its step counter too: the run has stopped where it diverged,
      and the host, which reads ``skipped_in_a_row`` only when it logs, finds it there. None: never.
    learning_rate: the optimizer's schedule, reported as the metric ``lr`` of each step (computed
      on the device, so the host reads it with the other metrics).
    """

    accum_steps: int = 1
    label_smoothing: float = 0.0
    rdrop: float = 0.0
    max_skipped_steps: int | None = None
    learning_rate: optax.Schedule | None = None

    def __post_init__(self):
        if self.accum_steps < 1:
            raise ValueError(f"accum_steps must be >= 1, got {self.accum_steps}")
        if not 0 <= self.rdrop < float("inf"):
            raise ValueError(f"rdrop must be >= 0 and finite, got {self.rdrop}")
        if self.max_skipped_steps is not None and self.max_skipped_steps < 1:
            raise ValueError(f"the limit of skipped steps in a row must be >= 1, got {self.max_skipped_steps}")

    def halted(self, state: TrainState) -> jax.Array:
        """() bool: ``state`` has reached ``max_skipped_steps`` (False without a limit)."""
        if self.max_skipped_steps is None:
            return jnp.zeros((), bool)
        return state.skipped_in_a_row >= self.max_skipped_steps


def train_step(
    state: TrainState,
    frozen: PyTree,
    batch: Batch,
    *,
    apply: LogitsFn,
    tx: optax.GradientTransformation,
    options: StepOptions = StepOptions(),
    halted: jax.Array | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on ``batch`` (leading axis: examples); returns the new state and metrics
    ``loss``, ``grad_norm``, ``skipped`` (the update was not applied) and ``lr`` (with
    ``options.learning_rate``). ``halted`` (default ``options.halted(state)``): leave ``state`` as it is."""
    step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    halted = options.halted(state) if halted is None else halted

    def micro_grads(carry, xs):
        micro, rng = xs

        def cross_entropy(logits):
            return weighted_cross_entropy(logits, micro["labels"], micro["weights"], options.label_smoothing)

        def loss_sum(trainable):
            if not options.rdrop:
                return cross_entropy(apply(frozen, trainable, micro, rng))
            first, second = (apply(frozen, trainable, micro, r) for r in jax.random.split(rng))
            (loss1, weight), (loss2, _) = cross_entropy(first), cross_entropy(second)
            return (loss1 + loss2) / 2 + options.rdrop * symmetric_kl(first, second, micro["weights"]), weight

        (loss, weight), grads = jax.value_and_grad(loss_sum, has_aux=True)(state.trainable)
        total_loss, total_weight, total_grads = carry
        return (total_loss + loss, total_weight + weight, jax.tree.map(jnp.add, total_grads, grads)), None

    n = options.accum_steps
    # Strided micro-batches (rows i, i + n, ...): each stays split over all the devices that hold
    # the batch, where contiguous blocks would each sit on 1/n of them and force all-gathers.
    micro_batches = jax.tree.map(lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), batch)
    zeros = jax.tree.map(jnp.zeros_like, state.trainable)
    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
    (loss, weight, grads), _ = jax.lax.scan(micro_grads, init, (micro_batches, jax.random.split(step_rng, n)))
    weight = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    loss, grad_norm = loss / weight, optax.tree.norm(grads)
    # A non-finite loss, gradient or result skips the update: params and optimizer state stay as
    # they were, only the step advances (its batch is consumed). optax.apply_if_finite checks the
    # gradient only and applies the update anyway after a number of failures; here the run stops
    # instead (options.max_skipped_steps), and the state never holds a non-finite value.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(trainable)
    ok = finite & ~halted
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
    new_state = state.replace(
        step=jnp.where(halted, state.step, state.step + 1),
        trainable=keep(trainable, state.trainable),
        opt_state=keep(opt_state, state.opt_state),
        skipped_in_a_row=jnp.where(halted, state.skipped_in_a_row, jnp.where(finite, 0, state.skipped_in_a_row + 1)),
    )
    metrics = {"loss": loss, "grad_norm": grad_norm, "skipped": ~ok}
    if options.learning_rate is not None:
        metrics["lr"] = jnp.asarray(options.learning_rate(state.step), jnp.float32)
    return new_state, metrics


def train_members_step(
    states: tuple[TrainState, ...],
    frozen: PyTree,
    batch: Batch,
    *,
    apply: LogitsFn,
    tx: optax.GradientTransformation,
    options: StepOptions = StepOptions(),
) -> tuple[tuple[TrainState, ...], dict[str, jax.Array]]:
    """:func:`train_step` of K members on one frozen base and one batch: their states stacked on a
    leading member axis and the step vmapped over it, so every frozen weight is read once for all
    (the base's matmuls take the members' activations as one batch). Metrics are (K,); one state
    (K = 1) is stepped as it is, metrics scalars. When one member reaches ``max_skipped_steps``, all halt."""
    if len(states) == 1:
        state, metrics = train_step(states[0], frozen, batch, apply=apply, tx=tx, options=options)
        return (state,), metrics
    stacked = stack(states)
    halted = jnp.any(jax.vmap(options.halted)(stacked))
    step = lambda s: train_step(s, frozen, batch, apply=apply, tx=tx, options=options, halted=halted)  # noqa: E731
    stepped, metrics = jax.vmap(step)(stacked)
    return unstack(stepped, len(states)), metrics


def symmetric_kl(logits1: jax.Array, logits2: jax.Array, weights: jax.Array) -> jax.Array:
    """() sum over examples, weighted, of (KL(p1 || p2) + KL(p2 || p1)) / 2 between the
    softmaxes of two (batch, classes) logits."""
    log_p, log_q = (jax.nn.log_softmax(x.astype(jnp.float32), axis=-1) for x in (logits1, logits2))
    kl = jnp.sum((jnp.exp(log_p) - jnp.exp(log_q)) * (log_p - log_q), axis=-1) / 2
    return jnp.sum(kl * weights)


def all_finite(tree: PyTree) -> jax.Array:
    """() bool: every value of every leaf of ``tree`` is finite."""
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def jit_train_step(
    apply: LogitsFn,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    state: TrainState,
    frozen: PyTree,
    options: StepOptions = StepOptions(),
):
    """``train_step`` jitted over ``mesh``: ``state`` and ``frozen`` (arrays) stay in the shardings
    they have (see :func:`init_train_state`), the batch is split over (data, fsdp); the old state's
    buffers are donated.

    Returns ``(step_fn, state_shardings)``; call ``step_fn(state, frozen, batch)``.
    """
    step = functools.partial(train_step, apply=apply, tx=tx, options=options)
    return _jit_step(step, mesh, state, frozen), jax.tree.map(lambda x: x.sharding, state)


def jit_members_step(
    apply: LogitsFn,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    states: tuple[TrainState, ...],
    frozen: PyTree,
    options: StepOptions = StepOptions(),
):
    """``train_members_step`` jitted over ``mesh`` as :func:`jit_train_step` jits ``train_step``:
    call ``step_fn(states, frozen, batch)``."""
    step = functools.partial(train_members_step, apply=apply, tx=tx, options=options)
    return _jit_step(step, mesh, states, frozen)


def _jit_step(step: Callable, mesh: Mesh, state: PyTree, frozen: PyTree):
    state_shardings, frozen_shardings = jax.tree.map(lambda x: x.sharding, (state, frozen))
    return jax.jit(
        step,
        in_shardings=(state_shardings, frozen_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


def learning_rate_schedule(peak: float, total_steps: int, warmup_steps: int, decay: str = "linear") -> optax.Schedule:
    """Linear warmup to ``peak``, then ``"linear"`` or ``"cosine"`` decay to 0 at ``total_steps``."""
    check_decay(decay)
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    rest = max(total_steps - warmup_steps, 1)
    after = optax.linear_schedule(peak, 0.0, rest) if decay == "linear" else optax.cosine_decay_schedule(peak, rest)
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps), after], [warmup_steps])
