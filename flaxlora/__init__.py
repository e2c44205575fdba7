"""flaxlora: pure-functional LoRA fine-tuning for JAX/Flax transformers."""

from flaxlora.config import LoraConfig
from flaxlora.factored import apply_factored, lora_interceptor
from flaxlora.lora import apply_lora, extract_lora, init_adapter, init_lora, merge, trainable_params, unmerge
from flaxlora.optim import adapter_labels, freeze_labels, lora_optimizer, trainable_mask
from flaxlora.paths import lora_candidates
from flaxlora.summary import ParamSummary, summarize
from flaxlora.targets import resolve_targets, trainable_paths

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "ParamSummary",
    "adapter_labels",
    "apply_factored",
    "apply_lora",
    "extract_lora",
    "freeze_labels",
    "init_adapter",
    "init_lora",
    "lora_candidates",
    "lora_interceptor",
    "lora_optimizer",
    "merge",
    "resolve_targets",
    "summarize",
    "trainable_mask",
    "trainable_params",
    "trainable_paths",
    "unmerge",
]
