"""Choosing the architecture from a Hugging Face config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from flaxlora.models.bert import (
    BertForSequenceClassification,
    RobertaForSequenceClassification,
)
from flaxlora.models.config import DECODER_TYPES, ENCODER_TYPES, BertConfig, LlamaConfig
from flaxlora.models.layers import Block, Dtype
from flaxlora.models.llama import LlamaForSequenceClassification

Config = BertConfig | LlamaConfig


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
    raise ValueError(
        f"Unsupported architecture: model_type={model_type!r}, "
        f"architectures={hf.get('architectures')!r}. "
        f"Supported model types: {', '.join(ENCODER_TYPES + DECODER_TYPES)}."
    )


def model_kind(config: Config) -> str:
    """'encoder' or 'decoder'."""
    return "decoder" if isinstance(config, LlamaConfig) else "encoder"


def sequence_classifier(
    config: Config, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32
) -> Block:
    """The sequence-classification model (HF `*ForSequenceClassification`) for `config`."""
    if isinstance(config, LlamaConfig):
        cls = LlamaForSequenceClassification
    elif config.is_roberta:
        cls = RobertaForSequenceClassification
    else:
        cls = BertForSequenceClassification
    return cls(config, dtype, param_dtype)
