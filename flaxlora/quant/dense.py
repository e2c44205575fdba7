"""Dense layers on quantized kernels: ``x @ deq(W)``, one weight dequantized at a time.

Within :func:`quantized_dense`, every linen ``nn.Dense`` whose kernel is a
:class:`~flaxlora.quant.arrays.QuantizedArray` computes ``x @ deq(W) (+ bias)`` through
:func:`quantized_matmul`, whose backward pass dequantizes ``W`` again for the input gradient
instead of keeping the float weight alive from the forward pass, and gives codes and scales no
gradient. The LoRA interceptor (:func:`flaxlora.lora.factored.lora_interceptor`) adds the
adapter on top, so ``x @ deq(W) + s (x @ a) @ b`` never holds the float model.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from flaxlora.dataflow import DENSE_OUTPUT
from flaxlora.quant.arrays import QuantizedArray, dequantize_weight, is_quantized


def _matmul(x: jax.Array, q: QuantizedArray, dtype) -> jax.Array:
    # Decoded only once x exists: otherwise XLA may decode every layer's weight at the start (they
    # depend on the params alone; XLA:CPU does, dropping optimization barriers), holding the whole
    # float model at once.
    w = dequantize_weight(q, after=x).astype(dtype)
    return jnp.dot(x.astype(dtype), w, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def quantized_matmul(x: jax.Array, q: QuantizedArray, dtype=jnp.float32) -> jax.Array:
    """``x (..., in) @ deq(q) (in, out)`` multiplied in ``dtype``, accumulated and returned in float32."""
    return _matmul(x, q, dtype)


def _fwd(x, q, dtype):
    return _matmul(x, q, dtype), (q, jnp.zeros((0,), x.dtype))


def _bwd(dtype, residuals, dy):
    q, like_x = residuals
    # Dequantize again, once dy exists (so not merged with the forward pass's dequantization, which
    # would keep every float weight alive until the backward pass).
    w = dequantize_weight(q, after=dy).astype(dtype)
    dx = jnp.dot(dy.astype(dtype), w.T, preferred_element_type=jnp.float32).astype(like_x.dtype)
    no_gradient = jax.tree.map(
        lambda a: np.zeros(a.shape, jax.dtypes.float0) if jnp.issubdtype(a.dtype, jnp.integer) else jnp.zeros_like(a), q)
    return dx, no_gradient


quantized_matmul.defvjp(_fwd, _bwd)


@contextlib.contextmanager
def quantized_dense() -> Iterator[None]:
    """Within this context, linen ``nn.Dense`` layers with a quantized kernel compute on it."""

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if (context.method_name != "__call__" or not isinstance(module, nn.Dense)
                or not module.has_variable("params", "kernel")):
            return next_fun(*args, **kwargs)
        kernel = module.get_variable("params", "kernel")
        if not is_quantized(kernel):
            return next_fun(*args, **kwargs)
        x = args[0] if args else kwargs["inputs"]
        dtype = jnp.dtype(module.dtype or jnp.float32)
        y = checkpoint_name(quantized_matmul(x, kernel, dtype).astype(dtype), DENSE_OUTPUT)  # as a float Dense returns
        if module.use_bias:
            y = y + module.get_variable("params", "bias").astype(y.dtype)
        return y

    with nn.intercept_methods(interceptor):
        yield
