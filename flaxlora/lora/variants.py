"""LoRA variants on (n_in, n_out) matrices: the initialisations, and all of DoRA's arithmetic.

Every initialiser maps a frozen matrix ``w: (n_in, n_out)`` to ``(a: (n_in, r), b: (r, n_out),
base: (n_in, n_out))`` such that ``base + scale * a @ b == w`` at step 0 (up to rounding): the
zero-``b`` inits leave ``base = w``; PiSSA and OLoRA move a rank-r part of ``w`` into the adapter
and return the residual as the new frozen base.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Init = Callable[[jax.Array, int, float, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]


def kaiming_init(w: jax.Array, rank: int, scale: float, key: jax.Array):
    """Hu et al. / PEFT default: a ~ U(-1/sqrt(n_in), 1/sqrt(n_in)) (Kaiming-uniform, a=sqrt(5)), b = 0."""
    bound = 1.0 / jnp.sqrt(w.shape[0])
    a = jax.random.uniform(key, (w.shape[0], rank), w.dtype, -bound, bound)
    return a, jnp.zeros((rank, w.shape[1]), w.dtype), w


def gaussian_init(w: jax.Array, rank: int, scale: float, key: jax.Array):
    """PEFT's ``init_lora_weights="gaussian"``: a ~ N(0, (1/r)^2), b = 0."""
    a = jax.random.normal(key, (w.shape[0], rank), w.dtype) / rank
    return a, jnp.zeros((rank, w.shape[1]), w.dtype), w


def pissa_init(w: jax.Array, rank: int, scale: float, key: jax.Array):
    """PiSSA: the adapter holds the top-r singular triplets, ``scale * a @ b = U_r S_r V_r^T``."""
    del key
    u, s, vt = jnp.linalg.svd(w, full_matrices=False)
    root = jnp.sqrt(s[:rank] / scale)
    a = u[:, :rank] * root
    b = root[:, None] * vt[:rank]
    return a, b, w - scale * (a @ b)


def olora_init(w: jax.Array, rank: int, scale: float, key: jax.Array):
    """OLoRA, as PEFT: QR of the (n_out, n_in) weight; a = R_r^T, b = Q_r^T; base = w - scale a @ b."""
    del key
    q, r = jnp.linalg.qr(w.T)
    a = r[:rank].T
    b = q[:, :rank].T
    return a, b, w - scale * (a @ b)


INITS: dict[str, Init] = {
    "lora": kaiming_init,
    "gaussian": gaussian_init,
    "pissa": pissa_init,
    "olora": olora_init,
}

RESIDUAL_INITS = ("pissa", "olora")


# DoRA (Liu et al. 2024): W' = m * V / ||V|| per output unit, V = W + s a @ b. As in the paper
# (sec. 4.3) and PEFT, the norm ||V|| is a constant for backprop.


def column_norm(w: jax.Array) -> jax.Array:
    """Per-output-unit L2 norm of ``w: (..., n_in, n_out)`` -> (..., n_out); DoRA's initial magnitude."""
    return jnp.sqrt(jnp.sum(jnp.square(w), axis=-2))


def dora_weight(v: jax.Array, magnitude: jax.Array) -> jax.Array:
    """The merged DoRA weight ``m * v / ||v||`` of ``v: (..., n_in, n_out)``, ``magnitude: (..., n_out)``."""
    norm = jax.lax.stop_gradient(column_norm(v))[..., None, :]
    return magnitude[..., None, :] * v / norm


def factored_column_norm(w: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``column_norm(w + scale * a @ b)`` without forming the (n_in, n_out) sum.

    ||w_j + s (ab)_j||^2 = ||w_j||^2 + 2 s (w^T a)_j . b_j + s^2 b_j^T (a^T a) b_j, which costs
    O(n_in n_out r) like one extra matmul and never allocates a second weight-sized array.
    """
    w_norm2 = jnp.sum(jnp.square(w), axis=0)
    cross = jnp.sum((w.T @ a).T * b, axis=0)
    delta2 = jnp.sum(b * ((a.T @ a) @ b), axis=0)
    return jnp.sqrt(jnp.maximum(w_norm2 + 2 * scale * cross + scale**2 * delta2, 0.0))


def dora_output_scale(w: jax.Array, a: jax.Array, b: jax.Array, scale: float, magnitude: jax.Array) -> jax.Array:
    """(n_out,) factor ``m / ||w + scale a @ b||`` that turns the factored output ``x (w + s a b)``
    into DoRA's, computed without forming the sum (see :func:`factored_column_norm`)."""
    return magnitude / jax.lax.stop_gradient(factored_column_norm(w, a, b, scale))
