"""Everything QQP-specific: the application built on the library.

    data.py        QQP columns and labels, validation, de-duplication, hash split, bundled sample
    qqp_sample/    19,082 real QQP rows (provenance and licence in its README)
    config.py      RunConfig and the presets (lora, enhanced, full, head)
    run.py         the fine-tuning loop behind experiments/qqp.py (finetune)
    ensemble.py    an ensemble run (--members): adapters trained in turn on one base, scored together
    reporting.py   metrics.jsonl, TensorBoard, curves.png, the one-screen summary
    predict.py     restore a run for inference; ``python -m flaxlora.predict``
    many.py        many runs' adapters on one base, each pair scored by its own (``flaxlora.restore_many``)
    server.py      those over HTTP, requests micro-batched together (``python -m flaxlora.serve``)
    baselines.py   majority class, TF-IDF + logistic regression
    prompting.py   zero-/few-shot prompting of an instruct decoder

``run`` and ``predict`` pull in transformers and orbax: import them as modules
(``from flaxlora.qqp.run import finetune``; ``flaxlora.restore`` is the predictor's entry point).
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

__all__ = [
    "PRESETS",
    "SPLITS",
    "UNLABELLED",
    "LoadReport",
    "QQPData",
    "QQPSplit",
    "RunConfig",
    "load_qqp",
    "pair_key",
    "split_of",
]
