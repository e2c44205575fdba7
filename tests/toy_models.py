"""Small random linen/nnx models for the LoRA core tests."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


class ToyAttention(nn.Module):
    """Multi-dimensional DenseGeneral q/k/v (16, 4, 8) and output (4, 8, 16) kernels, plus Dense."""

    @nn.compact
    def __call__(self, x):  # x: (batch, seq, 16) -> (batch, 2)
        q = nn.DenseGeneral((4, 8), name="query")(x)
        k = nn.DenseGeneral((4, 8), name="key")(x)
        v = nn.DenseGeneral((4, 8), name="value")(x)
        att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(8.0), axis=-1)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", att, v)
        h = nn.LayerNorm(name="norm")(x + nn.DenseGeneral(16, axis=(-2, -1), name="out")(ctx))
        h = jax.nn.gelu(nn.Dense(32, name="ffn")(h))
        return nn.Dense(2, name="head")(h.mean(axis=1))


TOY_IN_AXES = {r"out/kernel$": 2}


def toy_setup(seed: int = 0):
    model = ToyAttention()
    x = jax.random.normal(jax.random.key(seed + 1), (3, 5, 16))
    params = model.init(jax.random.key(seed), x)["params"]
    return model, params, x


class NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(12, 24, rngs=rngs)
        self.norm = nnx.LayerNorm(24, rngs=rngs)
        self.down = nnx.Linear(24, 3, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.relu(self.norm(self.up(x))))


def perturb_b(lora, seed: int = 7, scale: float = 0.3):
    """Give every ``b`` random non-zero values, so the adapter changes the model."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(lora)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = [
        scale * jax.random.normal(k, x.shape) if path[-1].key == "b" else x
        for k, (path, x) in zip(keys, leaves)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)
