"""Optimizers for LoRA: what is frozen, LoRA+ learning rates and weight decay where it belongs."""

from __future__ import annotations

import re
from collections.abc import Callable

import jax
import optax

from flaxlora import pytree
from flaxlora.lora.config import LoraConfig
from flaxlora.pytree import PyTree

ScalarOrSchedule = float | Callable[[int], float]


def trainable_mask(params: PyTree, config: LoraConfig) -> PyTree:
    """Bool tree like ``params``: True where ``config.trainable`` selects a leaf (trained in full)."""
    pattern = config.trainable
    return jax.tree_util.tree_map_with_path(
        lambda p, _: bool(pattern) and re.search(pattern, pytree.path_str(p)) is not None, params
    )


def freeze_labels(params: PyTree, config: LoraConfig) -> PyTree:
    """``"trainable"`` / ``"frozen"`` labels for ``optax.multi_transform`` over the full params tree.

    Example (the classic masked form; :mod:`flaxlora.training` instead differentiates only the
    trainable tree)::

        labels = {"params": freeze_labels(params, cfg), "lora": jax.tree.map(lambda _: "trainable", lora)}
        tx = optax.multi_transform({"trainable": optax.adamw(1e-3), "frozen": optax.set_to_zero()}, labels)
    """
    return jax.tree.map(lambda t: "trainable" if t else "frozen", trainable_mask(params, config))


def _adapter_paths(flat: dict[str, object]) -> set[str]:
    """Paths of adapter dicts: nodes holding both an ``a`` and a ``b`` leaf."""
    parents = {p.rpartition("/")[0] for p in flat if p.endswith("/a") or p == "a"}
    return {p for p in parents if (f"{p}/b" if p else "b") in flat}


def adapter_labels(tree: PyTree) -> PyTree:
    """Label every leaf of a trainable tree for :func:`lora_optimizer`.

    ``"lora_a"``, ``"lora_b"``, ``"magnitude"`` for adapter leaves (found as dicts holding both
    ``a`` and ``b``, wherever they sit in ``tree``); other leaves are ``"decay"`` (>= 2 axes:
    kernels) or ``"no_decay"`` (biases, norm scales).
    """
    flat = pytree.flatten(tree)
    adapters = _adapter_paths(flat)

    def label(key_path, leaf):
        parent, _, name = pytree.path_str(key_path).rpartition("/")
        if parent in adapters and name in ("a", "b", "magnitude"):
            return {"a": "lora_a", "b": "lora_b", "magnitude": "magnitude"}[name]
        return "decay" if leaf.ndim >= 2 else "no_decay"

    return jax.tree_util.tree_map_with_path(label, tree)


def lora_optimizer(
    learning_rate: ScalarOrSchedule,
    *,
    loraplus_ratio: float = 1.0,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """AdamW for a trainable tree of adapters and fully trained extras.

    Args:
      learning_rate: a float or an optax schedule.
      loraplus_ratio: LoRA+ (Hayou et al. 2024): ``b`` learns ``loraplus_ratio`` times faster than
        ``a`` (1.0 = plain LoRA; the paper suggests 2-16).
      weight_decay: decoupled decay on ``a``, ``b`` and extra kernels; never on DoRA magnitudes,
        biases or norm scales.
      max_grad_norm: clip the global gradient norm first, if given.
    """
    if loraplus_ratio <= 0:
        raise ValueError(f"loraplus_ratio must be > 0, got {loraplus_ratio}")

    def scaled(factor: float) -> ScalarOrSchedule:
        if callable(learning_rate):
            return lambda count: factor * learning_rate(count)
        return factor * learning_rate

    def adamw(lr: ScalarOrSchedule, decay: float) -> optax.GradientTransformation:
        return optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=decay)

    transforms = {
        "lora_a": adamw(learning_rate, weight_decay),
        "lora_b": adamw(scaled(loraplus_ratio), weight_decay),
        "magnitude": adamw(learning_rate, 0.0),
        "decay": adamw(learning_rate, weight_decay),
        "no_decay": adamw(learning_rate, 0.0),
    }
    tx = optax.multi_transform(transforms, adapter_labels)
    if max_grad_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(max_grad_norm), tx)
    return tx
