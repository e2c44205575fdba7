"""Many runs' adapters on one frozen base, each pair scored by the adapter it names.

    many = flaxlora.restore_many({"qqp": "runs/qqp-a", "quora-dora": "runs/qqp-b"})
    many.predict_proba(q1s, q2s, adapter=["qqp", "quora-dora", ...])   # one name per pair, or one for all

Every batch mixes adapters: each row gathers its adapter from a stack of them and the rows run in
one forward, the base's matmuls shared by all (:mod:`flaxlora.lora.mixed`). A name may be an
ensemble run (``--members``): its pairs are scored by every member, the probabilities averaged, as
``flaxlora.restore`` of that run does. ``python -m flaxlora.serve`` answers HTTP requests with it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxlora import pytree
from flaxlora.data.tokenize import EncodedPairs, encode_pairs, pair_format_for
from flaxlora.loading import base_provenance
from flaxlora.loading.provenance import check_same_base
from flaxlora.lora import mixed
from flaxlora.lora.variants import RESIDUAL_INITS
from flaxlora.paths import as_path
from flaxlora.qqp.config import RunConfig
from flaxlora.qqp.predict import scoring_lengths, ensemble_members, load_base, mean_probability_logits, unrolled
from flaxlora.training.checkpoint import Checkpointer, checkpoint_dir

# Rows per forward: a batch is padded to the smallest of these that holds it (one compilation each per bucket).
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
# A run whose fully trained extras exceed this share of the base's weights (full fine-tuning) is refused:
# a mixed batch gathers each row's extras.
MAX_EXTRAS_SHARE = 0.1


class MultiPredictor:
    """Duplicate-question classifier over several adapters on one base (built by :func:`restore_many`).

    ``names`` are the adapters in load order; ``members[name]`` the rows of the stack a name
    averages over (one for a single run). Pairs are tokenised like the training data, grouped by
    length into the runs' buckets and run in batches of ``batch_sizes`` rows, each row with its
    adapter.
    """

    def __init__(self, model, params, stacked, members: Mapping[str, Sequence[int]], tokenizer, pair_format: str,
                 max_length: int, buckets: Sequence[int], batch_sizes: Sequence[int] = BATCH_SIZES):
        if not batch_sizes or list(batch_sizes) != sorted(set(batch_sizes)) or batch_sizes[0] < 1:
            raise ValueError(f"batch_sizes must be increasing positive sizes, got {tuple(batch_sizes)}")
        self.model, self.params, self.stacked = model, params, stacked
        self.members = {name: tuple(ids) for name, ids in members.items()}
        self.tokenizer, self.pair_format = tokenizer, pair_format
        self.max_length, self.buckets, self.batch_sizes = max_length, tuple(buckets), tuple(batch_sizes)
        self._forward = jax.jit(lambda p, s, ids, x, mask, types: mixed.mixed_apply(
            model, p, s, ids, x, mask, types, deterministic=True))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.members)

    def _adapter_per_pair(self, adapter: str | Sequence[str], n: int) -> list[str]:
        names = [adapter] * n if isinstance(adapter, str) else list(adapter)
        if len(names) != n:
            raise ValueError(f"{n} pairs but {len(names)} adapter names: give one name per pair, or one for all")
        unknown = sorted({a for a in names if a not in self.members}, key=str)
        if unknown:
            raise ValueError(f"unknown adapter {unknown[0]!r}: the loaded adapters are {', '.join(self.names)}")
        return names

    def encode(self, q1s: Sequence[str], q2s: Sequence[str]) -> EncodedPairs:
        """The pairs tokenised as the runs were trained (truncated to their max_length)."""
        _check_pairs(q1s, q2s)
        return encode_pairs(self.tokenizer, list(q1s), list(q2s), self.max_length, pair_format=self.pair_format,
                            use_cache=False)

    def logits(self, q1s: Sequence[str], q2s: Sequence[str], adapter: str | Sequence[str]) -> np.ndarray:
        """(n, 2) class scores (index 1: duplicate) of n pairs, pair i scored by adapter ``adapter[i]``
        (or all by ``adapter``); an ensemble's are the log of its members' mean probabilities."""
        _check_pairs(q1s, q2s)
        names = self._adapter_per_pair(adapter, len(q1s))  # checked before any work
        return self.logits_encoded(self.encode(q1s, q2s), names)

    def logits_encoded(self, encoded: EncodedPairs, adapter: str | Sequence[str]) -> np.ndarray:
        """:meth:`logits` of pairs already tokenised by :meth:`encode`."""
        names = self._adapter_per_pair(adapter, len(encoded))
        pair = np.asarray([i for i, name in enumerate(names) for _ in self.members[name]], np.int64)
        ids = np.asarray([m for name in names for m in self.members[name]], np.int32)
        rows = self._rows(encoded, pair, ids)
        out = np.zeros((len(encoded), 2), np.float32)
        for name in dict.fromkeys(names):
            mine = np.flatnonzero(np.asarray(names) == name)
            per_member = rows[np.isin(pair, mine)].reshape(len(mine), len(self.members[name]), 2)
            out[mine] = (per_member[:, 0] if per_member.shape[1] == 1
                         else np.asarray(mean_probability_logits(per_member.swapaxes(0, 1))))
        return out

    def _rows(self, encoded: EncodedPairs, pair: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """(len(pair), 2) logits of pair ``pair[j]`` under stacked adapter ``ids[j]``, batch by batch."""
        bucket_of = np.searchsorted(np.asarray(self.buckets), encoded.lengths[pair], side="left")
        out = np.zeros((len(pair), 2), np.float32)
        largest = self.batch_sizes[-1]
        for k, length in enumerate(self.buckets):
            members = np.flatnonzero(bucket_of == k)
            for start in range(0, len(members), largest):
                chunk = members[start : start + largest]
                size = next(s for s in self.batch_sizes if s >= len(chunk))
                padded = np.resize(chunk, size)  # repeats real rows to fill the batch
                batch = encoded.pad(pair[padded], length)
                logits = self._forward(self.params, self.stacked, ids[padded], batch["input_ids"],
                                       batch["attention_mask"], batch["token_type_ids"])
                out[chunk] = np.asarray(logits[: len(chunk)], np.float32)
        return out

    def predict_proba(self, q1s: Sequence[str], q2s: Sequence[str], adapter: str | Sequence[str]) -> np.ndarray:
        """(n,) P(duplicate)."""
        return np.asarray(jax.nn.softmax(jnp.asarray(self.logits(q1s, q2s, adapter)), axis=-1)[:, 1])

    def predict(self, q1s: Sequence[str], q2s: Sequence[str], adapter: str | Sequence[str]) -> np.ndarray:
        """(n,) int labels: 1 duplicate, 0 not."""
        return self.logits(q1s, q2s, adapter).argmax(axis=-1).astype(np.int32)

    def warmup(self) -> None:
        """Compiles the forward for every batch size and bucket now rather than on first use."""
        for length in self.buckets:
            for size in self.batch_sizes:
                zeros = np.zeros((size, length), np.int32)
                jax.block_until_ready(self._forward(self.params, self.stacked, np.zeros(size, np.int32), zeros,
                                                    np.ones_like(zeros), zeros))


def _check_pairs(q1s: Sequence[str], q2s: Sequence[str]) -> None:
    if isinstance(q1s, str) or isinstance(q2s, str):
        raise TypeError("pass sequences of questions, e.g. [q1], [q2]")
    if len(q1s) != len(q2s):
        raise ValueError(f"{len(q1s)} first questions but {len(q2s)} second questions")


def _read(path: str | os.PathLike, step: int | None) -> tuple[list[Any], list[dict[str, Any]], list[str]]:
    """(trainable trees, metas, folders) of a run: one, or an ensemble run's members."""
    members = ensemble_members(path)
    if members is not None and not (as_path(path) / "results.json").is_file():
        raise ValueError(f"{path} is an ensemble run that has not finished: finish it or name one member "
                         f"({members[0] if members else path})")
    trees, metas = [], []
    for folder in members or [path]:
        with Checkpointer(checkpoint_dir(folder), read_only=True) as ckpt:
            trainable, meta = ckpt.restore_for_inference(step)
        trees.append(trainable)
        metas.append(meta)
    return trees, metas, [str(f) for f in members or [path]]


def _check_compatible(folder: str, run: RunConfig, first: RunConfig, first_folder: str) -> None:
    """ValueError naming what ``run`` changes about the one base ``first`` defines."""
    if run.lora.init in RESIDUAL_INITS:
        raise ValueError(f"{folder} was trained with init {run.lora.init!r}, whose frozen base is its own "
                         "residual: serve it alone with flaxlora.restore")
    shared = {"model kind (text_to_text)": lambda r: r.text_to_text, "dtype": lambda r: r.dtype,
              "param_dtype": lambda r: r.param_dtype, "quantize": lambda r: r.quantize,
              "max_length": lambda r: r.max_length}
    for what, value in shared.items():
        if value(run) != value(first):
            raise ValueError(f"{folder} differs from {first_folder} in its {what} ({value(run)!r} vs "
                             f"{value(first)!r}): adapters served together share one base and its settings")


def restore_many(runs: Mapping[str, str | os.PathLike], step: int | None = None,
                 batch_sizes: Sequence[int] = BATCH_SIZES) -> MultiPredictor:
    """A :class:`MultiPredictor` of ``{name: run folder}`` (a run's output or ``checkpoints/``
    folder; an ensemble run's output folder is one name over its members) on their one base.

    Runs may differ in seed, rank, targets, scaling, DoRA and trained extras. ``step`` picks each
    run's checkpoint (default: the newest readable). Raises ValueError for no runs, runs on
    another base (the recorded content hash) or model kind, with other dtype, quantization or
    max_length (buckets may differ: pairs are padded to any of the runs'), PiSSA/OLoRA runs (their base is their own) and full fine-tuning (no adapter).
    """
    if not runs:
        raise ValueError("restore_many needs at least one {name: run folder}")
    loaded = {name: _read(path, step) for name, path in runs.items()}
    entries = [(name, tree, meta, folder) for name, (trees, metas, folders) in loaded.items()
               for tree, meta, folder in zip(trees, metas, folders)]
    configs = [RunConfig.from_dict(meta["run"]) for _, _, meta, _ in entries]
    first_run, pretrained = load_base(entries[0][2])  # checks the base against the first run's record
    base = entries[0][2].get("base") or base_provenance(first_run.model)  # hashed again only if unrecorded
    total = sum(x.size for x in jax.tree.leaves(pretrained.params))
    forms, members = [], {}
    for (name, tree, meta, folder), run in zip(entries, configs):
        _check_compatible(folder, run, first_run, entries[0][3])
        if meta.get("base") is None and run.model != first_run.model:
            raise ValueError(f"{folder} was trained on {run.model!r}, {entries[0][3]} on {first_run.model!r}: "
                             "adapters served together share one base")
        check_same_base(meta.get("base"), base)
        tree = unrolled(tree, run)
        seeded = sorted(set(pretrained.missing) - set(pytree.flatten(tree["extras"])))
        if seeded and run.seed != first_run.seed:
            raise ValueError(f"{folder} leaves {seeded[0]} as initialised with its seed {run.seed}, not "
                             f"{first_run.seed} as {entries[0][3]}: its base is its own; serve it alone with flaxlora.restore")
        trained = sum(x.size for x in pytree.flatten(tree["extras"]).values())
        if trained > MAX_EXTRAS_SHARE * total:
            raise ValueError(f"{folder} trains {trained / total:.0%} of the base's weights in full (full fine-tuning?): "
                             "a mixed batch copies each row's trained weights; serve it alone with flaxlora.restore")
        members.setdefault(name, []).append(len(forms))
        forms.append(mixed.serving_form(pretrained.params, tree["lora"], run.lora, tree["extras"]))
    stacked = mixed.stack(forms, pretrained.params)
    max_length, _ = scoring_lengths(first_run, pretrained)
    buckets = sorted({b for run in configs for b in scoring_lengths(run, pretrained)[1]})  # padding only: any of them
    return MultiPredictor(pretrained.model, pretrained.params, stacked, members, pretrained.tokenizer,
                          pair_format_for(pretrained.kind), max_length, buckets, batch_sizes)
