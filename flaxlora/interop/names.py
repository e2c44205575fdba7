"""Params paths <-> PyTorch module and tensor names, as :func:`flaxlora.loading.to_hf` names them."""

from __future__ import annotations

import numpy as np

from flaxlora import pytree
from flaxlora.loading import to_hf
from flaxlora.pytree import PyTree


def tensor_name(path: str) -> str:
    """'bert/encoder/layer/0/attention/self/query/kernel' -> 'bert.encoder.layer.0.attention.self.query.weight'."""
    (name,) = to_hf(pytree.unflatten({path: np.zeros(())}))
    return name


def module_name(path: str) -> str:
    """The PyTorch module owning the tensor at params path ``path``, e.g. '...self.query'."""
    return tensor_name(path).rpartition(".")[0]


def tensor_names(params: PyTree) -> dict[str, str]:
    """``{tensor name: params path}`` for every leaf of ``params``."""
    return {tensor_name(p): p for p in pytree.flatten(params)}


def ancestors(module: str) -> list[str]:
    """'a.b.c' -> ['a', 'a.b', 'a.b.c']: the module and every module containing it."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]
