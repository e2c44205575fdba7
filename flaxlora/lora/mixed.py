"""Many adapters on one frozen base, each row of a batch with its own (Punica's BGMV, in JAX).

A run's adapter and fully trained extras become a serving form that no longer needs its
LoraConfig (:func:`serving_form`): at every adapted kernel ``{"a": (*fan_in, r), "b": (r,
*fan_out)}`` with the scale folded into ``b``, and for DoRA ``"factor": (*fan_out,)``, the
per-output rescaling ``m / ||W + s a @ b||``, which depends on weights only and so is computed
once here instead of in every forward. :func:`stack` stacks the forms of several runs along a
leading adapter axis, exactly: ranks padded with zeros, zero factors at a kernel a run does not
adapt, the base's value of an extra a run does not train, DoRA's factor 1 for a run without DoRA.

:func:`mixed_apply` runs one forward where row ``i`` uses adapter ``ids[i]``: each row's tree is
gathered from the stack and the per-row forward is vmapped with the frozen base unbatched, so XLA
runs every base matmul once over all rows and the adapter matmuls as batched per-row matmuls.
Extras (biases, norms, a head) and DoRA need nothing special: they are part of each row's tree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxlora import pytree
from flaxlora.lora import variants
from flaxlora.lora.adapters import matched_adapters, with_extras
from flaxlora.lora.config import LoraConfig
from flaxlora.lora.factored import dense_interceptor, dora_rescale, low_rank_update
from flaxlora.pytree import PyTree

# The variable collection that carries each Dense layer's serving-form adapter to it.
SERVING = "serving"


def serving_form(params: PyTree, lora_params: PyTree, config: LoraConfig, extras: PyTree | None = None) -> PyTree:
    """``{"adapters": {kernel path: {"a", "b"[, "factor"]}}, "extras": extras}`` of one run (module doc).

    params: the frozen base (float32, unrolled layers); lora_params / config / extras: the run's.
    Raises ValueError for stacked (scanned) kernels: unstack them first
    (:func:`flaxlora.models.scan.unstack_layers`).
    """
    params = with_extras(params, extras)
    flat = pytree.flatten(params)
    targets, adapters = matched_adapters(params, lora_params, config)
    forms = {}
    for path, t in targets.items():
        if t.stack:
            raise ValueError(f"{path!r} holds {t.stack} stacked layers: unstack the run's layers first")
        a, b = adapters[path]["a"].astype(jnp.float32), adapters[path]["b"].astype(jnp.float32)
        forms[path] = {"a": a, "b": t.scale * b}
        if config.use_dora:
            kernel = flat[path].astype(jnp.float32).reshape(t.n_in, t.n_out)
            factor = variants.dora_output_scale(kernel, a.reshape(t.n_in, t.rank), b.reshape(t.rank, t.n_out),
                                                t.scale, adapters[path]["magnitude"].reshape(-1))
            forms[path]["factor"] = factor.reshape(t.fan_out)
    return {"adapters": pytree.unflatten(forms), "extras": extras or {}}


def _padded(x: jax.Array, axis: int, size: int) -> jax.Array:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def stack(forms: Sequence[PyTree], params: PyTree) -> PyTree:
    """The serving forms of n runs on base ``params`` as one tree of the same layout whose leaves
    have a leading adapter axis (n, ...): the union of the runs' kernels and extras, each run
    padded as the module doc says."""
    adapters = [pytree.flatten(f["adapters"]) for f in forms]
    extras = [pytree.flatten(f["extras"]) for f in forms]
    base = pytree.flatten(params)
    stacked = {}
    for kernel in dict.fromkeys(p.rpartition("/")[0] for flat in adapters for p in flat):
        present = [flat for flat in adapters if f"{kernel}/a" in flat]
        rank = max(flat[f"{kernel}/a"].shape[-1] for flat in present)
        a_shape, b_shape = present[0][f"{kernel}/a"].shape[:-1], present[0][f"{kernel}/b"].shape[1:]
        zero_a, zero_b = jnp.zeros((*a_shape, rank)), jnp.zeros((rank, *b_shape))
        stacked[f"adapters/{kernel}/a"] = jnp.stack(
            [_padded(flat[f"{kernel}/a"], -1, rank) if f"{kernel}/a" in flat else zero_a for flat in adapters])
        stacked[f"adapters/{kernel}/b"] = jnp.stack(
            [_padded(flat[f"{kernel}/b"], 0, rank) if f"{kernel}/b" in flat else zero_b for flat in adapters])
        if any(f"{kernel}/factor" in flat for flat in present):
            stacked[f"adapters/{kernel}/factor"] = jnp.stack(
                [flat.get(f"{kernel}/factor", jnp.ones(b_shape)) for flat in adapters])
    for path in dict.fromkeys(p for flat in extras for p in flat):
        stacked[f"extras/{path}"] = jnp.stack([flat.get(path, base[path]).astype(jnp.float32) for flat in extras])
    return {"adapters": {}, "extras": {}, **pytree.unflatten(stacked)}


def _serving_output(module: nn.Module, x: jax.Array, y: jax.Array, adapter: dict[str, jax.Array]) -> jax.Array:
    delta = low_rank_update(x, adapter["a"], adapter["b"], y.dtype)
    return dora_rescale(module, y, delta, adapter["factor"]) if "factor" in adapter else y + delta


def apply_served(model: nn.Module, params: PyTree, form: PyTree, *args: Any, **kwargs: Any) -> Any:
    """``model.apply`` on ``params`` with one serving form's extras swapped in and its adapters
    applied factored (``x @ W + (x @ a) @ b``, DoRA rescaled): the per-row (or per-group) forward."""
    with dense_interceptor(SERVING, _serving_output):
        return model.apply({"params": with_extras(params, form["extras"]), SERVING: form["adapters"]}, *args, **kwargs)


def mixed_apply(model: nn.Module, params: PyTree, stacked: PyTree, ids: jax.Array, *args: Any, **kwargs: Any) -> Any:
    """``model.apply`` on a batch whose row ``i`` uses adapter ``ids[i]`` of ``stacked`` (:func:`stack`).

    ids: (batch,) int; args: the model's batched inputs (batch, ...), None allowed; kwargs are
    passed as they are (e.g. ``deterministic=True``). Returns the model's output, (batch, ...).
    """
    rows = jax.tree.map(lambda x: jnp.take(x, ids, axis=0), stacked)

    def one_row(form, *row):
        out = apply_served(model, params, form, *(None if x is None else x[None] for x in row), **kwargs)
        return jax.tree.map(lambda y: y[0], out)

    return jax.vmap(one_row)(rows, *args)
