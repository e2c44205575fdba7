"""Llama-family decoders (Llama 2/3, SmolLM2): RMSNorm, rotate-half RoPE, grouped-query
attention, SwiGLU.

Module and parameter names mirror Hugging Face PyTorch (`model/layers/0/self_attn/q_proj/kernel`,
...), with kernels stored (in, out) and norm weights called `scale`.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from flaxlora.dataflow import recompute_in_backward
from flaxlora.dropout import Dropout
from flaxlora.models.config import LlamaConfig
from flaxlora.models.layers import (
    Array,
    Block,
    SequenceClassifier,
    Stack,
    activation,
    attention,
    split_heads,
)


def rope_frequencies(cfg: LlamaConfig) -> np.ndarray:
    """(head_dim // 2,) RoPE inverse frequencies, with Llama 3 scaling when configured.

    Llama 3 divides the frequencies of wavelengths longer than
    original_max_position_embeddings / low_freq_factor by `factor`, keeps those shorter than
    original_max_position_embeddings / high_freq_factor, and interpolates linearly in between.
    """
    inv_freq = cfg.rope_theta ** -(np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
    s = cfg.rope_scaling
    if s is not None:
        periods_in_context = s.original_max_position_embeddings * inv_freq / (2 * np.pi)
        keep = np.clip((periods_in_context - s.low_freq_factor)
                       / (s.high_freq_factor - s.low_freq_factor), 0.0, 1.0)
        inv_freq = keep * inv_freq + (1.0 - keep) * inv_freq / s.factor
    return inv_freq.astype(np.float32)


def rope_angles(positions: Array, inv_freq: np.ndarray) -> tuple[Array, Array]:
    """(batch, len) positions -> cos, sin of shape (batch, len, 1, head_dim), fp32."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates (batch, len, heads, head_dim) in HF's rotate-half form (pairs i, i + head_dim/2)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)


class LlamaAttention(Block):
    @nn.compact
    def __call__(self, x: Array, mask: Array, rope: tuple[Array, Array], deterministic: bool) -> Array:
        """x (batch, len, hidden), mask (batch, len, len) -> (batch, len, hidden)."""
        cfg = self.config
        d, bias = cfg.head_dim, cfg.attention_bias
        q = self.dense(cfg.num_attention_heads * d, ("embed", "heads"), use_bias=bias, name="q_proj")(x)
        k = self.dense(cfg.num_key_value_heads * d, ("embed", "kv"), use_bias=bias, name="k_proj")(x)
        v = self.dense(cfg.num_key_value_heads * d, ("embed", "kv"), use_bias=bias, name="v_proj")(x)
        q, k = (apply_rope(split_heads(t, d), *rope).astype(self.dtype) for t in (q, k))
        out = attention(q, k, split_heads(v.astype(self.dtype), d), mask, scale=d**-0.5,
                        dropout_rate=cfg.attention_dropout, dropout_key=Dropout(cfg.attention_dropout).key(deterministic))
        return self.dense(cfg.hidden_size, ("heads", "embed"), use_bias=bias, name="o_proj")(out)


class LlamaMLP(Block):
    @nn.compact
    def __call__(self, x: Array) -> Array:
        """SwiGLU: down(act(gate(x)) * up(x))."""
        cfg = self.config
        gate = self.dense(cfg.intermediate_size, ("embed", "mlp"), use_bias=cfg.mlp_bias, name="gate_proj")
        up = self.dense(cfg.intermediate_size, ("embed", "mlp"), use_bias=cfg.mlp_bias, name="up_proj")
        down = self.dense(cfg.hidden_size, ("mlp", "embed"), use_bias=cfg.mlp_bias, name="down_proj")
        act = activation(cfg.hidden_act)
        return down(recompute_in_backward(lambda g, u: act(g) * u, gate(x), up(x)))


class LlamaDecoderLayer(Block):
    @nn.compact
    def __call__(self, x: Array, mask: Array, rope: tuple[Array, Array], deterministic: bool) -> Array:
        """Pre-norm residual block: (batch, len, hidden) -> (batch, len, hidden)."""
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        h = self.rms_norm(cfg.rms_norm_eps, name="input_layernorm")(x)
        x = x + LlamaAttention(cfg, dt, pdt, name="self_attn")(h, mask, rope, deterministic)
        h = self.rms_norm(cfg.rms_norm_eps, name="post_attention_layernorm")(x)
        return x + LlamaMLP(cfg, dt, pdt, name="mlp")(h)


class LlamaModel(Block):
    """The decoder backbone (HF `LlamaModel`)."""

    def setup(self):
        cfg = self.config
        self.embed_tokens = self.embed(cfg.vocab_size, ("vocab", "embed"))
        self.layers = Stack(cfg, self.dtype, self.param_dtype, layer=LlamaDecoderLayer)
        self.norm = self.rms_norm(cfg.rms_norm_eps)

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """(batch, len) ids, mask (1 = token, 0 = padding) -> final-norm hidden (batch, len, hidden).

        Positions count real tokens only, so left and right padding give the same states for
        the real tokens. `token_type_ids` is accepted for a uniform signature and ignored.
        """
        del token_type_ids
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        keep = attention_mask.astype(bool)
        positions = jnp.maximum(jnp.cumsum(keep, axis=1) - 1, 0)
        causal = jnp.tril(jnp.ones((input_ids.shape[1],) * 2, bool))
        mask = causal[None] & keep[:, None, :]
        rope = rope_angles(positions, rope_frequencies(self.config))
        # The residual stream is float32 whatever the compute dtype (as under PyTorch's autocast),
        # from the first layer on: in and out of every layer alike (what a scanned stack carries).
        x = self.layers(self.embed_tokens(input_ids).astype(jnp.float32), mask, rope, deterministic)
        return self.norm(x)


def last_token(hidden: Array, attention_mask: Array) -> Array:
    """(batch, len, hidden) -> (batch, hidden) at each row's last position with mask 1."""
    index = jnp.argmax(jnp.arange(hidden.shape[1]) * attention_mask, axis=1)
    return hidden[jnp.arange(hidden.shape[0]), index]


class LlamaForSequenceClassification(SequenceClassifier):
    """HF `LlamaForSequenceClassification`: `score` (no bias) on the last non-padding token."""

    backbone: ClassVar[str] = "model"

    def setup(self):
        self.model = LlamaModel(self.config, self.dtype, self.param_dtype)
        self.score = self.dense(self.config.num_labels, ("embed", "classes"), use_bias=False, logits=True)

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """(batch, len) ids and mask (1 = token, 0 = padding) -> logits (batch, num_labels)."""
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        hidden = self.hidden_states(input_ids, attention_mask, token_type_ids, deterministic)
        return self.score(last_token(hidden, attention_mask))
