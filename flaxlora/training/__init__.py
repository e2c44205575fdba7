"""Task-agnostic training of a sequence(-pair) classifier with LoRA on a device mesh.

    step.py         TrainState, the jitted sharded train step (one adapter or K members), learning-rate schedule
    compile.py      the persistent compilation cache; programs compiled up front, concurrently, and counted
    sharding.py     the (data, fsdp, tensor) mesh; where batches and weights are placed
    distributed.py  several processes, one mesh (jax.distributed, gloo on CPUs)
    evaluation.py   the jitted evaluation loop (accuracy, F1, MCC, loss)
    metrics.py      weighted cross-entropy and confusion-count metrics, usable under jit
    checkpoint.py   orbax checkpoints of the train state (import it as a module: orbax is heavy)

A classifier is any linen module called as ``model.apply({"params": p}, input_ids,
attention_mask, token_type_ids, deterministic=...) -> (batch, classes)``; a batch is a dict of
``input_ids``, ``attention_mask``, ``token_type_ids`` (batch, len), ``labels`` and ``weights``
(batch,), as :mod:`flaxlora.data` makes them.
"""

from flaxlora.training.evaluation import evaluate, make_eval_step
from flaxlora.training.metrics import (
    confusion_counts,
    metrics_from_counts,
    weighted_cross_entropy,
)
from flaxlora.training.sharding import make_mesh, parse_mesh
from flaxlora.training.step import (
    StepOptions,
    TrainState,
    all_finite,
    init_member_states,
    init_train_state,
    jit_members_step,
    jit_train_step,
    learning_rate_schedule,
    logits_fn,
    train_members_step,
    train_step,
)

__all__ = [
    "StepOptions",
    "TrainState",
    "all_finite",
    "confusion_counts",
    "evaluate",
    "init_member_states",
    "init_train_state",
    "jit_members_step",
    "jit_train_step",
    "learning_rate_schedule",
    "logits_fn",
    "make_eval_step",
    "make_mesh",
    "metrics_from_counts",
    "parse_mesh",
    "train_members_step",
    "train_step",
    "weighted_cross_entropy",
]
