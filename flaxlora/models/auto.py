"""Choosing the architecture from a Hugging Face config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from flaxlora.models.bert import (
    BertForSequenceClassification,
    RobertaForSequenceClassification,
)
from flaxlora.models.config import (
    DECODER_TYPES,
    ENCODER_DECODER_TYPES,
    ENCODER_TYPES,
    UNSUPPORTED_T5,
    BertConfig,
    LlamaConfig,
    T5Config,
)
from flaxlora.models.layers import Block, Dtype
from flaxlora.models.llama import LlamaForSequenceClassification
from flaxlora.models.t5 import T5ForSequenceClassification, T5ForTextToText

Config = BertConfig | LlamaConfig | T5Config


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> Config:
    """Our config for a Hugging Face `config.json` dict; `overrides` (e.g. num_labels) win.

    Raises:
      ValueError: the `model_type` is not a supported architecture.
    """
    model_type = hf.get("model_type")
    if model_type in ENCODER_TYPES:
        return BertConfig.from_hf(hf, **overrides)
    if model_type in DECODER_TYPES:
        return LlamaConfig.from_hf(hf, **overrides)
    if model_type in ENCODER_DECODER_TYPES or model_type in UNSUPPORTED_T5:
        return T5Config.from_hf(hf, **overrides)
    raise ValueError(
        f"Unsupported architecture: model_type={model_type!r}, "
        f"architectures={hf.get('architectures')!r}. "
        f"Supported model types: {', '.join(ENCODER_TYPES + DECODER_TYPES + ENCODER_DECODER_TYPES)}."
    )


def model_kind(config: Config) -> str:
    """'encoder', 'decoder' or 'encoder-decoder' (T5)."""
    if isinstance(config, T5Config):
        return "encoder-decoder"
    return "decoder" if isinstance(config, LlamaConfig) else "encoder"


def sequence_classifier(
    config: Config, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32
) -> Block:
    """The sequence-classification model (HF `*ForSequenceClassification`) for `config`."""
    if isinstance(config, LlamaConfig):
        cls = LlamaForSequenceClassification
    elif isinstance(config, T5Config):
        cls = T5ForSequenceClassification
    elif config.is_roberta:
        cls = RobertaForSequenceClassification
    else:
        cls = BertForSequenceClassification
    return cls(config, dtype, param_dtype)


def text_to_text_classifier(
    config: Config, label_ids: tuple[tuple[int, ...], ...], *, dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
) -> Block:
    """The T5 classifier scoring the label token sequences `label_ids` with its LM head.

    Raises:
      ValueError: `config` is not a T5 config.
    """
    if not isinstance(config, T5Config):
        raise ValueError(f"text-to-text classification scores label words with a T5 decoder; "
                         f"model_type {config.model_type!r} has none (use a T5 model)")
    return T5ForTextToText(config, dtype, param_dtype, label_ids=tuple(map(tuple, label_ids)))
