"""Scanned layer stacks: one stacked copy of a layer's params instead of one copy per layer.

With ``scan_layers`` in a model's config, :class:`~flaxlora.models.layers.Stack` runs its layers
with ``nn.scan``: XLA compiles one layer instead of all of them, and the params of the stack
live under ``.../<stack>/scanned/...`` with a leading layer axis (logical axis ``layers``). The
unrolled layout (``.../<stack>/0/...``, ``.../<stack>/1/...``: Hugging Face's) is the one
checkpoints of the base model, PEFT adapters and merged exports use; these two functions map
between them.

    stack_layers(unrolled)       {"layer": {"0": {"w": (3,)}, "1": {"w": (3,)}}} -> {"layer": {"scanned": {"w": (2, 3)}}}
    unstack_layers(stacked)      the inverse
    layer_paths(path, shape)     ("layer", "scanned", "w"), (2, 3) -> [("layer", "0", "w"), ("layer", "1", "w")]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

SCANNED = "scanned"  # the child of a scanned Stack holding the stacked params
# LoraConfig.stack_axes for the targets of a scanned model: one leading (layer) axis.
SCANNED_STACK_AXES = {f"/{SCANNED}/": 1}


def _is_layer_dict(node: Any) -> bool:
    return (isinstance(node, dict) and bool(node)
            and sorted(node) == sorted(map(str, range(len(node))))
            and len({jax.tree.structure(v) for v in node.values()}) == 1)


def stack_layers(tree: Any, *, like: Any) -> Any:
    """``tree`` (unrolled) in the layout of ``like`` (a tree of a scanned model, e.g. its params
    or their shapes): every ``{"0": t0, "1": t1, ...}`` where ``like`` has ``{"scanned": t}``
    becomes ``{"scanned": stack(t0, t1, ...)}``; other nodes are kept."""
    if not isinstance(tree, dict):
        return tree
    if isinstance(like, dict) and set(like) == {SCANNED} and _is_layer_dict(tree):
        layers = [tree[str(i)] for i in range(len(tree))]
        return {SCANNED: jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}
    return {k: stack_layers(v, like=like.get(k) if isinstance(like, dict) else None) for k, v in tree.items()}


def unstack_layers(tree: Any) -> Any:
    """Every ``{"scanned": t}`` of ``tree`` (leaves with a leading layer axis) becomes
    ``{"0": t[0], "1": t[1], ...}``: the unrolled layout."""
    if not isinstance(tree, dict):
        return tree
    if set(tree) == {SCANNED}:
        stacked = tree[SCANNED]
        n = len(jax.tree.leaves(stacked)[0])
        return {str(i): jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)}
    return {k: unstack_layers(v) for k, v in tree.items()}


def layer_paths(path: tuple[str, ...], shape: tuple[int, ...]) -> list[tuple[str, ...]]:
    """The unrolled path of each layer's slice of the param at ``path`` (``(..., "scanned", ...)``,
    of ``shape``: layers on its leading axis), ``(..., "0", ...)``, ``(..., "1", ...)``, in layer
    order; ``[path]`` for a param outside a scanned stack."""
    if SCANNED not in path:
        return [path]
    return [tuple(str(i) if part == SCANNED else part for part in path) for i in range(shape[0])]


def scanned_config(config: Any, *, quantized: bool = False) -> Any:
    """``config`` (a :mod:`flaxlora.models.config` dataclass) with ``scan_layers`` on.

    Raises ValueError for T5 (its first block holds the relative position bias the others lack,
    so its blocks differ) and for quantized weights (kept layer by layer as read).
    """
    if not any(f.name == "scan_layers" for f in dataclasses.fields(config)):
        raise ValueError(f"--scan-layers: {config.model_type}'s blocks differ (the first holds the relative position "
                         "bias) and cannot be stacked; it applies to BERT/RoBERTa and Llama: drop --scan-layers")
    if quantized:
        raise ValueError("--scan-layers with --quantize: quantized weights are kept layer by layer as read; drop one")
    return dataclasses.replace(config, scan_layers=True)
