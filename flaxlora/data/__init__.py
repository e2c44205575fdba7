"""QQP data: loading and splitting, tokenisation with an on-disk cache, static-shape batching."""

from flaxlora.data.batching import Batch, TrainIterator, default_buckets, eval_batches
from flaxlora.data.qqp import (
    SPLITS,
    UNLABELLED,
    LoadReport,
    QQPData,
    QQPSplit,
    load_qqp,
    pair_key,
    split_of,
)
from flaxlora.data.tokenize import PROMPT, EncodedPairs, default_cache_dir, encode_pairs

__all__ = [
    "Batch",
    "EncodedPairs",
    "LoadReport",
    "PROMPT",
    "QQPData",
    "QQPSplit",
    "SPLITS",
    "TrainIterator",
    "UNLABELLED",
    "default_buckets",
    "default_cache_dir",
    "encode_pairs",
    "eval_batches",
    "load_qqp",
    "pair_key",
    "split_of",
]
