"""T5-family encoder-decoders (T5 v1.0, T5 v1.1, Flan-T5): RMS layer norm without bias or mean,
pre-norm residual blocks, relative position buckets (bidirectional in the encoder, causal in the
decoder; the bias table lives in the first layer and is shared by the later ones), no 1/sqrt(d)
attention scaling (T5 folds it into the initialisation), ReLU or gated-GELU feed-forward.

Module and parameter names mirror Hugging Face PyTorch (`transformer/encoder/block/0/layer/0/
SelfAttention/q/kernel`, `.../layer/1/DenseReluDense/wi_0/kernel`, `transformer/shared/embedding`),
with kernels stored (in, out) and norm weights called `scale`.

Two ways to classify:
  T5ForSequenceClassification   HF's: the decoder is fed the input ids shifted right, the state
                                 at the last eos token goes through `classification_head`.
  T5ForTextToText               the T5 paper's GLUE setup: the logit of class c is the decoder's
                                 log-likelihood of label c's words (then eos) given the input.
"""

from __future__ import annotations

import math
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxlora.dataflow import recompute_in_backward
from flaxlora.dropout import Dropout
from flaxlora.models.layers import (
    Array,
    Block,
    SequenceClassifier,
    activation,
    attention,
    remat_layer,
    split_heads,
)


def relative_position_buckets(q_len: int, kv_len: int, *, bidirectional: bool, num_buckets: int,
                              max_distance: int) -> np.ndarray:
    """(q_len, kv_len) int32 bucket of each key position minus query position (Mesh TensorFlow's
    T5 rule): exact buckets for small distances, logarithmic ones up to max_distance, one side per
    half of the buckets when bidirectional, only keys at or before the query when not.

    Computed in float32 like the reference, so the bucket edges agree with it exactly.
    """
    relative = np.arange(kv_len)[None, :] - np.arange(q_len)[:, None]
    buckets = np.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0) * num_buckets
        relative = np.abs(relative)
    else:
        relative = -np.minimum(relative, 0)
    max_exact = num_buckets // 2
    log_ratio = np.log(np.maximum(relative, 1).astype(np.float32) / max_exact) / math.log(max_distance / max_exact)
    large = np.minimum(max_exact + (log_ratio * (num_buckets - max_exact)).astype(np.int64), num_buckets - 1)
    return (buckets + np.where(relative < max_exact, relative, large)).astype(np.int32)


def shift_right(input_ids: Array, start_id: int) -> Array:
    """(batch, len) -> (batch, len): `start_id`, then the ids without the last one (HF `_shift_right`)."""
    input_ids = jnp.asarray(input_ids)
    start = jnp.full((input_ids.shape[0], 1), start_id, input_ids.dtype)
    return jnp.concatenate([start, input_ids[:, :-1]], axis=1)


class T5Attention(Block):
    """q, k, v, o without biases and without score scaling. With `relative_bias` the layer owns
    the (buckets, heads) table `relative_attention_bias` and computes the position bias."""

    relative_bias: bool = False
    causal: bool = False

    @nn.compact
    def __call__(self, x: Array, kv: Array, mask: Array, position_bias: Array | None,
                 deterministic: bool) -> tuple[Array, Array | None]:
        """x (batch, q_len, d_model) attends to kv (batch, kv_len, d_model) where mask (batch,
        q_len or 1, kv_len) allows, adding position_bias (1, heads, q_len, kv_len) if given.

        Returns (batch, q_len, d_model) and the position bias used (None when there was none).
        """
        cfg, f = self.config, self.config.initializer_factor
        d, inner = cfg.d_model, cfg.num_heads * cfg.d_kv
        q = self.dense(inner, ("embed", "heads"), use_bias=False, stddev=f * (d * cfg.d_kv) ** -0.5, name="q")(x)
        k = self.dense(inner, ("embed", "heads"), use_bias=False, stddev=f * d**-0.5, name="k")(kv)
        v = self.dense(inner, ("embed", "heads"), use_bias=False, stddev=f * d**-0.5, name="v")(kv)
        if self.relative_bias:
            table = self.embed(cfg.relative_attention_num_buckets, ("buckets", "head_count"),
                               features=cfg.num_heads, stddev=f * d**-0.5, name="relative_attention_bias")
            buckets = relative_position_buckets(
                x.shape[1], kv.shape[1], bidirectional=not self.causal,
                num_buckets=cfg.relative_attention_num_buckets, max_distance=cfg.relative_attention_max_distance)
            position_bias = jnp.transpose(table(buckets), (2, 0, 1))[None]
        out = attention(*(split_heads(t, cfg.d_kv) for t in (q, k, v)), mask, bias=position_bias,
                        dropout_rate=cfg.dropout_rate, dropout_key=Dropout(cfg.dropout_rate).key(deterministic))
        o = self.dense(d, ("heads", "embed"), use_bias=False, stddev=f * inner**-0.5, name="o")
        return o(out), position_bias


class T5LayerSelfAttention(Block):
    relative_bias: bool = False
    causal: bool = False

    @nn.compact
    def __call__(self, x: Array, mask: Array, position_bias: Array | None,
                 deterministic: bool) -> tuple[Array, Array | None]:
        cfg = self.config
        h = self.rms_norm(cfg.layer_norm_epsilon, name="layer_norm")(x)
        attention = T5Attention(cfg, self.dtype, self.param_dtype, relative_bias=self.relative_bias,
                                causal=self.causal, name="SelfAttention")
        out, position_bias = attention(h, h, mask, position_bias, deterministic)
        return x + Dropout(cfg.dropout_rate)(out, deterministic), position_bias


class T5LayerCrossAttention(Block):
    @nn.compact
    def __call__(self, x: Array, encoded: Array, encoded_mask: Array, deterministic: bool) -> Array:
        cfg = self.config
        h = self.rms_norm(cfg.layer_norm_epsilon, name="layer_norm")(x)
        out, _ = T5Attention(cfg, self.dtype, self.param_dtype, name="EncDecAttention")(
            h, encoded, encoded_mask, None, deterministic)
        return x + Dropout(cfg.dropout_rate)(out, deterministic)


class T5DenseReluDense(Block):
    """HF `T5DenseActDense` (wo(act(wi x))) or, when `is_gated_act`, `T5DenseGatedActDense`
    (wo(act(wi_0 x) * wi_1 x))."""

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        cfg, f = self.config, self.config.initializer_factor
        act = activation(cfg.dense_act_fn)

        def wi(name: str) -> Array:
            return self.dense(cfg.d_ff, ("embed", "mlp"), use_bias=False, stddev=f * cfg.d_model**-0.5, name=name)(x)

        if cfg.is_gated_act:
            h = recompute_in_backward(lambda g, u: act(g) * u, wi("wi_0"), wi("wi_1"))
        else:
            h = recompute_in_backward(act, wi("wi"))
        h = Dropout(cfg.dropout_rate)(h, deterministic)
        return self.dense(cfg.d_model, ("mlp", "embed"), use_bias=False, stddev=f * cfg.d_ff**-0.5, name="wo")(h)


class T5LayerFF(Block):
    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        cfg = self.config
        h = self.rms_norm(cfg.layer_norm_epsilon, name="layer_norm")(x)
        h = T5DenseReluDense(cfg, self.dtype, self.param_dtype, name="DenseReluDense")(h, deterministic)
        return x + Dropout(cfg.dropout_rate)(h, deterministic)


class T5BlockLayers(Block):
    """HF `T5Block.layer`: '0' self-attention, in the decoder '1' cross-attention, then feed-forward."""

    is_decoder: bool = False
    relative_bias: bool = False

    @nn.compact
    def __call__(self, x: Array, mask: Array, position_bias: Array | None, encoded: Array | None,
                 encoded_mask: Array | None, deterministic: bool) -> tuple[Array, Array | None]:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        x, position_bias = T5LayerSelfAttention(cfg, dt, pdt, relative_bias=self.relative_bias,
                                                causal=self.is_decoder, name="0")(x, mask, position_bias, deterministic)
        if self.is_decoder:
            x = T5LayerCrossAttention(cfg, dt, pdt, name="1")(x, encoded, encoded_mask, deterministic)
        x = T5LayerFF(cfg, dt, pdt, name=str(2 if self.is_decoder else 1))(x, deterministic)
        return x, position_bias


class T5Block(Block):
    """One HF `T5Block` (its sublayers under `layer`)."""

    is_decoder: bool = False
    relative_bias: bool = False

    @nn.compact
    def __call__(self, *args) -> tuple[Array, Array | None]:
        return T5BlockLayers(self.config, self.dtype, self.param_dtype, is_decoder=self.is_decoder,
                             relative_bias=self.relative_bias, name="layer")(*args)


class T5Blocks(Block):
    """HF `T5Stack.block`: blocks '0', '1', ...; the first computes the position bias, all use it."""

    is_decoder: bool = False

    @nn.compact
    def __call__(self, x: Array, mask: Array, encoded: Array | None, encoded_mask: Array | None,
                 deterministic: bool) -> Array:
        cfg = self.config
        position_bias = None
        layer = remat_layer(T5Block, cfg.remat, deterministic_argnum=6)
        for i in range(cfg.num_decoder_layers if self.is_decoder else cfg.num_layers):
            block = layer(cfg, self.dtype, self.param_dtype, is_decoder=self.is_decoder, relative_bias=i == 0,
                            name=str(i))
            x, position_bias = block(x, mask, position_bias, encoded, encoded_mask, deterministic)
        return x


class T5Stack(Block):
    """HF `T5Stack` without its embedding (the shared table is applied by `T5Model`)."""

    is_decoder: bool = False

    @nn.compact
    def __call__(self, x: Array, mask: Array, encoded: Array | None = None, encoded_mask: Array | None = None,
                 deterministic: bool = True) -> Array:
        """Embedded tokens (batch, len, d_model) -> final-norm states (batch, len, d_model).

        mask: (batch, len or 1, len) self-attention mask; encoded (batch, src_len, d_model) and
        encoded_mask (batch, 1, src_len) feed the decoder's cross-attention.
        """
        cfg = self.config
        dropout = Dropout(cfg.dropout_rate)
        # The residual stream is float32 whatever the compute dtype (as under PyTorch's autocast).
        x = T5Blocks(cfg, self.dtype, self.param_dtype, is_decoder=self.is_decoder, name="block")(
            dropout(x.astype(jnp.float32), deterministic), mask, encoded, encoded_mask, deterministic)
        return dropout(self.rms_norm(cfg.layer_norm_epsilon, name="final_layer_norm")(x), deterministic)


class T5Model(Block):
    """The encoder-decoder (HF `T5Model`): `shared` embedding, `encoder`, `decoder`."""

    def setup(self):
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        self.shared = self.embed(cfg.vocab_size, ("vocab", "embed"), features=cfg.d_model,
                                 stddev=cfg.initializer_factor)
        self.encoder = T5Stack(cfg, dt, pdt, is_decoder=False)
        self.decoder = T5Stack(cfg, dt, pdt, is_decoder=True)

    def encode(self, input_ids: Array, attention_mask: Array, deterministic: bool = True) -> Array:
        """(batch, len) ids, mask (1 = token, 0 = padding) -> encoder states (batch, len, d_model)."""
        return self.encoder(self.shared(input_ids), attention_mask[:, None, :].astype(bool),
                            deterministic=deterministic)

    def decode(self, decoder_input_ids: Array, encoded: Array, attention_mask: Array,
               deterministic: bool = True) -> Array:
        """Causal decoder states (batch, tgt_len, d_model) for decoder_input_ids (batch, tgt_len),
        attending to encoded (batch, len, d_model) where attention_mask (batch, len) is 1."""
        causal = jnp.tril(jnp.ones((decoder_input_ids.shape[1],) * 2, bool))[None]
        return self.decoder(self.shared(decoder_input_ids), causal, encoded,
                            attention_mask[:, None, :].astype(bool), deterministic)

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """The pass of HF `T5ForSequenceClassification`: decoder states (batch, len, d_model) for
        the input ids shifted right, attending to the encoded input. `token_type_ids` is ignored."""
        del token_type_ids
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        encoded = self.encode(input_ids, attention_mask, deterministic)
        return self.decode(shift_right(input_ids, self.config.decoder_start_token_id), encoded,
                           attention_mask, deterministic)


def last_eos(hidden: Array, input_ids: Array, eos_id: int) -> Array:
    """(batch, len, d) -> (batch, d) at each row's last `eos_id` token (position 0 if none)."""
    index = jnp.argmax(jnp.where(input_ids == eos_id, jnp.arange(input_ids.shape[1]), -1), axis=1)
    return hidden[jnp.arange(hidden.shape[0]), index]


class T5ClassificationHead(Block):
    """HF `T5ClassificationHead`: dropout -> dense -> tanh -> dropout -> out_proj."""

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        cfg = self.config
        stddev = cfg.initializer_factor * cfg.d_model**-0.5
        dropout = Dropout(cfg.classifier_dropout)
        x = self.dense(cfg.d_model, ("embed", "embed_out"), stddev=stddev, name="dense")(dropout(x, deterministic))
        x = dropout(jnp.tanh(x), deterministic)
        return self.dense(cfg.num_labels, ("embed_out", "classes"), stddev=stddev, name="out_proj", logits=True)(x)


class T5ForSequenceClassification(SequenceClassifier):
    """HF `T5ForSequenceClassification`: the decoder state at the last eos token of the input
    -> `classification_head`. Every input must contain the eos token (T5 tokenizers append it)."""

    backbone: ClassVar[str] = "transformer"

    def setup(self):
        self.transformer = T5Model(self.config, self.dtype, self.param_dtype)
        self.classification_head = T5ClassificationHead(self.config, self.dtype, self.param_dtype)

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """(batch, len) ids and mask (1 = token, 0 = padding) -> logits (batch, num_labels)."""
        hidden = self.hidden_states(input_ids, attention_mask, token_type_ids, deterministic)
        return self.classification_head(last_eos(hidden, input_ids, self.config.eos_token_id), deterministic)


def label_targets(label_ids: tuple[tuple[int, ...], ...], eos_id: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Each label's token ids then eos, right-padded with pad_id: ((labels, len) int32, (labels, len) bool valid)."""
    if not label_ids or not all(label_ids):
        raise ValueError(f"text-to-text classification needs a non-empty token sequence per label, got {label_ids}")
    rows = [list(ids) + [eos_id] for ids in label_ids]
    width = max(map(len, rows))
    targets = np.array([row + [pad_id] * (width - len(row)) for row in rows], np.int32)
    return targets, np.arange(width)[None, :] < np.array([len(row) for row in rows])[:, None]


class T5ForTextToText(SequenceClassifier):
    """Text-to-text classification (HF `T5ForConditionalGeneration` scoring fixed answers): the
    logit of class c is log p(label_ids[c] + eos | input), summed over the label's tokens under
    teacher forcing, so argmax picks the most likely label text and a softmax cross-entropy on
    these logits trains the label words' likelihood against each other.

    The LM head is the shared embedding table when `tie_word_embeddings`, else `lm_head`.
    """

    backbone: ClassVar[str] = "transformer"
    label_ids: tuple[tuple[int, ...], ...] = ()

    def setup(self):
        cfg = self.config
        self.transformer = T5Model(cfg, self.dtype, self.param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = self.dense(cfg.vocab_size, ("embed", "vocab"), use_bias=False,
                                      stddev=cfg.initializer_factor, logits=True)

    def lm_logits(self, decoder_states: Array) -> Array:
        """(..., d_model) decoder states -> (..., vocab) next-token logits."""
        cfg = self.config
        if cfg.scale_decoder_outputs:
            decoder_states = decoder_states * cfg.d_model**-0.5
        if cfg.tie_word_embeddings:
            return self.transformer.shared.attend(decoder_states)
        return self.lm_head(decoder_states)

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """(batch, len) ids and mask (1 = token, 0 = padding) -> (batch, labels) log-likelihoods."""
        cfg = self.config
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        targets, valid = label_targets(self.label_ids, cfg.eos_token_id, cfg.pad_token_id)
        batch, labels = input_ids.shape[0], targets.shape[0]
        encoded = self.transformer.encode(input_ids, attention_mask, deterministic)
        # Row r of the decoder batch scores label r % labels for example r // labels.
        decoder_ids = np.tile(np.concatenate([np.full((labels, 1), cfg.decoder_start_token_id), targets[:, :-1]], 1),
                              (batch, 1))
        states = self.transformer.decode(jnp.asarray(decoder_ids), jnp.repeat(encoded, labels, axis=0),
                                         jnp.repeat(attention_mask, labels, axis=0), deterministic)
        log_probs = jax.nn.log_softmax(self.lm_logits(states).astype(jnp.float32), axis=-1)
        token_scores = jnp.take_along_axis(log_probs, np.tile(targets, (batch, 1))[..., None], axis=-1)[..., 0]
        return jnp.sum(token_scores * np.tile(valid, (batch, 1)), axis=-1).reshape(batch, labels)
