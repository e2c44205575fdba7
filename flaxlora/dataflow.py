"""Two small tools that shape what XLA keeps for the backward pass and when it computes, shared by
the models (:mod:`flaxlora.models.layers`) and the quantized Dense layers (:mod:`flaxlora.quant`).

    DENSE_OUTPUT           the checkpoint name of a dense layer's output (``--remat block`` keeps it)
    computed_after(x, a)   ``x``, computed only once ``a`` exists
"""

from __future__ import annotations

import jax

# jax.ad_checkpoint.checkpoint_name of every dense layer's output, quantized or not.
DENSE_OUTPUT = "dense_output"


def computed_after(x: jax.Array, anchor: jax.Array) -> jax.Array:
    """``x`` plus ``anchor``'s first value times zero: the same values, computed only once
    ``anchor`` exists, so XLA can neither schedule what follows earlier nor share it with the
    same computation elsewhere (e.g. the forward pass's, from the backward pass)."""
    return x + (anchor.reshape(-1)[0] * 0).astype(x.dtype)
