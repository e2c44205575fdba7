"""Hugging Face PyTorch tensor names <-> our params paths.

`bert.encoder.layer.0.attention.self.query.weight` is params path
`bert/encoder/layer/0/attention/self/query/kernel`, transposed to (in, out). `weight` becomes
`kernel` (dense), `scale` (norms) or `embedding` (embeddings), whichever the model has there.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from flaxlora.models import init_params

Path = tuple[str, ...]

_LEAVES = {
    "weight": ("kernel", "scale", "embedding"),
    "bias": ("bias",),
    "gamma": ("scale",),  # pre-2019 BERT LayerNorm names
    "beta": ("bias",),
}
_HF_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# Non-parameter buffers some checkpoints carry; never reported as unused.
_BUFFERS = ("position_ids", "inv_freq", "masked_bias")


def _target(name: str, shapes: Mapping[Path, Any], backbone: str) -> Path | None:
    """The params path for HF tensor `name`, also trying it under `backbone/` (checkpoints
    saved from a bare `BertModel` or `LlamaModel` lack that prefix)."""
    *module, leaf = name.split(".")
    for prefix in ((), (backbone,)):
        for ours in _LEAVES.get(leaf, ()):
            path = (*prefix, *module, ours)
            if path in shapes:
                return path
    return None


def _convert(
    tensors: Iterable[tuple[str, np.ndarray]],
    shapes: Mapping[Path, jax.ShapeDtypeStruct],
    backbone: str,
    dtype: Any,
) -> tuple[dict[Path, jax.Array], list[str]]:
    """({path: array} for the tensors the model has, names of those it has not)."""
    params, unused = {}, []
    for name, value in tensors:
        path = _target(name, shapes, backbone)
        if path is None:
            if not name.endswith(_BUFFERS):
                unused.append(name)
            continue
        if path[-1] == "kernel":
            value = value.T
        expected = tuple(shapes[path].shape)
        if value.shape != expected:
            raise ValueError(
                f"Shape mismatch for checkpoint tensor {name!r} -> {'/'.join(path)}: checkpoint "
                f"has {tuple(value.shape)} (in our (in, out) layout), the model expects {expected}."
            )
        params[path] = jnp.asarray(value, dtype)
    return params, unused


def params_from_hf(
    model: nn.Module,
    tensors: Iterable[tuple[str, np.ndarray]],
    *,
    seed: int = 0,
    param_dtype: Any = jnp.float32,
) -> tuple[Any, tuple[str, ...], tuple[str, ...]]:
    """Params for `model` from checkpoint tensors in Hugging Face PyTorch names and layout.

    Args:
      model: one of the `flaxlora.models` classifiers (its `backbone` names the backbone key,
        which checkpoints of a bare backbone omit).
      tensors: (name, array) pairs, consumed one at a time.
      seed: initialises the params the checkpoint lacks, as `init_params` with this seed would.

    Returns:
      (params of plain arrays, paths initialised randomly, checkpoint names not used).

    Raises:
      ValueError: a tensor's shape differs from the model's.
    """
    rng = jax.random.key(seed)
    shapes = flatten_dict(jax.eval_shape(functools.partial(init_params, model), rng))
    params, unused = _convert(tensors, shapes, model.backbone, param_dtype)
    missing = sorted(set(shapes) - set(params))
    if missing:
        fresh = jax.jit(lambda r: [flatten_dict(init_params(model, r))[p] for p in missing])(rng)
        params.update(zip(missing, fresh))
    return unflatten_dict(params), tuple("/".join(p) for p in missing), tuple(unused)


def to_hf(params: Any) -> dict[str, np.ndarray]:
    """Our params tree as a Hugging Face PyTorch state dict of numpy arrays (kernels (out, in))."""
    state = {}
    for path, value in flatten_dict(params).items():
        value = np.asarray(value)
        value = np.ascontiguousarray(value.T) if path[-1] == "kernel" else value
        state[".".join((*path[:-1], _HF_LEAF[path[-1]]))] = value
    return state
