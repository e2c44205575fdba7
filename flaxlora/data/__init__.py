"""Labelled text pairs for any pair-classification task: raw tables, tokenisation, batches.

    tables.py     rows of TSV / CSV / parquet files, unvalidated
    tokenize.py   question pairs -> token ids (encoder pair template or decoder prompt), cached
    batching.py   where a batch is made: length buckets, resumable shuffled train batches, eval batches,
                  prefetching

QQP's columns, labels, splits and bundled sample live in :mod:`flaxlora.qqp`.
"""

from flaxlora.data.batching import (
    Batch,
    TrainIterator,
    default_buckets,
    eval_batches,
    inference_batches,
    prefetch,
)
from flaxlora.data.tables import Table
from flaxlora.data.tokenize import (
    PROMPT,
    EncodedPairs,
    default_cache_dir,
    encode_pairs,
    pair_format_for,
)

__all__ = [
    "Batch",
    "EncodedPairs",
    "PROMPT",
    "Table",
    "TrainIterator",
    "default_buckets",
    "default_cache_dir",
    "encode_pairs",
    "eval_batches",
    "inference_batches",
    "pair_format_for",
    "prefetch",
]
