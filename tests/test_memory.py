"""XLA's account of a compiled step's memory (flaxlora.memory), and the memory model against it."""

import jax
import jax.numpy as jnp

from flaxlora.memory import memory_account
from flaxlora.models.layers import f32_accumulated_dot


def _chain_gradient(dot):
    """The input gradient of four tanh layers on frozen float32 weights, multiplied in bf16."""
    def loss(x, weights):
        h = x
        for w in weights:
            h = jnp.tanh(dot(h, w))
        return jnp.sum(h.astype(jnp.float32))

    return jax.jit(jax.grad(loss))


def test_the_account_finds_the_bf16_copies_of_frozen_weights_a_plain_cast_keeps():
    x = jax.ShapeDtypeStruct((64, 256), jnp.bfloat16)
    weights = [jax.ShapeDtypeStruct((256, 256), jnp.float32)] * 4
    plain = lambda h, w: h @ w.astype(jnp.bfloat16)  # noqa: E731  (the cast is kept for the backward pass)
    ours = lambda h, w: f32_accumulated_dot(h, w).astype(h.dtype)  # noqa: E731
    _, cast = memory_account(_chain_gradient(plain).lower(x, weights), ("batch", "frozen"))
    _, kept = memory_account(_chain_gradient(ours).lower(x, weights), ("batch", "frozen"))
    for account in (cast, kept):
        assert account.by_category["frozen"] == 4 * 256 * 256 * 4 and account.by_category["batch"] == 64 * 256 * 2
        assert account.by_category["activations"] > 0
        assert account.peak <= account.argument + account.output + account.temp
    assert cast.by_category["copies"] >= 3 * 256 * 256 * 2 and set(cast.copies_of) == {"frozen"}
    assert kept.by_category["copies"] == 0
