"""LoRA as pure functions on parameter pytrees: init, apply (merge), unmerge and extract.

The adapter tree holds, at the path of every adapted kernel ``W: (*stack, *fan_in, *fan_out)``,
a dict ``{"a": (*stack, *fan_in, r), "b": (*stack, r, *fan_out)}`` plus ``"magnitude":
(*stack, *fan_out)`` with DoRA. For a plain 2-D ``nn.Dense`` kernel (in, out) that is
``a: (in, r)``, ``b: (r, out)``. Which axes are stacked, input or output is set by
``LoraConfig.stack_axes`` / ``in_axes`` (defaults: none stacked, the first axis is the input),
so a Flax ``DenseGeneral`` q/k/v kernel (d_model, heads, head_dim) adapts as (d_model, heads *
head_dim) and an output projection (heads, head_dim, d_model) with ``in_axes={"out": 2}`` as
(heads * head_dim, d_model). The adapter is kept in float32 whatever the base dtype.
"""

from __future__ import annotations

import math
import zlib

import jax
import jax.numpy as jnp

from flaxlora import pytree
from flaxlora.lora import variants
from flaxlora.lora.config import LoraConfig
from flaxlora.lora.targets import Target, resolve_targets, trainable_paths
from flaxlora.pytree import PyTree

ADAPTER_KEYS = ("a", "b", "magnitude")


def path_key(rng: jax.Array, path: str) -> jax.Array:
    """A key for ``path`` that does not depend on which other paths exist."""
    return jax.random.fold_in(rng, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def _matrices(x: jax.Array, target: Target) -> jax.Array:
    """(*stack, *fan_in, *fan_out) -> (prod(stack), n_in, n_out)."""
    return x.reshape(math.prod(target.stack), target.n_in, target.n_out)


def adapters_by_path(lora_params: PyTree) -> dict[str, dict[str, jax.Array]]:
    """``{kernel path: {"a": ..., "b": ...[, "magnitude": ...]}}`` from an adapter tree."""
    grouped: dict[str, dict[str, jax.Array]] = {}
    for path, leaf in pytree.flatten(lora_params).items():
        parent, _, name = path.rpartition("/")
        if name not in ADAPTER_KEYS or not parent:
            raise ValueError(f"adapter tree leaf {path!r} is not named one of {ADAPTER_KEYS}")
        grouped.setdefault(parent, {})[name] = leaf
    return grouped


def check_adapter(path: str, adapter: dict[str, jax.Array], target: Target, use_dora: bool) -> None:
    """Raise ValueError naming the leaf when ``adapter`` does not fit ``target``."""
    expected = {
        "a": (*target.stack, *target.fan_in, target.rank),
        "b": (*target.stack, target.rank, *target.fan_out),
    }
    if use_dora:
        expected["magnitude"] = (*target.stack, *target.fan_out)
    if set(adapter) != set(expected):
        raise ValueError(f"adapter at {path!r} has leaves {sorted(adapter)}, expected {sorted(expected)}")
    for name, shape in expected.items():
        if tuple(adapter[name].shape) != shape:
            raise ValueError(
                f"adapter leaf {path}/{name} has shape {tuple(adapter[name].shape)}, expected {shape}"
            )


def matched_adapters(params: PyTree, lora_params: PyTree, config: LoraConfig):
    """``(targets, adapters)`` of ``config`` on ``params``, checked to match ``lora_params`` one to one."""
    targets = resolve_targets(params, config)
    adapters = adapters_by_path(lora_params)
    missing, extra = set(targets) - set(adapters), set(adapters) - set(targets)
    if missing or extra:
        raise ValueError(
            f"adapter tree does not match the config's targets: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(extra)[:5]}"
        )
    for path, target in targets.items():
        check_adapter(path, adapters[path], target, config.use_dora)
    return targets, adapters


def init_adapter(params: PyTree, config: LoraConfig, rng: jax.Array) -> tuple[PyTree, PyTree]:
    """Initialise an adapter for ``params``; return ``(base_params, lora_params)``.

    ``base_params`` is ``params`` itself for the zero-``b`` inits ("lora", "gaussian"). PiSSA and
    OLoRA move a rank-r part of each target into the adapter: ``base_params`` then holds the
    residual ``W - s * a @ b`` at the targets, and must replace ``params`` as the frozen weights
    (``apply_lora(base_params, lora_params, config)`` equals ``params`` at step 0).
    """
    init = variants.INITS[config.init]
    flat = pytree.flatten(params)
    adapters, residuals = {}, {}
    for path, t in resolve_targets(params, config).items():
        w = _matrices(flat[path].astype(jnp.float32), t)
        keys = jax.random.split(path_key(rng, path), w.shape[0])
        a, b, base = jax.vmap(lambda w, k: init(w, t.rank, t.scale, k))(w, keys)
        adapter = {
            "a": a.reshape(*t.stack, *t.fan_in, t.rank),
            "b": b.reshape(*t.stack, t.rank, *t.fan_out),
        }
        if config.use_dora:
            merged = base + t.scale * (a @ b)
            adapter["magnitude"] = variants.column_norm(merged).reshape(*t.stack, *t.fan_out)
        adapters[path] = adapter
        if config.init in variants.RESIDUAL_INITS:
            residuals[path] = base.reshape(flat[path].shape).astype(flat[path].dtype)
    return pytree.replace(params, residuals), pytree.unflatten(adapters)


def init_lora(params: PyTree, config: LoraConfig, rng: jax.Array) -> PyTree:
    """Initialise the adapter tree for ``params`` (zero-``b`` inits: the model is unchanged).

    For ``init="pissa"`` / ``"olora"``, which also change the frozen weights, use
    :func:`init_adapter`.
    """
    if config.init in variants.RESIDUAL_INITS:
        raise ValueError(
            f"init={config.init!r} also changes the frozen weights: call "
            "flaxlora.init_adapter(params, config, rng) -> (base_params, lora_params) and train on base_params"
        )
    return init_adapter(params, config, rng)[1]


def _merged_kernel(w: jax.Array, adapter: dict[str, jax.Array], t: Target) -> jax.Array:
    a = adapter["a"].reshape(-1, t.n_in, t.rank)
    b = adapter["b"].reshape(-1, t.rank, t.n_out)
    v = _matrices(w.astype(jnp.float32), t) + t.scale * (a @ b)
    if "magnitude" in adapter:
        v = variants.dora_weight(v, adapter["magnitude"].reshape(-1, t.n_out))
    return v.reshape(w.shape).astype(w.dtype)


def apply_lora(params: PyTree, lora_params: PyTree, config: LoraConfig) -> PyTree:
    """Merged params ``W + s * a @ b`` (DoRA: ``m * (W + s a b) / ||W + s a b||``) at every target.

    Same structure, shapes and dtypes as ``params``; jit-able and differentiable w.r.t.
    ``lora_params``. Close over ``params`` and differentiate only ``lora_params``: the frozen
    weights then get no gradient. LoRA dropout is not applied here (see
    :func:`flaxlora.lora_interceptor`). The merged kernel keeps the dtype of ``params``: with
    bfloat16 params, updates below bfloat16's resolution of W round away, so keep params in
    float32 (bf16 compute is fine) or use the factored path, which adds the update separately.
    """
    targets, adapters = matched_adapters(params, lora_params, config)
    flat = pytree.flatten(params)
    merged = {p: _merged_kernel(flat[p], adapters[p], t) for p, t in targets.items()}
    return pytree.replace(params, merged)


def merge(params: PyTree, lora_params: PyTree, config: LoraConfig, extras: PyTree | None = None) -> PyTree:
    """Export: fold the adapter (and the fine-tuned ``extras``, if any) into one plain params tree.

    The result runs with the unmodified model at zero overhead.
    """
    return apply_lora(with_extras(params, extras), lora_params, config)


def merge_pretrained(
    pretrained_params: PyTree, lora_params: PyTree, config: LoraConfig, extras: PyTree | None = None
) -> PyTree:
    """:func:`merge` onto the original pretrained weights. PiSSA / OLoRA adapters were trained on
    the residual base, which depends on those weights only and is recomputed here first."""
    base = pretrained_params
    if config.init in variants.RESIDUAL_INITS:
        base = init_adapter(pretrained_params, config, jax.random.key(0))[0]
    return merge(base, lora_params, config, extras)


def with_extras(params: PyTree, extras: PyTree | None) -> PyTree:
    """``params`` with the leaves of ``extras`` (a tree from :func:`trainable_params`) swapped in,
    or added where ``params`` lacks them (a frozen tree held without its extras, as
    :func:`flaxlora.training.init_train_state` keeps it)."""
    flat = pytree.flatten(extras or {})
    present = pytree.flatten(params)
    if flat.keys() <= present.keys():
        return pytree.replace(params, flat)
    return pytree.unflatten({**present, **flat})


def unmerge(merged_params: PyTree, lora_params: PyTree, config: LoraConfig) -> PyTree:
    """Inverse of :func:`apply_lora`: recover the frozen base ``W = W' - s * a @ b``.

    DoRA's merge rescales each output unit by an unknown factor, so it cannot be inverted from
    the merged weights alone: keep the base instead.
    """
    if config.use_dora:
        raise ValueError("a DoRA merge cannot be inverted from merged weights and adapter: keep the base params")
    targets, adapters = matched_adapters(merged_params, lora_params, config)
    flat = pytree.flatten(merged_params)
    base = {}
    for p, t in targets.items():
        negated = {"a": -adapters[p]["a"], "b": adapters[p]["b"]}
        base[p] = _merged_kernel(flat[p], negated, t)
    return pytree.replace(merged_params, base)


def extract_lora(base_params: PyTree, merged_params: PyTree, config: LoraConfig) -> PyTree:
    """Recover an adapter from a base and a merged model: the best rank-r fit (SVD) of the change.

    Exact (up to rounding) when every change has rank <= r, e.g. for ``merge(base, lora)``; the
    factors themselves are a rotation of the originals, their product ``a @ b`` is the same.
    """
    if config.use_dora:
        raise ValueError("extract_lora supports plain LoRA only (a DoRA merge is not a low-rank change)")
    merged_flat = pytree.flatten(merged_params)
    base_flat = pytree.flatten(base_params)
    adapters = {}
    for p, t in resolve_targets(base_params, config).items():
        if tuple(merged_flat[p].shape) != tuple(base_flat[p].shape):
            raise ValueError(f"{p!r}: base shape {base_flat[p].shape} != merged shape {merged_flat[p].shape}")
        delta = _matrices(merged_flat[p].astype(jnp.float32) - base_flat[p].astype(jnp.float32), t) / t.scale
        u, s, vt = jnp.linalg.svd(delta, full_matrices=False)
        root = jnp.sqrt(s[:, : t.rank])
        adapters[p] = {
            "a": (u[:, :, : t.rank] * root[:, None, :]).reshape(*t.stack, *t.fan_in, t.rank),
            "b": (root[:, :, None] * vt[:, : t.rank]).reshape(*t.stack, t.rank, *t.fan_out),
        }
    return pytree.unflatten(adapters)


def trainable_params(params: PyTree, config: LoraConfig) -> PyTree:
    """The parameters trained in full (``config.trainable``), as a nested dict: the ``extras``
    that :func:`merge` folds back. Empty when ``config.trainable`` is None."""
    return pytree.select(params, trainable_paths(params, config))
