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


def make_eval_step(model: nn.Module | Logits, mesh: Mesh | None = None, param_shardings: PyTree = None):
    """``step(params, batch, totals) -> totals``, jitted; ``totals = (counts (4,), loss_sum, weight_sum)``.

    model: a classifier module, or ``logits(params, batch)``.
    """
    forward = model_logits(model) if isinstance(model, nn.Module) else model

    def step(params, batch, totals):
        logits = forward(params, batch)
        loss, weight = weighted_cross_entropy(logits, batch["labels"], batch["weights"])
        counts = confusion_counts(logits, batch["labels"], batch["weights"])
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
) -> dict[str, float]:
    """Metrics of ``model`` with ``params`` over ``batches`` (dicts with a ``weights`` row mask).

    Returns accuracy, f1, mcc, precision, recall, loss (weighted mean) and n (examples counted).
    Pass ``step`` from :func:`make_eval_step` to reuse its compilation across calls.
    """
    step = step or make_eval_step(model, mesh, param_shardings)
    totals = (jnp.zeros(4, jnp.float32), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    for batch in batches:
        batch = sharding.global_batch(batch, mesh) if mesh is not None else dict(batch)
        totals = step(params, batch, totals)
    counts, loss, weight = jax.device_get(totals)
    result = {k: float(v) for k, v in metrics_from_counts(counts).items()}
    result["loss"] = float(loss / max(weight, 1.0))
    result["n"] = int(round(float(weight)))
    return result
