"""Flax (linen) transformer backbones with Hugging Face parameter names.

Params paths mirror the PyTorch module names with '/' for '.', e.g.
`bert/encoder/layer/0/attention/self/query/kernel`, `model/layers/0/self_attn/q_proj/kernel` or
`transformer/encoder/block/0/layer/0/SelfAttention/q/kernel` (T5);
dense kernels are (in, out), norms have `scale` (and `bias`), embeddings `embedding`.

    model = sequence_classifier(config)
    params = init_params(model, jax.random.key(0))           # plain arrays
    logits = model.apply({"params": params}, input_ids, attention_mask)
    hidden = model.apply({"params": params}, input_ids, attention_mask, method="hidden_states")
"""

from flaxlora.models.auto import (
    config_from_hf,
    model_kind,
    sequence_classifier,
    text_to_text_classifier,
)
from flaxlora.models.bert import (
    BertForSequenceClassification,
    BertModel,
    RobertaForSequenceClassification,
)
from flaxlora.models.config import BertConfig, LlamaConfig, RopeScaling, T5Config
from flaxlora.models.llama import LlamaForSequenceClassification, LlamaModel
from flaxlora.models.partitioning import (
    LOGICAL_AXIS_RULES,
    init_params,
    logical_partition_specs,
)
from flaxlora.models.scan import scanned_config, stack_layers, unstack_layers
from flaxlora.models.t5 import T5ForSequenceClassification, T5ForTextToText, T5Model

__all__ = [
    "LOGICAL_AXIS_RULES",
    "BertConfig",
    "BertForSequenceClassification",
    "BertModel",
    "LlamaConfig",
    "LlamaForSequenceClassification",
    "LlamaModel",
    "RobertaForSequenceClassification",
    "RopeScaling",
    "T5Config",
    "T5ForSequenceClassification",
    "T5ForTextToText",
    "T5Model",
    "config_from_hf",
    "init_params",
    "logical_partition_specs",
    "model_kind",
    "scanned_config",
    "sequence_classifier",
    "stack_layers",
    "text_to_text_classifier",
    "unstack_layers",
]
