"""Address the leaves of a pytree by their '/'-joined key paths.

LoRA targets, trainable extras and adapters are all named by these paths, so the same code
serves flax.linen params dicts (``'encoder/layer/0/attention/self/query/kernel'``) and flax.nnx
state from ``nnx.split`` (whose trailing ``value`` attribute is dropped from the name). Names
come from ``jax.tree_util.keystr(simple=True, separator="/")``; nesting back from
``flax.traverse_util.unflatten_dict``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
from flax import traverse_util

PyTree = Any


def path_str(key_path: tuple[Any, ...]) -> str:
    """'/'-joined name of a jax key path; an nnx Variable's trailing ``value`` is dropped."""
    if key_path and isinstance(key_path[-1], jax.tree_util.GetAttrKey) and key_path[-1].name == "value":
        key_path = key_path[:-1]
    return jax.tree_util.keystr(key_path, simple=True, separator="/")


def is_weight(x: Any) -> bool:
    """A quantized weight (:class:`flaxlora.quant.QuantizedArray`) is one leaf here, not its codes."""
    return getattr(x, "is_quantized_weight", False) is True


def flatten(tree: PyTree) -> dict[str, Any]:
    """``{path: leaf}`` for every leaf of ``tree`` (a quantized weight is one leaf), in tree order."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_weight)
    return {path_str(p): leaf for p, leaf in leaves}


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Nested plain dicts from ``{path: leaf}`` (the inverse of :func:`flatten` for dict trees)."""
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def replace(tree: PyTree, flat: Mapping[str, Any]) -> PyTree:
    """``tree`` with the leaves named in ``flat`` replaced; structure and other leaves unchanged."""
    return jax.tree_util.tree_map_with_path(lambda p, x: flat.get(path_str(p), x), tree, is_leaf=is_weight)


def select(tree: PyTree, paths: Iterable[str]) -> dict[str, Any]:
    """Nested dict holding only the leaves of ``tree`` at ``paths``."""
    flat = flatten(tree)
    return unflatten({p: flat[p] for p in paths})
