"""The LoRA core: pure functions on parameter pytrees, independent of any model or task.

    config.py           LoraConfig: what to adapt, rank, scaling, init, variant
    targets.py          which leaves a config adapts (lora_candidates, resolve_targets)
    adapters.py         init / apply (merge) / unmerge / extract adapters on a params tree
    variants.py         initialisations (LoRA, Gaussian, PiSSA, OLoRA) and DoRA's norm
    factored.py         x @ W + s (x @ a) @ b inside linen Dense layers, never forming W + dW
    fold.py             K adapters as one of rank K r whose update is their mean
    mixed.py            many adapters stacked on one base, each row of a batch with its own
    optim.py            AdamW with LoRA+ and decay where it belongs; optax masks and labels
    summary.py          trainable vs total parameters
    rank_allocation.py  spread a rank budget over the targets by gradient importance
"""

from flaxlora.lora.adapters import (
    adapters_by_path,
    apply_lora,
    extract_lora,
    init_adapter,
    init_lora,
    matched_adapters,
    merge,
    merge_pretrained,
    trainable_params,
    unmerge,
    with_extras,
)
from flaxlora.lora.config import LoraConfig
from flaxlora.lora.factored import apply_factored, lora_interceptor
from flaxlora.lora.fold import fold
from flaxlora.lora.optim import (
    adapter_labels,
    freeze_labels,
    lora_optimizer,
    trainable_mask,
)
from flaxlora.lora.rank_allocation import allocate
from flaxlora.lora.summary import ParamSummary, summarize
from flaxlora.lora.targets import (
    Target,
    lora_candidates,
    resolve_targets,
    trainable_paths,
)
from flaxlora.lora.variants import INITS, RESIDUAL_INITS

__all__ = [
    "INITS",
    "LoraConfig",
    "ParamSummary",
    "RESIDUAL_INITS",
    "Target",
    "adapter_labels",
    "adapters_by_path",
    "allocate",
    "apply_factored",
    "apply_lora",
    "extract_lora",
    "fold",
    "freeze_labels",
    "init_adapter",
    "init_lora",
    "lora_candidates",
    "lora_interceptor",
    "lora_optimizer",
    "matched_adapters",
    "merge",
    "merge_pretrained",
    "resolve_targets",
    "summarize",
    "trainable_mask",
    "trainable_params",
    "trainable_paths",
    "unmerge",
    "with_extras",
]
