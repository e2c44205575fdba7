"""Small tools that shape what XLA keeps for the backward pass and when it computes, shared by
the models (:mod:`flaxlora.models.layers`), the adapters' factored path (:mod:`flaxlora.lora.factored`)
and the quantized Dense layers (:mod:`flaxlora.quant`).

    DENSE_OUTPUT                        the checkpoint name of a dense layer's output (``--remat block`` keeps it)
    computed_after(x, a)                ``x``, computed only once ``a`` exists
    cast_after(w, dtype, a)             ``w.astype(dtype)``, computed only once ``a`` exists
    recompute_in_backward(fn, *args)    an elementwise ``fn`` whose backward pass keeps only ``args``
    f32_accumulated_dot(x, w)           ``x @ w`` in ``x``'s low-precision dtype, accumulated in float32
    checkpoint_after_cotangent(f, ...)  ``jax.checkpoint(f)`` whose recomputation waits for the cotangent
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

# jax.ad_checkpoint.checkpoint_name of every dense layer's output, quantized or not.
DENSE_OUTPUT = "dense_output"


def computed_after(x: jax.Array, anchor: jax.Array) -> jax.Array:
    """``x`` plus ``anchor``'s first value times zero: the same values, computed only once
    ``anchor`` exists, so XLA can neither schedule what follows earlier nor share it with the
    same computation elsewhere (e.g. the forward pass's, from the backward pass)."""
    return x + (anchor.reshape(-1)[0] * 0).astype(x.dtype)


def cast_after(w: jax.Array, dtype: Any, after: jax.Array) -> jax.Array:
    """``w.astype(dtype)`` :func:`computed_after` ``after``; ``w`` itself when it has ``dtype``."""
    return w if w.dtype == dtype else computed_after(w, after).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def recompute_in_backward(fn: Callable[..., jax.Array], *args: jax.Array) -> jax.Array:
    """``fn(*args)`` for an elementwise ``fn`` (an activation, a gated MLP's ``act(gate) * up``)
    whose backward pass keeps only ``args`` and recomputes ``fn`` (cheap), instead of keeping its
    intermediates too: exact GELU keeps two (batch, len, intermediate) arrays besides its input,
    SiLU's ``sigmoid(gate)`` and ``act(gate)`` one each."""
    return fn(*args)


def _recompute_in_backward_fwd(fn, *args):
    return fn(*args), args


def _recompute_in_backward_bwd(fn, args, g):
    _, vjp = jax.vjp(fn, computed_after(args[0], g), *args[1:])
    return vjp(g)


recompute_in_backward.defvjp(_recompute_in_backward_fwd, _recompute_in_backward_bwd)


@jax.custom_vjp
def f32_accumulated_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x (..., in) @ w (in, out)`` multiplied in ``x``'s (low-precision) dtype, ``w`` cast to it,
    accumulated and returned in float32.

    The backward pass multiplies in that dtype too and forms the weight gradient only when ``w``
    is differentiated (never for a frozen weight). A frozen ``w`` is kept for the backward pass as
    it is (an argument of the step, alive anyway) and cast again there: no low-precision copy of
    every frozen weight stays alive from the forward pass to the backward pass.
    """
    return jax.lax.dot_general(x, cast_after(w, x.dtype, x), (((x.ndim - 1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)


def _f32_accumulated_dot_fwd(x, w):
    y = f32_accumulated_dot(x.value, w.value)
    dtype = x.value.dtype
    # A differentiated w (a merged or fully trained kernel) is a value of this step: keep its cast.
    kept_w = (w.value.astype(dtype) if w.perturbed else w.value) if x.perturbed else None
    dtypes = (jnp.zeros((0,), dtype), jnp.zeros((0,), w.value.dtype))  # what the cotangents are cast to
    return y, (x.value if w.perturbed else None, kept_w, dtypes)


def _f32_accumulated_dot_bwd(residuals, g):
    x, w, (like_x, like_w) = residuals
    dtype = like_x.dtype
    g = g.astype(dtype)
    dx = dw = None
    if w is not None:
        dx = jax.lax.dot_general(g, cast_after(w, dtype, g), (((g.ndim - 1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32).astype(dtype)
    if x is not None:
        rows = x.reshape(-1, x.shape[-1])
        dw = jax.lax.dot_general(rows, g.reshape(-1, g.shape[-1]), (((0,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32).astype(like_w.dtype)
    return dx, dw


f32_accumulated_dot.defvjp(_f32_accumulated_dot_fwd, _f32_accumulated_dot_bwd, symbolic_zeros=True)


def checkpoint_after_cotangent(fun: Callable[..., Any], policy: Callable[..., bool] | None = None
                               ) -> Callable[..., Any]:
    """``jax.checkpoint(fun, policy=policy)`` for ``fun(weights, *inputs)``, whose backward pass
    recomputes only once the cotangent of ``fun``'s output exists.

    ``jax.checkpoint`` orders the recomputation with optimization barriers, which XLA:CPU removes:
    it then schedules every layer's recomputation at the start of the backward pass and keeps all
    of them alive (a 22-layer Llama under ``--remat full`` held more than without remat). Here the
    values the forward pass saves are tied (:func:`computed_after`) to the first floating-point
    leaf of the output's cotangent when the backward pass starts, except the arrays of ``weights``
    themselves (tying would copy each weight): the same values and gradients on every backend.
    Only the weights being differentiated are differentiated inside: a frozen weight stays a
    constant to the custom VJPs in ``fun``, which then form no gradient of it.
    """

    @jax.custom_vjp
    def run(weights, *inputs):
        return jax.checkpoint(fun, policy=policy)(weights, *inputs)

    def forward(weights, *inputs):
        primals, weights_def = jax.tree.flatten(weights, is_leaf=_is_primal)
        trained = tuple(p.perturbed for p in primals)
        values = [p.value for p in primals]
        inputs = jax.tree.map(lambda p: p.value, inputs, is_leaf=_is_primal)
        # A new function each call: jax.checkpoint reuses its trace of a function it has seen,
        # which a call that trains other weights must not.
        checkpointed = jax.checkpoint(lambda *args: fun(*args), policy=policy)

        def of_trained(trained_values, *inputs):  # fun with the frozen weights as constants
            it = iter(trained_values)
            return checkpointed(weights_def.unflatten([next(it) if t else v for v, t in zip(values, trained)]),
                                *inputs)

        out, pullback = jax.vjp(of_trained, [v for v, t in zip(values, trained) if t], *inputs)
        saved, saved_def = jax.tree.flatten(pullback)
        weight_ids = {id(v) for v in values}
        tie = [id(s) not in weight_ids and jnp.issubdtype(s.dtype, jnp.inexact) for s in saved]

        def pullback_after(*args):
            """The pullback with its saved values tied to ``anchor`` (the last argument), and what
            the backward pass needs to rebuild the weights' cotangents (a Partial's function is
            static: these travel with it, not as residuals)."""
            *saved, anchor = args
            if anchor is not None:
                saved = [computed_after(s, anchor) if t else s for s, t in zip(saved, tie)]
            return saved_def.unflatten(saved), weights_def, trained

        return out, jax.tree_util.Partial(pullback_after, *saved)

    def backward(pullback_after, cotangent):
        leaves = jax.tree.leaves(cotangent, is_leaf=_is_zero)
        anchor = next((c for c in leaves if not _is_zero(c) and jnp.issubdtype(c.dtype, jnp.inexact)), None)
        cotangent = jax.tree.map(lambda c: _zeros(c) if _is_zero(c) else c, cotangent, is_leaf=_is_zero)
        pullback, weights_def, trained = pullback_after(anchor)
        trained_grads, *input_grads = pullback(cotangent)
        it = iter(trained_grads)
        return (weights_def.unflatten([next(it) if t else None for t in trained]), *input_grads)

    run.defvjp(forward, backward, symbolic_zeros=True)
    return run


def _is_primal(x: Any) -> bool:
    return isinstance(x, CustomVJPPrimal)


def _is_zero(x: Any) -> bool:
    return isinstance(x, SymbolicZero)


def _zeros(zero: SymbolicZero) -> Any:
    """A symbolic zero cotangent as an array (float0 for an integer output)."""
    if zero.dtype == jax.dtypes.float0:
        return np.zeros(zero.shape, jax.dtypes.float0)
    return jnp.zeros(zero.shape, zero.dtype)
