"""Merged models as Hugging Face folders that ``transformers`` loads as they are.

    save_merged(folder, pretrained, merge_pretrained(params, lora, config, extras), labels)
    AutoModelForSequenceClassification.from_pretrained(folder)        # in PyTorch

The folder holds ``config.json`` (built from our architecture config, so a GGUF base gets a
proper ``LlamaConfig``, with ``architectures``, ``num_labels`` and ``id2label``),
``model.safetensors`` (float32, torch names and (out, in) layout from
:func:`flaxlora.loading.to_hf`) and the tokenizer files.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import transformers
from safetensors.numpy import save_file
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)

from flaxlora import pytree
from flaxlora.loading import Pretrained, to_hf
from flaxlora.models import LlamaConfig, T5Config
from flaxlora.models.auto import Config

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def hf_config(config: Config, labels: Sequence[str] | None = None) -> transformers.PretrainedConfig:
    """The ``transformers`` config of the sequence classifier with our ``config``.

    ``labels`` (one name per class) sets id2label / label2id; default LABEL_0, LABEL_1, ...
    """
    fields = dataclasses.asdict(config)
    model_type = fields.pop("model_type")
    if isinstance(config, LlamaConfig):
        scaling, theta = fields.pop("rope_scaling"), fields.pop("rope_theta")
        rope = {"rope_type": "llama3", **scaling} if scaling else {"rope_type": "default"}
        fields["rope_parameters"] = {**rope, "rope_theta": theta}
    if isinstance(config, T5Config):  # transformers reads the LM-head rescale from tie_word_embeddings
        fields["tie_word_embeddings"] = fields.pop("scale_decoder_outputs")
    hf = transformers.AutoConfig.for_model(model_type, **fields)
    hf.architectures = [MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES[model_type]]
    if labels is not None:
        if len(labels) != config.num_labels:
            raise ValueError(f"{len(labels)} label names for a classifier with {config.num_labels} outputs")
        hf.id2label = dict(enumerate(labels))
        hf.label2id = {label: i for i, label in enumerate(labels)}
    return hf


def classification_pad_token(tokenizer: transformers.PreTrainedTokenizerBase) -> str:
    """The pad token a decoder classifier needs in ``transformers``.

    ``transformers`` pools the rightmost token that is not ``pad_token_id``; flaxlora pools the
    last attended token. They agree unless an input ends with the pad token, which happens when
    the tokenizer pads with its eos token (SmolLM2) and inputs end with eos (our QQP prompts do):
    then unk, or else bos, is the pad token instead.
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token != tokenizer.eos_token:
        return tokenizer.pad_token
    for token in (tokenizer.unk_token, tokenizer.bos_token):
        if token is not None and token != tokenizer.eos_token:
            return token
    raise ValueError("the tokenizer has no pad, unk or bos token other than its eos token to pad with")


def save_merged(
    folder: str | os.PathLike, pretrained: Pretrained, params: pytree.PyTree, labels: Sequence[str] | None = None
) -> None:
    """Write the classifier ``pretrained.model`` with merged ``params`` as a Hugging Face folder.

    Args:
      folder: created if needed.
      pretrained: the loaded base (its config and tokenizer are written).
      params: a plain params tree for ``pretrained.model``, e.g. from :func:`flaxlora.merge`.
      labels: class names for id2label, or None.
    """
    if pretrained.kind == "text-to-text":
        raise ValueError("a text-to-text T5 classifier has no classification head: it cannot be saved as a "
                         "sequence classifier")
    hf = hf_config(pretrained.config, labels)
    tokenizer = pretrained.tokenizer
    if pretrained.kind == "decoder":
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.pad_token = classification_pad_token(tokenizer)
        hf.pad_token_id = tokenizer.pad_token_id
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {name: np.ascontiguousarray(value, np.float32) for name, value in to_hf(params).items()}
    save_file(weights, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    hf.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
