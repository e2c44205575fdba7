"""Hugging Face PyTorch tensor names <-> our params paths.

`bert.encoder.layer.0.attention.self.query.weight` is params path
`bert/encoder/layer/0/attention/self/query/kernel`, transposed to (in, out). `weight` becomes
`kernel` (dense), `scale` (norms) or `embedding` (embeddings), whichever the model has there.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from flaxlora.models import init_params
from flaxlora.models.scan import SCANNED, layer_paths
from flaxlora.quant.arrays import (
    GGUF_TYPES,
    from_gguf_blocks,
    gguf_scheme,
    quantize_weight,
)

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


class TensorSource(Protocol):
    """Checkpoint tensors in Hugging Face names and layout, read slice by slice
    (:class:`~flaxlora.loading.HFFolder`, :class:`~flaxlora.loading.GGUFFile`, :class:`ArraySource`)."""

    def shapes(self) -> Mapping[str, tuple[int, ...]]: ...

    def read(self, name: str, index: tuple[slice, ...] = ()) -> np.ndarray: ...


class ArraySource:
    """A state dict ``{HF name: array}`` (e.g. a PyTorch model's, as numpy) as a TensorSource."""

    def __init__(self, state: Mapping[str, Any]):
        self.state = state

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(np.shape(value)) for name, value in self.state.items()}

    def read(self, name: str, index: tuple[slice, ...] = ()) -> np.ndarray:
        return np.asarray(self.state[name])[index]


def _placed(source: TensorSource, name: str | list[str], transpose: bool, shape: tuple[int, ...],
            sharding: jax.sharding.Sharding, dtype: Any) -> jax.Array:
    """Tensor ``name`` (or the tensors ``name`` lists, stacked along a new first axis: the layers of
    a scanned stack) as an array of ``shape`` with ``sharding``: each device's slice is read
    (transposed from HF's (out, in) for kernels) and cast on its own, so no host or device holds
    more of the tensor than its shards."""

    read = {}  # devices that replicate a shard share one read of it

    def one(name: str, index: tuple[slice, ...]) -> np.ndarray:
        return source.read(name, index[::-1]).T if transpose else source.read(name, index)

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in read:
            value = one(name, index) if isinstance(name, str) else np.stack([one(n, index[1:]) for n in name[index[0]]])
            read[key] = np.array(value, dtype=dtype, order="C")  # a copy: never a view of a memory-mapped file
        return read[key]

    return jax.make_array_from_callback(shape, sharding, shard)


FLOAT_TYPES = ("F32", "F16", "BF16")  # GGUF tensors stored unquantized: loaded as floats


def _layer_paths(shapes: Mapping[Path, Any]) -> dict[Path, tuple[Path, int]]:
    """``{path of layer i: (stacked path, i)}`` for the stacked params of a scanned model
    (:mod:`flaxlora.models.scan`); empty for an unrolled one."""
    return {layer: (path, i) for path, shape in shapes.items() if SCANNED in path
            for i, layer in enumerate(layer_paths(path, shape.shape))}


def _stacked(found: dict[Path, str], layers: Mapping[Path, tuple[Path, int]],
             shapes: Mapping[Path, Any]) -> dict[Path, str | list[str]]:
    """``found`` ({params path: tensor name}) with each scanned stack's layers gathered into
    {stacked path: [name of layer 0, name of layer 1, ...]}."""
    out, stacks = {}, {}
    for path, name in found.items():
        if path in layers:
            stacked, i = layers[path]
            stacks.setdefault(stacked, {})[i] = name
        else:
            out[path] = name
    for stacked, names in stacks.items():
        if len(names) != shapes[stacked].shape[0]:
            absent = sorted(set(range(shapes[stacked].shape[0])) - set(names))
            raise ValueError(f"{'/'.join(stacked)}: the checkpoint lacks layers {absent} of a scanned stack; "
                             "load it without scan_layers")
        out[stacked] = [names[i] for i in range(len(names))]
    return out


def params_from_hf(
    model: nn.Module,
    source: TensorSource | Mapping[str, Any] | Iterable[tuple[str, Any]],
    *,
    seed: int = 0,
    param_dtype: Any = jnp.float32,
    shardings: Any = None,
    quantize: Callable[[str, tuple[int, ...]], str | None] | None = None,
) -> tuple[Any, tuple[str, ...], tuple[str, ...]]:
    """Params for `model` from checkpoint tensors in Hugging Face PyTorch names and layout.

    Args:
      model: one of the `flaxlora.models` classifiers (its `backbone` names the backbone key,
        which checkpoints of a bare backbone omit).
      source: a :class:`TensorSource`, or a state dict ``{name: array}`` (or its items).
      seed: initialises the params the checkpoint lacks, as `init_params` with this seed would.
      param_dtype: the dtype the params are stored in.
      shardings: a tree like the params of `jax.sharding.Sharding` (e.g. from
        :func:`flaxlora.training.sharding.param_shardings`): each process reads and places only
        the slices its devices hold. Default: every param whole on the first local device.
      quantize: ``(params path, shape) -> scheme or None``: store that weight quantized
        (:mod:`flaxlora.quant`), each right after it is read, so the float model is never held;
        ``"gguf"`` keeps a GGUF tensor's blocks as stored. Codes and scales are sharded along the
        mesh axes of the weight's dimensions.

    Returns:
      (params of plain arrays, paths initialised randomly, checkpoint names not used).

    Raises:
      ValueError: a tensor's shape differs from the model's (checked before any tensor is read).
    """
    found, missing, unused, init_missing = read_params(model, source, param_dtype=param_dtype, shardings=shardings,
                                                       quantize=quantize)
    return unflatten_dict({**found, **init_missing(seed)}, sep="/"), missing, unused


def read_params(
    model: nn.Module,
    source: TensorSource | Mapping[str, Any] | Iterable[tuple[str, Any]],
    *,
    param_dtype: Any = jnp.float32,
    shardings: Any = None,
    quantize: Callable[[str, tuple[int, ...]], str | None] | None = None,
) -> tuple[dict[str, Any], tuple[str, ...], tuple[str, ...], Callable[[int], dict[str, jax.Array]]]:
    """:func:`params_from_hf`'s work, less the random init: ``({path: param} read from ``source``,
    paths the checkpoint lacks, checkpoint names not used, init_missing)``, where
    ``init_missing(seed)`` gives ``{path: param}`` for the lacking paths as `init_params` with
    that seed would, placed as ``shardings`` says: one compiled program for every seed."""
    if not hasattr(source, "read"):
        source = ArraySource(dict(source))
    shapes = flatten_dict(jax.eval_shape(lambda: init_params(model, jax.random.key(0))))
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        placement = dict.fromkeys(shapes, device)
    else:
        placement = flatten_dict(shardings)
    layers = _layer_paths(shapes)  # a scanned model: each layer's path -> (stacked path, layer)
    if layers and quantize:
        raise ValueError("a scanned model's layers are stacked as read: quantize them after loading, or load unscanned")
    tensors = {p: tuple(s.shape) for p, s in shapes.items() if SCANNED not in p} | {
        p: tuple(shapes[stacked].shape[1:]) for p, (stacked, _) in layers.items()}
    found, unused = {}, []
    for name, hf_shape in source.shapes().items():
        path = _target(name, tensors, model.backbone)
        if path is None:
            if not name.endswith(_BUFFERS):
                unused.append(name)
            continue
        ours = hf_shape[::-1] if path[-1] == "kernel" else hf_shape
        expected = tensors[path]
        if tuple(ours) != expected:
            raise ValueError(
                f"Shape mismatch for checkpoint tensor {name!r} -> {'/'.join(path)}: checkpoint "
                f"has {tuple(ours)} (in our (in, out) layout), the model expects {expected}."
            )
        found[path] = name
    found = _stacked(found, layers, shapes)
    schemes = {path: quantize("/".join(path), tuple(shapes[path].shape)) if quantize else None for path in found}
    for path, name in found.items():  # every GGUF block type checked before any tensor is read
        kind = source.tensor_type(name) if schemes[path] == "gguf" else None
        if kind and kind not in FLOAT_TYPES and gguf_scheme(kind) is None:
            raise ValueError(f"{name} is stored as {kind}, which --quantize gguf cannot keep as stored (it keeps "
                             f"{', '.join(GGUF_TYPES)}): use --quantize nf4 (dequantised, then NF4) or no --quantize")
    params = {}
    for path, name in found.items():
        shape, scheme = tuple(shapes[path].shape), schemes[path]
        blocks = source.read_blocks(name) if scheme == "gguf" else None
        if blocks and blocks[0] not in FLOAT_TYPES:
            q = from_gguf_blocks(blocks[1], blocks[0], shape)  # host arrays, placed shard by shard
            params[path] = jax.device_put(q, q.replace(data=q.data_shardings(placement[path])))
            continue
        w = _placed(source, name, path[-1] == "kernel", shape, placement[path], param_dtype)
        if scheme and scheme != "gguf":  # quantized right away: the float weight is dropped
            abstract = jax.eval_shape(functools.partial(quantize_weight, scheme=scheme), w)
            w = jax.jit(quantize_weight, static_argnums=1, out_shardings=abstract.replace(
                data=abstract.data_shardings(placement[path])))(w, scheme)
        params[path] = w
    missing = sorted(set(shapes) - set(params))
    fresh = jax.jit(lambda seed: [flatten_dict(init_params(model, jax.random.key(seed)))[p].astype(param_dtype)
                                  for p in missing], out_shardings=[placement[p] for p in missing])

    def init_missing(seed: int) -> dict[str, jax.Array]:
        return dict(zip(("/".join(p) for p in missing), fresh(np.uint32(seed)))) if missing else {}

    return ({"/".join(p): x for p, x in params.items()}, tuple("/".join(p) for p in missing), tuple(unused),
            init_missing)


def to_hf(params: Any) -> dict[str, np.ndarray]:
    """Our params tree as a Hugging Face PyTorch state dict of numpy arrays (kernels (out, in))."""
    state = {}
    for path, value in flatten_dict(params).items():
        value = np.asarray(value)
        value = np.ascontiguousarray(value.T) if path[-1] == "kernel" else value
        state[".".join((*path[:-1], _HF_LEAF[path[-1]]))] = value
    return state
