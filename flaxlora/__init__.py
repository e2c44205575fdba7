"""flaxlora: pure-functional LoRA fine-tuning for JAX/Flax transformers."""

from flaxlora.config import LoraConfig
from flaxlora.factored import apply_factored, lora_interceptor
from flaxlora.data import TrainIterator, default_buckets, encode_pairs, eval_batches, load_qqp
from flaxlora.evaluate import evaluate
from flaxlora.lora import (
    apply_lora,
    extract_lora,
    init_adapter,
    init_lora,
    merge,
    merge_pretrained,
    trainable_params,
    unmerge,
)
from flaxlora.metrics import confusion_counts, metrics_from_counts
from flaxlora.optim import adapter_labels, freeze_labels, lora_optimizer, trainable_mask
from flaxlora.paths import lora_candidates
from flaxlora.summary import ParamSummary, summarize
from flaxlora.targets import resolve_targets, trainable_paths

__version__ = "0.1.0"


# Entry points that pull in transformers, tokenizers and orbax are imported on first use.
_LAZY = {
    "restore": "flaxlora.predict",
    "load_pretrained": "flaxlora.loading",
    "known_models": "flaxlora.loading",
    "Pretrained": "flaxlora.loading",
    "save_peft": "flaxlora.interop",
    "load_peft": "flaxlora.interop",
    "save_merged": "flaxlora.interop",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flaxlora' has no attribute {name!r}")


__all__ = [
    "LoraConfig",
    "ParamSummary",
    "Pretrained",
    "TrainIterator",
    "adapter_labels",
    "apply_factored",
    "apply_lora",
    "confusion_counts",
    "default_buckets",
    "encode_pairs",
    "eval_batches",
    "evaluate",
    "extract_lora",
    "freeze_labels",
    "init_adapter",
    "init_lora",
    "known_models",
    "load_pretrained",
    "load_qqp",
    "lora_candidates",
    "lora_interceptor",
    "lora_optimizer",
    "load_peft",
    "merge",
    "merge_pretrained",
    "metrics_from_counts",
    "resolve_targets",
    "restore",
    "save_merged",
    "save_peft",
    "summarize",
    "trainable_mask",
    "trainable_params",
    "trainable_paths",
    "unmerge",
]
