"""The factored LoRA path: ``x @ W + s * (dropout(x) @ a) @ b``, never forming ``W + s a @ b``.

It intercepts the calls of ``flax.linen`` ``Dense`` / ``DenseGeneral`` modules whose kernel path
has an adapter, so it works with any linen model and costs two thin matmuls per target instead
of a weight-sized copy: the path for models too big to duplicate their weights, and the only
one that applies LoRA dropout. Outputs equal :func:`flaxlora.apply_lora`'s merged path.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxlora import pytree
from flaxlora.dataflow import f32_accumulated_dot
from flaxlora.dropout import dropout
from flaxlora.lora import variants
from flaxlora.lora.adapters import adapters_by_path, path_key
from flaxlora.lora.config import LoraConfig, first_match
from flaxlora.lora.targets import resolve_targets
from flaxlora.pytree import PyTree
from flaxlora.quant.arrays import is_quantized
from flaxlora.quant.dense import quantized_dense

# The variable collections that carry the adapters and their dropout keys to their layers; a model
# that runs layers under nn.scan lists them in its variable_axes (flaxlora.models.layers.Stack).
LORA_COLLECTIONS = ADAPTERS, DROPOUT_KEYS = ("lora", "lora_rng")


def adapters_by_module(lora_params: PyTree) -> dict[str, tuple[str, Any]]:
    """``{kernel path as the module sees it: (adapter path, adapter)}``: adapters made from a
    ``{"params": ...}`` variables dict carry that prefix, which module paths lack. The config is
    always consulted with the adapter path, as :func:`flaxlora.apply_lora` does."""
    adapters = adapters_by_path(lora_params)
    strip = bool(adapters) and all(p.startswith("params/") for p in adapters)
    return {(p.removeprefix("params/") if strip else p): (p, a) for p, a in adapters.items()}


def _contracted_axes(module: nn.Module, ndim: int) -> tuple[int, ...]:
    axis = getattr(module, "axis", -1)
    axes = axis if isinstance(axis, tuple) else (axis,)
    return tuple(sorted(ax % ndim for ax in axes))


def low_rank_update(x: jax.Array, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
    """``(x @ a) @ b`` in ``dtype``, contracting the last ``a.ndim - 1`` axes of ``x`` with ``a``'s
    fan-in. In a low-precision ``dtype`` each product is accumulated in float32
    (:func:`~flaxlora.dataflow.f32_accumulated_dot`, as the dense layers: XLA:CPU then keeps no
    float32 copy of ``x`` for ``a``'s gradient)."""
    if jnp.dtype(dtype).itemsize >= 4:
        return jnp.tensordot(jnp.tensordot(x.astype(dtype), a.astype(dtype), a.ndim - 1), b.astype(dtype), 1)
    lead = x.shape[:x.ndim - (a.ndim - 1)]
    h = f32_accumulated_dot(x.astype(dtype).reshape(*lead, -1), a.reshape(-1, a.shape[-1])).astype(dtype)
    return f32_accumulated_dot(h, b.reshape(b.shape[0], -1)).astype(dtype).reshape(*lead, *b.shape[1:])


def dora_rescale(module: nn.Module, y: jax.Array, delta: jax.Array, factor: jax.Array) -> jax.Array:
    """DoRA's output ``factor * (x @ W + delta) + bias`` from the layer's own ``y = x @ W + bias``;
    ``factor``: (*fan_out,), ``m / ||W + s a @ b||`` per output unit."""
    bias = module.get_variable("params", "bias").astype(y.dtype) if getattr(module, "use_bias", False) else 0
    return factor.astype(y.dtype) * (y - bias + delta) + bias


def _lora_output(module, x, y, adapter, path, config, key):
    """``y = module(x)`` plus the adapter's contribution (DoRA: rescaled per output unit)."""
    a, b = adapter["a"], adapter["b"]
    n_in = a.ndim - 1
    if _contracted_axes(module, x.ndim) != tuple(range(x.ndim - n_in, x.ndim)):
        raise ValueError(f"{path!r}: the module must contract the last {n_in} input axes to use the factored path")
    scale = config.scale_for(path)
    if config.rank_for(path) != a.shape[-1]:
        raise ValueError(f"{path!r}: adapter rank {a.shape[-1]} != configured rank {config.rank_for(path)}")
    h = x
    if key is not None and config.dropout > 0:
        h = dropout(x, config.dropout, key)
    delta = scale * low_rank_update(h, a, b, y.dtype)
    if not config.use_dora:
        return y + delta
    rank = a.shape[-1]
    a2, b2 = a.reshape(-1, rank), b.reshape(rank, -1)
    kernel = module.get_variable("params", "kernel").astype(jnp.float32).reshape(a2.shape[0], -1)
    factor = variants.dora_output_scale(kernel, a2, b2, scale, adapter["magnitude"].reshape(-1))
    return dora_rescale(module, y, delta, factor.reshape(b.shape[1:]))


def adapter_collections(adapters: dict[str, tuple[str, Any]], config: LoraConfig,
                        rng: jax.Array | None = None) -> dict[str, Any]:
    """The variable collections that carry ``adapters`` (:func:`adapters_by_module`) to their
    layers: ``"lora"`` holds each adapter at its Dense module's path (``{..., "q_proj": {"kernel":
    {"a", "b"[, "magnitude"]}}}``) and, given ``rng``, ``"lora_rng"`` its dropout key there. Being
    collections, they are sliced layer by layer inside a scanned stack (``LoraConfig.stack_axes``
    of 1: one key per layer)."""
    placed, keys = {}, {}
    for module_path, (path, adapter) in adapters.items():
        n_stack = first_match(config.stack_axes, path, 0)
        if n_stack > 1:
            raise ValueError(f"{path!r}: {n_stack} stacked axes; the factored path applies one (a scanned stack)")
        placed[module_path] = adapter
        if rng is not None:
            key = path_key(rng, path)
            keys[module_path] = jax.random.split(key, adapter["a"].shape[0]) if n_stack else key
    collections = {ADAPTERS: pytree.unflatten(placed)}
    if keys:
        collections[DROPOUT_KEYS] = pytree.unflatten(keys)
    return collections


@contextlib.contextmanager
def lora_interceptor(lora_params: PyTree, config: LoraConfig) -> Iterator[set[str]]:
    """Within this context, linen Dense/DenseGeneral layers that find an adapter in the ``"lora"``
    collection (:func:`adapter_collections`, passed to ``apply`` with the params) apply it factored.

    Args:
      lora_params: the adapter tree (from :func:`flaxlora.init_lora` on the model's params).
      config: its LoraConfig.

    Yields the set of adapter paths applied so far (to check that every target was reached).
    """
    with _intercept(adapters_by_module(lora_params), config) as applied:
        yield applied


@contextlib.contextmanager
def _intercept(adapters: dict[str, tuple[str, Any]], config: LoraConfig) -> Iterator[set[str]]:
    """:func:`lora_interceptor` given its adapters by module path (:func:`adapters_by_module`)."""
    adapter_paths = {path: adapter_path for path, (adapter_path, _) in adapters.items()}
    applied: set[str] = set()

    def output(module, x, y, adapter):
        path = adapter_paths["/".join((*module.path, "kernel"))]
        applied.add(path)
        return _lora_output(module, x, y, adapter, path, config, module.get_variable(DROPOUT_KEYS, "kernel"))

    with dense_interceptor(ADAPTERS, output):
        yield applied


@contextlib.contextmanager
def dense_interceptor(collection: str, output) -> Iterator[None]:
    """Within this context, a linen Dense/DenseGeneral layer that finds a variable ``kernel`` in
    ``collection`` returns ``output(module, x, y, variable)``, ``y`` being its own output on ``x``."""

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.DenseGeneral)):
            return next_fun(*args, **kwargs)
        adapter = module.get_variable(collection, "kernel")
        if adapter is None:
            return next_fun(*args, **kwargs)
        return output(module, args[0], next_fun(*args, **kwargs), adapter)

    with nn.intercept_methods(interceptor):
        yield


def apply_factored(
    module: nn.Module,
    variables: PyTree,
    lora_params: PyTree,
    config: LoraConfig,
    *args: Any,
    lora_rng: jax.Array | None = None,
    **kwargs: Any,
) -> Any:
    """``module.apply(variables, *args, **kwargs)`` with the adapter applied on the factored path;
    Dense layers with a quantized kernel (:mod:`flaxlora.quant`) compute on it.

    Raises ValueError if some adapter was never reached (e.g. a target that is not a Dense kernel,
    such as an embedding table: use :func:`flaxlora.apply_lora` for those).
    """
    adapters = adapters_by_module(lora_params)
    collections = adapter_collections(adapters, config, lora_rng)
    # LoRA's interceptor first: its call of the layer reaches the quantized one (QLoRA's x @ deq(W)).
    with _intercept(adapters, config) as applied, quantized_dense():
        out = module.apply({**variables, **collections}, *args, **kwargs)
    unreached = {path for path, _ in adapters.values()} - applied
    if unreached:
        raise ValueError(f"adapters never applied on the factored path (not Dense kernels?): {sorted(unreached)[:5]}")
    return out


def compute_dtype_paths(frozen: PyTree, dtype: Any, config: LoraConfig, lora_path: str = "factored") -> list[str]:
    """The paths of ``frozen`` that :func:`frozen_in_compute_dtype` casts to ``dtype`` (arrays or
    shapes): each floating matrix (a Dense kernel, an embedding table: 2 or more axes) wider than
    ``dtype``, except quantized weights and, on the merged path or with DoRA, the adapter targets
    (their merge or weight norm reads the stored weight)."""
    dtype = jnp.dtype(dtype)
    kept = set(resolve_targets(frozen, config)) if lora_path == "merged" or config.use_dora else set()
    return [path for path, x in pytree.flatten(frozen).items()
            if not is_quantized(x) and path not in kept and len(x.shape) >= 2
            and jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits > jnp.finfo(dtype).bits]


def frozen_in_compute_dtype(frozen: PyTree, dtype: Any, config: LoraConfig, lora_path: str = "factored", *,
                            free: bool = False) -> PyTree:
    """``frozen`` with its matrices (:func:`compute_dtype_paths`) held in the compute ``dtype``.

    The model casts them to its compute dtype at every use, so holding the cast once gives the
    same numbers, without a cast per step and with half the weight memory in bfloat16; vectors
    (norm scales, biases) keep their dtype. Cast layer by layer (one jitted program serves every
    layer), each leaf in its own sharding. free: delete each original matrix once its layer is
    cast, so that beside the base only one layer exists twice; ``frozen`` is unusable afterwards
    (without it, both copies live until the caller drops ``frozen``).
    """
    flat = pytree.flatten(frozen)
    by_layer: dict[str, list[str]] = {}
    for path in compute_dtype_paths(frozen, dtype, config, lora_path):
        layer = re.search(r"/(\d+)/", path)
        by_layer.setdefault(layer.group(1) if layer else "", []).append(path)
    cast = jax.jit(lambda leaves, dtype: [w.astype(dtype) for w in leaves], static_argnums=1)
    held = {}
    for paths in by_layer.values():
        originals = [flat[p] for p in paths]
        held.update(zip(paths, cast(originals, jnp.dtype(dtype))))
        if free:
            for x in originals:
                x.delete()
    return pytree.replace(frozen, held) if held else frozen
