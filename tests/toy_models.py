"""Small random linen/nnx models for the LoRA core tests."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
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


class ToyClassifier(nn.Module):
    """A tiny token classifier with the flaxlora.models call signature."""

    vocab: int = 32
    width: int = 16
    dropout: float = 0.1

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic=True):
        x = nn.Embed(self.vocab, self.width, name="embed")(input_ids)
        x = jax.nn.gelu(nn.Dense(self.width, name="query")(x))
        x = nn.Dropout(self.dropout)(x, deterministic)
        x = jax.nn.gelu(nn.Dense(self.width, name="value")(x)) + x
        mask = attention_mask[..., None].astype(x.dtype)
        pooled = (x * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)
        return nn.Dense(2, name="head")(pooled)


def toy_batches(n_batches: int, batch_size: int = 16, seq: int = 8, seed: int = 0, vocab: int = 32):
    """Label 1 iff token 3 occurs among the real tokens; the last 2 rows of each batch are padding."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        ids = rng.integers(4, vocab, (batch_size, seq)).astype(np.int32)
        lengths = rng.integers(2, seq + 1, batch_size)
        mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int32)
        hit = rng.random(batch_size) < 0.5
        ids[hit, 0] = 3
        ids = ids * mask
        weights = np.ones(batch_size, np.float32)
        weights[-2:] = 0.0
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
                    "labels": hit.astype(np.int32), "weights": weights})
    return out


def tied_lm_logits(pretrained, ids, mask):
    """(batch, len, vocab) next-token logits of a decoder with tied embeddings: hidden @ table.T."""
    def logits(params, ids, mask):
        hidden = pretrained.model.apply({"params": params}, ids, mask, method="hidden_states")
        return hidden @ params["model"]["embed_tokens"]["embedding"].T
    return jax.jit(logits)(pretrained.params, ids, mask)
