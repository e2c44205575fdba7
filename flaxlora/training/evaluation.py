"""Jitted evaluation: accuracy, F1 (positive class), MCC and loss over a bucketed eval set.

Evaluate a model with merged params (:func:`flaxlora.merge`: the adapter costs nothing at
inference), or, during training, any ``logits(params, batch)`` such as the train step's own
forward on ``(frozen, trainable)`` (no merged copy of the model). Confusion counts and loss sums
stay on device across batches; the host syncs once at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from flaxlora.pytree import PyTree
from flaxlora.training import sharding
from flaxlora.training.metrics import (
    confusion_counts,
    metrics_from_counts,
    weighted_cross_entropy,
)

Logits = Callable[[PyTree, Mapping[str, jax.Array]], jax.Array]


def model_logits(model: nn.Module) -> Logits:
    """``logits(params, batch) -> (batch, classes)`` of a :mod:`flaxlora.models` classifier."""
    return lambda params, batch: model.apply(
        {"params": params}, batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), deterministic=True
    )


def ensemble_logits(logits: jax.Array) -> jax.Array:
    """(members, batch, classes) -> (batch, classes): the log of the members' mean class
    probabilities (an ensemble's scores: softmax gives the mean back)."""
    return jnp.log(jnp.mean(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), axis=0))


def eval_totals(members: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zero totals for :func:`make_eval_step`: ``(counts (4,), loss sum (), weight sum ())``; for
    ``members`` K, counts (K+1, 4) and loss sums (K+1,): the members', then their ensemble's."""
    rows = () if members is None else (members + 1,)
    return np.zeros((*rows, 4), np.float32), np.zeros(rows, np.float32), np.zeros((), np.float32)


def make_eval_step(model: nn.Module | Logits, mesh: Mesh | None = None, param_shardings: PyTree = None,
                   members: bool = False):
    """``step(params, batch, totals) -> totals``, jitted; totals as :func:`eval_totals` makes them.

    model: a classifier module, or ``logits(params, batch)``; with ``members``, ``logits`` returns
    (K, batch, classes) and each member is counted, then their ensemble (:func:`ensemble_logits`).
    """
    forward = model_logits(model) if isinstance(model, nn.Module) else model

    def step(params, batch, totals):
        logits = forward(params, batch)
        labels, weights = batch["labels"], batch["weights"]
        if members:
            logits = jnp.concatenate([logits.astype(jnp.float32), ensemble_logits(logits)[None]])
            loss, weight = jax.vmap(lambda x: weighted_cross_entropy(x, labels, weights))(logits)
            counts, weight = jax.vmap(lambda x: confusion_counts(x, labels, weights))(logits), weight[0]
        else:
            loss, weight = weighted_cross_entropy(logits, labels, weights)
            counts = confusion_counts(logits, labels, weights)
        return totals[0] + counts, totals[1] + loss, totals[2] + weight

    if mesh is None:
        return jax.jit(step, donate_argnums=(2,))
    rep = sharding.replicated(mesh)
    totals = (rep, rep, rep)
    return jax.jit(step, in_shardings=(param_shardings, sharding.batch_sharding(mesh), totals),
                   out_shardings=totals, donate_argnums=(2,))


def evaluate(
    model: nn.Module | Logits,
    params: PyTree,
    batches: Iterable[Mapping[str, np.ndarray]],
    mesh: Mesh | None = None,
    param_shardings: PyTree = None,
    step=None,
    members: int | None = None,
) -> dict[str, float] | list[dict[str, float]]:
    """Metrics of ``model`` with ``params`` over ``batches`` (dicts with a ``weights`` row mask).

    Returns accuracy, f1, mcc, precision, recall, loss (weighted mean) and n (examples counted);
    for ``members`` K (``model`` returns (K, batch, classes)) a list of K + 1 such dicts: the
    members', then their ensemble's. Pass ``step`` from :func:`make_eval_step` (or one compiled
    ahead per batch shape: ``{batch length: compiled}``) to reuse its compilation across calls.
    """
    step = step or make_eval_step(model, mesh, param_shardings, members=members is not None)
    totals = eval_totals(members)
    for batch in batches:
        batch = sharding.global_batch(batch, mesh) if mesh is not None else dict(batch)
        run = step[batch["input_ids"].shape[1]] if isinstance(step, Mapping) else step
        totals = run(params, batch, totals)
    counts, losses, weight = jax.device_get(totals)
    metrics = metrics_from_counts(counts)
    n = int(round(float(weight)))
    rows = [{**{k: float(v[i] if members is not None else v) for k, v in metrics.items()},
             "loss": float((losses[i] if members is not None else losses) / max(weight, 1.0)), "n": n}
            for i in range(1 if members is None else members + 1)]
    return rows[0] if members is None else rows
