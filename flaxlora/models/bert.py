"""BERT-family encoders (BERT, MiniLM, RoBERTa): post-LayerNorm, absolute positions.

Module and parameter names mirror Hugging Face PyTorch (`bert/encoder/layer/0/attention/self/
query/kernel`, ...), with kernels stored (in, out).
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from flaxlora.dataflow import recompute_in_backward
from flaxlora.dropout import Dropout
from flaxlora.models.config import BertConfig
from flaxlora.models.layers import (
    Array,
    Block,
    SequenceClassifier,
    Stack,
    activation,
    attention,
    split_heads,
)


def _positions(input_ids: Array, config: BertConfig) -> Array:
    """(batch, len) position ids: 0.. for BERT; RoBERTa counts non-pad tokens from pad_id + 1
    and gives pad tokens pad_id."""
    if not config.is_roberta:
        return jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    not_pad = (input_ids != config.pad_token_id).astype(jnp.int32)
    return jnp.cumsum(not_pad, axis=1) * not_pad + config.pad_token_id


class BertEmbeddings(Block):
    @nn.compact
    def __call__(self, input_ids: Array, token_type_ids: Array, deterministic: bool) -> Array:
        """(batch, len) ids -> (batch, len, hidden)."""
        cfg = self.config
        x = self.embed(cfg.vocab_size, ("vocab", "embed"), name="word_embeddings")(input_ids)
        positions = _positions(input_ids, cfg)
        x += self.embed(cfg.max_position_embeddings, ("positions", "embed"),
                        name="position_embeddings")(positions)
        x += self.embed(cfg.type_vocab_size, ("token_types", "embed"),
                        name="token_type_embeddings")(token_type_ids)
        x = self.layer_norm(cfg.layer_norm_eps, name="LayerNorm")(x)
        return Dropout(cfg.hidden_dropout_prob)(x, deterministic)


class BertSelfAttention(Block):
    @nn.compact
    def __call__(self, x: Array, mask: Array, deterministic: bool) -> Array:
        """x (batch, len, hidden), mask (batch, 1, len) -> context (batch, len, hidden)."""
        cfg = self.config
        q, k, v = (split_heads(self.dense(cfg.hidden_size, ("embed", "heads"), name=n)(x), cfg.head_dim)
                   .astype(self.dtype) for n in ("query", "key", "value"))
        rate = cfg.attention_probs_dropout_prob
        return attention(q, k, v, mask, scale=cfg.head_dim**-0.5, dropout_rate=rate,
                         dropout_key=Dropout(rate).key(deterministic))


class BertResidualOutput(Block):
    """dense -> dropout -> LayerNorm(x + residual): HF `BertSelfOutput` and `BertOutput`."""

    axes: tuple[str, str] = ("heads", "embed")

    @nn.compact
    def __call__(self, x: Array, residual: Array, deterministic: bool) -> Array:
        cfg = self.config
        x = self.dense(cfg.hidden_size, self.axes, name="dense")(x)
        x = Dropout(cfg.hidden_dropout_prob)(x, deterministic)
        return self.layer_norm(cfg.layer_norm_eps, name="LayerNorm")(x + residual)


class BertAttention(Block):
    @nn.compact
    def __call__(self, x: Array, mask: Array, deterministic: bool) -> Array:
        context = BertSelfAttention(self.config, self.dtype, self.param_dtype, name="self")(
            x, mask, deterministic)
        return BertResidualOutput(self.config, self.dtype, self.param_dtype, name="output")(
            context, x, deterministic)


class BertIntermediate(Block):
    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        return recompute_in_backward(activation(cfg.hidden_act),
                                     self.dense(cfg.intermediate_size, ("embed", "mlp"), name="dense")(x))


class BertLayer(Block):
    @nn.compact
    def __call__(self, x: Array, mask: Array, deterministic: bool) -> Array:
        """(batch, len, hidden) -> (batch, len, hidden); mask (batch, 1, len) marks real keys."""
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        x = BertAttention(cfg, dt, pdt, name="attention")(x, mask, deterministic)
        h = BertIntermediate(cfg, dt, pdt, name="intermediate")(x)
        return BertResidualOutput(cfg, dt, pdt, axes=("mlp", "embed"), name="output")(
            h, x, deterministic)


class BertEncoder(Block):
    @nn.compact
    def __call__(self, x: Array, mask: Array, deterministic: bool) -> Array:
        return Stack(self.config, self.dtype, self.param_dtype, layer=BertLayer, name="layer")(
            x, mask, deterministic)


class BertPooler(Block):
    @nn.compact
    def __call__(self, hidden: Array) -> Array:
        """(batch, len, hidden) -> (batch, hidden): tanh(dense(first token))."""
        dense = self.dense(self.config.hidden_size, ("embed", "embed_out"), name="dense")
        return jnp.tanh(dense(hidden[:, 0]))


class BertModel(Block):
    """The encoder backbone (HF `BertModel` / `RobertaModel`); `pool` is the BERT pooler."""

    def setup(self):
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        self.embeddings = BertEmbeddings(cfg, dt, pdt)
        self.encoder = BertEncoder(cfg, dt, pdt)
        if not cfg.is_roberta:
            self.pooler = BertPooler(cfg, dt, pdt)

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """(batch, len) ids, mask (1 = token, 0 = padding) -> hidden states (batch, len, hidden)."""
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids, deterministic)
        return self.encoder(x, attention_mask[:, None, :].astype(bool), deterministic)

    def pool(self, hidden: Array) -> Array:
        return self.pooler(hidden)


def _classifier_dropout(cfg: BertConfig) -> float:
    return cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout


class BertForSequenceClassification(SequenceClassifier):
    """HF `BertForSequenceClassification`: pooler (dense + tanh on [CLS]) -> dropout -> classifier."""

    backbone: ClassVar[str] = "bert"

    def setup(self):
        cfg = self.config
        self.bert = BertModel(cfg, self.dtype, self.param_dtype)
        self.dropout = Dropout(_classifier_dropout(cfg))
        self.classifier = self.dense(cfg.num_labels, ("embed", "classes"), logits=True)

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """(batch, len) ids and mask (1 = token, 0 = padding) -> logits (batch, num_labels)."""
        hidden = self.hidden_states(input_ids, attention_mask, token_type_ids, deterministic)
        return self.classifier(self.dropout(self.bert.pool(hidden), deterministic))


class RobertaClassificationHead(Block):
    """HF `RobertaClassificationHead`: dropout -> dense -> tanh -> dropout -> out_proj on <s>."""

    @nn.compact
    def __call__(self, hidden: Array, deterministic: bool) -> Array:
        cfg = self.config
        dropout = Dropout(_classifier_dropout(cfg))
        x = dropout(hidden[:, 0], deterministic)
        x = jnp.tanh(self.dense(cfg.hidden_size, ("embed", "embed_out"), name="dense")(x))
        x = dropout(x, deterministic)
        return self.dense(cfg.num_labels, ("embed_out", "classes"), name="out_proj", logits=True)(x)


class RobertaForSequenceClassification(SequenceClassifier):
    """HF `RobertaForSequenceClassification` (no pooler)."""

    backbone: ClassVar[str] = "roberta"

    def setup(self):
        self.roberta = BertModel(self.config, self.dtype, self.param_dtype)
        self.classifier = RobertaClassificationHead(self.config, self.dtype, self.param_dtype)

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """(batch, len) ids and mask (1 = token, 0 = padding) -> logits (batch, num_labels)."""
        hidden = self.hidden_states(input_ids, attention_mask, token_type_ids, deterministic)
        return self.classifier(hidden, deterministic)
