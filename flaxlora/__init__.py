"""flaxlora: pure-functional LoRA fine-tuning for JAX/Flax transformers.

    lora/       the LoRA core: configs, targets, init/apply/merge, variants, factored path, optimizer
    models/     linen BERT/RoBERTa/MiniLM and Llama backbones with logical sharding axes
    loading/    pretrained weights from HF folders, the hub and GGUF files
    data/       text pairs -> token ids -> static-shape batches
    training/   the jitted sharded train step, evaluation, metrics, checkpoints (task-agnostic)
    interop/    PEFT adapters both ways, merged Hugging Face export, ``python -m flaxlora.export``
    quant/      QLoRA: frozen weights as NF4 / int8 / GGUF blocks, Dense layers computing on them
    memory/     XLA's account of a compiled step's memory; the peak per device and the batch that fits
    qqp/        the QQP application: data, run config and presets, run loop, predictor, baselines

Importing flaxlora adds its default XLA flags to ``XLA_FLAGS`` (:mod:`flaxlora.xla_flags`).
"""

from flaxlora import xla_flags

xla_flags.set_defaults()  # before any JAX computation: XLA reads XLA_FLAGS when its first backend starts

from flaxlora.data import TrainIterator, default_buckets, encode_pairs, eval_batches
from flaxlora.lora import (
    LoraConfig,
    ParamSummary,
    adapter_labels,
    apply_factored,
    apply_lora,
    extract_lora,
    fold,
    freeze_labels,
    init_adapter,
    init_lora,
    lora_candidates,
    lora_interceptor,
    lora_optimizer,
    merge,
    merge_pretrained,
    resolve_targets,
    summarize,
    trainable_mask,
    trainable_params,
    trainable_paths,
    unmerge,
)
from flaxlora.memory import MemoryEstimate, estimate_memory, largest_batch, memory_account
from flaxlora.qqp.data import load_qqp
from flaxlora.quant import QuantizedArray, dequantize, quantize
from flaxlora.training import confusion_counts, evaluate, metrics_from_counts

__version__ = "0.1.0"


# Entry points that pull in transformers, tokenizers and orbax are imported on first use.
_LAZY = {
    "restore": "flaxlora.qqp.predict",
    "restore_ensemble": "flaxlora.qqp.predict",
    "restore_many": "flaxlora.qqp.many",
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
    "MemoryEstimate",
    "ParamSummary",
    "Pretrained",
    "QuantizedArray",
    "TrainIterator",
    "adapter_labels",
    "apply_factored",
    "apply_lora",
    "confusion_counts",
    "default_buckets",
    "dequantize",
    "encode_pairs",
    "estimate_memory",
    "eval_batches",
    "evaluate",
    "extract_lora",
    "fold",
    "freeze_labels",
    "init_adapter",
    "init_lora",
    "known_models",
    "largest_batch",
    "load_pretrained",
    "load_qqp",
    "lora_candidates",
    "lora_interceptor",
    "lora_optimizer",
    "load_peft",
    "merge",
    "merge_pretrained",
    "memory_account",
    "metrics_from_counts",
    "quantize",
    "resolve_targets",
    "restore",
    "restore_ensemble",
    "restore_many",
    "save_merged",
    "save_peft",
    "summarize",
    "trainable_mask",
    "trainable_params",
    "trainable_paths",
    "unmerge",
]
