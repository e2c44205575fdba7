"""Quantizing and dequantizing whole params trees."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from flaxlora import pytree
from flaxlora.pytree import PyTree
from flaxlora.quant.arrays import (
    NF4_BLOCK,
    dequantize_weight,
    is_quantized,
    quantize_weight,
)

DEFAULT_TARGETS = r"kernel$"
# What a run can ask for (experiments/qqp.py --quantize): "gguf" keeps a GGUF file's own blocks.
OPTIONS = ("nf4", "nf4-dq", "int8", "gguf")


def quantizable(path: str, shape: tuple[int, ...], scheme: str, targets: str = DEFAULT_TARGETS) -> bool:
    """Whether the leaf at ``path`` is a 2-D kernel matched by ``targets`` that ``scheme`` can hold."""
    if len(shape) != 2 or not re.search(targets, path):
        return False
    return not scheme.startswith("nf4") or shape[0] % NF4_BLOCK == 0


def quantize(params: PyTree, scheme: str, targets: str = DEFAULT_TARGETS) -> PyTree:
    """``params`` with every 2-D kernel matched by ``targets`` (a regex on '/'-joined paths)
    replaced by a :class:`~flaxlora.quant.arrays.QuantizedArray` (``nf4``, ``nf4-dq``, ``int8``), one
    weight at a time, each jitted on its own device(s); NF4 skips kernels whose input width is not a
    multiple of 64. Never quantize what is trained in full (the extras)."""
    flat = pytree.flatten(params)
    encode = jax.jit(quantize_weight, static_argnums=1)
    return pytree.replace(params, {p: encode(x, scheme) for p, x in flat.items()
                                   if not is_quantized(x) and quantizable(p, x.shape, scheme, targets)})


def dequantize(params: PyTree, dtype=jnp.float32) -> PyTree:
    """``params`` with every quantized kernel dequantized (to ``dtype``): the weights it stands for."""
    return pytree.replace(params, {p: dequantize_weight(x).astype(dtype) for p, x in pytree.flatten(params).items()
                                   if is_quantized(x)})
