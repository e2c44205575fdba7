"""Parameter paths: name every leaf of a pytree by its '/'-joined key path.

LoRA targets, trainable extras and adapters are all addressed by these paths, so the same code
serves flax.linen params dicts (``'encoder/layer/0/attention/self/query/kernel'``) and flax.nnx
state from ``nnx.split`` (whose trailing ``.value`` attribute is dropped from the name).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax

PyTree = Any


def _key_name(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_str(key_path: tuple[Any, ...]) -> str:
    """'/'-joined name of a jax key path; an nnx Variable's trailing ``value`` is dropped."""
    if key_path and isinstance(key_path[-1], jax.tree_util.GetAttrKey) and key_path[-1].name == "value":
        key_path = key_path[:-1]
    return "/".join(_key_name(k) for k in key_path)


def flatten(tree: PyTree) -> dict[str, Any]:
    """``{path: leaf}`` for every leaf of ``tree``, in tree order."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {path_str(p): leaf for p, leaf in leaves}


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Nested plain dicts from ``{path: leaf}`` (the inverse of :func:`flatten` for dict trees)."""
    nested: dict[str, Any] = {}
    for path, leaf in flat.items():
        *parents, name = path.split("/")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = leaf
    return nested


def replace(tree: PyTree, flat: Mapping[str, Any]) -> PyTree:
    """``tree`` with the leaves named in ``flat`` replaced; structure and other leaves unchanged."""
    return jax.tree_util.tree_map_with_path(lambda p, x: flat.get(path_str(p), x), tree)


def select(tree: PyTree, paths: Iterable[str]) -> dict[str, Any]:
    """Nested dict holding only the leaves of ``tree`` at ``paths``."""
    flat = flatten(tree)
    return unflatten({p: flat[p] for p in paths})


def lora_candidates(params: PyTree) -> list[tuple[str, tuple[int, ...]]]:
    """Paths and shapes of the leaves LoRA can adapt (every leaf with two or more axes).

    Use it to write ``LoraConfig.targets``: the regex is searched in these paths.
    """
    return [(p, tuple(x.shape)) for p, x in flatten(params).items() if getattr(x, "ndim", 0) >= 2]
