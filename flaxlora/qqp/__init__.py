"""Everything QQP-specific: the application built on the library.

    data.py        QQP columns and labels, validation, de-duplication, hash split, bundled sample
    qqp_sample/    19,082 real QQP rows (provenance and licence in its README)
    config.py      RunConfig and the presets (lora, enhanced, full, head)
    run.py         the fine-tuning loop behind experiments/qqp.py (finetune)
    reporting.py   metrics.jsonl, TensorBoard, curves.png, the one-screen summary
    predict.py     restore a run for inference; ``python -m flaxlora.predict``
    baselines.py   majority class, TF-IDF + logistic regression
    prompting.py   zero-/few-shot prompting of an instruct decoder

``finetune`` and ``restore`` pull in transformers and orbax, so they are imported on first use.
"""

from flaxlora.qqp.config import PRESETS, RunConfig
from flaxlora.qqp.data import (
    SPLITS,
    UNLABELLED,
    LoadReport,
    QQPData,
    QQPSplit,
    load_qqp,
    pair_key,
    split_of,
)

_LAZY = {"finetune": "flaxlora.qqp.run", "restore": "flaxlora.qqp.predict", "Predictor": "flaxlora.qqp.predict"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flaxlora.qqp' has no attribute {name!r}")


__all__ = [
    "PRESETS",
    "SPLITS",
    "UNLABELLED",
    "LoadReport",
    "Predictor",
    "QQPData",
    "QQPSplit",
    "RunConfig",
    "finetune",
    "load_qqp",
    "pair_key",
    "restore",
    "split_of",
]
