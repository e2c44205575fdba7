"""Inference from a saved run: ``flaxlora.restore(dir)`` and ``python -m flaxlora.predict``.

    predictor = flaxlora.restore("runs/qqp-enhanced-s0-...")        # or its checkpoints/ folder
    predictor.predict_proba(["How do I learn Python?"], ["What is the best way to learn Python?"])
    ensemble = flaxlora.restore_ensemble(["runs/a", "runs/b", "runs/c"])   # adapters on one shared base
    flaxlora.restore("runs/qqp-enhanced-s0-...")   # a --members run: its members' ensemble
    flaxlora.restore_many({"a": "runs/a", "b": "runs/b"})   # each pair by the adapter it names (qqp/many.py)

The base model is rebuilt from the saved run configuration, the adapters and extras restored
from the orbax checkpoint and merged into it once: inference runs the plain model.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from flaxlora.cli import ArgumentParser
from flaxlora.data import tables
from flaxlora.data.batching import default_buckets, inference_batches
from flaxlora.data.tokenize import encode_pairs, pair_format_for
from flaxlora.loading import Pretrained, base_provenance, load_pretrained
from flaxlora.loading.provenance import check_same_base
from flaxlora.lora.adapters import merge_pretrained
from flaxlora.models.scan import unstack_layers
from flaxlora.paths import as_path
from flaxlora.qqp.config import DTYPES, RunConfig
from flaxlora.quant.tree import dequantize
from flaxlora.training.checkpoint import Checkpointer, checkpoint_dir
from flaxlora.training.step import logits_fn

# The longest pair a restored T5 classifier scores without truncation.
T5_MAX_LENGTH = 4096
# The folder of an ensemble run (RunConfig.members > 1) that holds its members' run folders, 0, 1, ...
MEMBERS = "members"


class Predictor:
    """Duplicate-question classifier: a model with merged params and its tokenizer.

    Pairs are tokenised like the training data, grouped by length into the run's buckets and
    run in fixed-size batches (one compilation per bucket). ``forward(params, input_ids,
    attention_mask, token_type_ids) -> (batch, 2)`` replaces the plain ``model.apply`` (an
    ensemble's).
    """

    def __init__(self, model, params, tokenizer, pair_format: str, max_length: int,
                 buckets: Sequence[int], batch_size: int = 64, forward: Callable | None = None):
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.pair_format, self.max_length = pair_format, max_length
        self.buckets, self.batch_size = tuple(buckets), batch_size
        self._forward = jax.jit(forward or (lambda p, ids, mask, types: model.apply({"params": p}, ids, mask, types)))

    def logits(self, q1s: Sequence[str], q2s: Sequence[str]) -> np.ndarray:
        """(n, 2) class scores (index 1: duplicate) for n question pairs."""
        if isinstance(q1s, str) or isinstance(q2s, str):
            raise TypeError("pass sequences of questions, e.g. [q1], [q2]")
        if len(q1s) != len(q2s):
            raise ValueError(f"{len(q1s)} first questions but {len(q2s)} second questions")
        encoded = encode_pairs(self.tokenizer, list(q1s), list(q2s), self.max_length,
                               pair_format=self.pair_format, use_cache=False)
        out = np.zeros((len(encoded), 2), np.float32)
        for rows, batch in inference_batches(encoded, self.batch_size, self.buckets):
            logits = self._forward(self.params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
            out[rows] = np.asarray(logits[: len(rows)], np.float32)
        return out

    def predict_proba(self, q1s: Sequence[str], q2s: Sequence[str]) -> np.ndarray:
        """(n,) P(duplicate)."""
        return np.asarray(jax.nn.softmax(jnp.asarray(self.logits(q1s, q2s)), axis=-1)[:, 1])

    def predict(self, q1s: Sequence[str], q2s: Sequence[str]) -> np.ndarray:
        """(n,) int labels: 1 duplicate, 0 not."""
        return self.logits(q1s, q2s).argmax(axis=-1).astype(np.int32)


def load_base(meta: dict[str, Any]) -> tuple[RunConfig, Pretrained]:
    """The run configuration saved in checkpoint ``meta`` and its base model, rebuilt from the same
    source and hub revision in the run's compute dtype, its weights as the run held them (rounded
    to its ``param_dtype``, quantized as it quantized them) but stored in float32, so that merging
    an adapter into them is exact.

    Raises ValueError if the base's content hash differs from the one the run recorded."""
    run = RunConfig.from_dict(meta["run"])
    saved = meta.get("base")
    base = base_provenance(run.model, (saved or {}).get("revision"))
    check_same_base(saved, base)
    pretrained = load_pretrained(run.model, num_labels=2, label_words=run.label_words, dtype=DTYPES[run.dtype],
                                 param_dtype=DTYPES[run.param_dtype], seed=run.seed, revision=base["revision"],
                                 quantize=run.quantize, quantize_skip=run.lora.trainable)
    params = jax.tree.map(lambda x: x.astype(jnp.float32), dequantize(pretrained.params))
    return run, dataclasses.replace(pretrained, params=params)


def unrolled(trainable: dict[str, Any], run: RunConfig) -> dict[str, Any]:
    """A run's trained tree in the unrolled layout that :func:`load_base`'s model, PEFT and merged
    exports use (a ``--scan-layers`` run holds its layers stacked: :mod:`flaxlora.models.scan`)."""
    return unstack_layers(trainable) if run.scan_layers else trainable


def ensemble_members(path: str | os.PathLike) -> list[epath.Path] | None:
    """The member run folders of an ensemble run's output folder (``OUT/members/0, 1, ...``), in
    order; None for any other folder."""
    folder = as_path(path) / MEMBERS
    if not folder.is_dir():
        return None
    return sorted((p for p in folder.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def restore(path: str | os.PathLike, step: int | None = None, batch_size: int = 64) -> Predictor:
    """A :class:`Predictor` from a run's output folder or its ``checkpoints/`` folder; for an
    ensemble run (``--members``: OUT or OUT/checkpoints), its members' :func:`restore_ensemble`.

    ``step`` picks a checkpoint (default: the newest readable). Pairs are truncated to the run's
    max_length, except for a T5 classifier: its relative positions set no limit, so it scores whole
    pairs (up to ``T5_MAX_LENGTH`` tokens), as ``tokenizer(q1, q2)`` with the merged export does.

    Raises ValueError for an ensemble run that has not finished.
    """
    folder = as_path(path)
    if folder.name == "checkpoints" and not folder.exists() and ensemble_members(folder.parent) is not None:
        folder = path = folder.parent  # an ensemble run has no checkpoints/ of its own: the run
    members = ensemble_members(folder)
    if members is not None:
        if not (folder / "results.json").is_file():
            raise ValueError(f"{path} is an ensemble run that has not finished: finish it (qqp.py --resume "
                             f"--output-dir {path}) or restore one member ({members[0] if members else path})")
        return restore_ensemble(members, step, batch_size)
    with Checkpointer(checkpoint_dir(path), read_only=True) as ckpt:
        trainable, meta = ckpt.restore_for_inference(step)
    run, pretrained = load_base(meta)
    trainable = unrolled(trainable, run)
    params = jax.jit(lambda p, t: merge_pretrained(p, t["lora"], run.lora, t["extras"]))(pretrained.params, trainable)
    return Predictor(pretrained.model, params, pretrained.tokenizer, pair_format_for(pretrained.kind),
                     *scoring_lengths(run, pretrained), batch_size)


def scoring_lengths(run: RunConfig, pretrained: Pretrained) -> tuple[int, tuple[int, ...]]:
    """(max length, buckets) a restored run scores pairs with: the run's, except that a T5
    classifier scores whole pairs, up to ``T5_MAX_LENGTH`` tokens (its relative positions set no limit)."""
    max_length, buckets = run.max_length, run.buckets or default_buckets(run.max_length)
    if pretrained.kind == "encoder-decoder":
        max_length = max(max_length, T5_MAX_LENGTH)
        buckets = (*buckets, *(n for n in (2**k for k in range(20)) if buckets[-1] < n <= max_length))
    return max_length, tuple(buckets)


def mean_probability_logits(logits: jax.Array) -> jax.Array:
    """An ensemble's class scores: the log of its members' mean class probabilities.

    logits: (members, batch, classes) -> (batch, classes)."""
    return jnp.log(jnp.mean(jax.nn.softmax(jnp.asarray(logits).astype(jnp.float32), axis=-1), axis=0))


def restore_ensemble(paths: Sequence[str | os.PathLike], step: int | None = None, batch_size: int = 64) -> Predictor:
    """A :class:`Predictor` averaging the class probabilities of several runs' adapters on their
    one shared base: runs of the same base model, LoRA configuration and data settings (e.g.
    seeds of one preset; an ensemble run counts as its members). The frozen weights are held
    once, each run's adapter and extras beside them (a few MB each), and every batch runs the
    factored forward of all adapters (vmapped); ``logits`` returns the log of the mean probabilities.

    Raises ValueError for fewer than two runs, runs that differ in anything but their seed and
    training schedule, a base that is not the one each run recorded, or PiSSA/OLoRA runs (their
    residual base is not shared).
    """
    paths = [member for path in paths for member in (ensemble_members(path) or [path])]  # an ensemble run: its members
    if len(paths) < 2:
        raise ValueError(f"an ensemble needs at least two runs, got {len(paths)}")
    restored = []
    for path in paths:
        with Checkpointer(checkpoint_dir(path), read_only=True) as ckpt:
            restored.append(ckpt.restore_for_inference(step))
    runs = [RunConfig.from_dict(meta["run"]) for _, meta in restored]
    shared = lambda r: (r.model, r.lora, r.dtype, r.param_dtype, r.quantize, r.max_length, r.buckets,  # noqa: E731
                        r.text_to_text, r.rank_budget)
    for path, run in zip(paths[1:], runs[1:]):
        if shared(run) != shared(runs[0]):
            raise ValueError(f"{path} differs from {paths[0]} in its base model, LoRA configuration or data "
                             "settings: an ensemble shares one base and one adapter layout")
    if runs[0].lora.init != "lora" or runs[0].rank_budget:
        raise ValueError("PiSSA/OLoRA and rank-allocated runs have no shared base or layout: restore them one by one")
    run, pretrained = load_base(restored[0][1])  # checks the base against the first run's record
    loaded = restored[0][1].get("base") or base_provenance(run.model)  # hashed again only if unrecorded
    for _, meta in restored[1:]:
        check_same_base(meta.get("base"), loaded)
    adapters = jax.tree.map(lambda *x: jnp.stack(x), *[unrolled(trainable, r) for (trainable, _), r in zip(restored, runs)])
    apply = logits_fn(pretrained.model, run.lora)

    def forward(params, input_ids, attention_mask, token_type_ids):
        frozen, stacked = params
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        return mean_probability_logits(jax.vmap(lambda t: apply(frozen, t, batch))(stacked))

    return Predictor(pretrained.model, (pretrained.params, adapters), pretrained.tokenizer,
                     pair_format_for(pretrained.kind), *scoring_lengths(run, pretrained), batch_size, forward=forward)


def _read_pairs(path: str) -> tuple[list[str], list[str], list[Any]]:
    """Question pairs from a TSV with a header naming question1 and question2 (GLUE's), or two columns.

    Read by :func:`flaxlora.data.tables.read_tsv` and checked row by row like training data: a row
    that is not UTF-8, cannot be parsed or has another number of columns than the header (two
    without one) is a ValueError naming its line and reason, as every prediction must match a row.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"no TSV file at {path}")
    table = tables.read_tsv(Path(path))
    if table.problem:
        raise ValueError(f"{path}: {table.problem}")
    header = [h.strip().lower() for h in table.header]
    if "question1" in header and "question2" in header:
        i, j = header.index("question1"), header.index("question2")
        ids = header.index("id") if "id" in header else None
        rows, width = list(table.rows), len(header)
    else:  # no header: the first line is a pair too
        i, j, ids, width = 0, 1, None, 2
        rows = [(1, list(table.header)), *table.rows] if table.header else list(table.rows)
    if not rows:
        raise ValueError(f"{path} holds no question pairs")
    tally = tables.RowTally()
    for line, fields in rows:
        tally.rows_read += 1
        if problem := tables.row_problem(fields, width):
            tally.drop(f"line {line}", problem)
    if tally.total:
        raise ValueError(f"{path}: {tally.total} of {tally.rows_read} rows unusable ({tally.summary()}; expected "
                         f"{width} tab-separated UTF-8 columns): {', '.join(tally.examples[:5])}")
    fields = [f for _, f in rows]
    return [f[i] for f in fields], [f[j] for f in fields], [f[ids] if ids is not None else n for n, f in enumerate(fields)]


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m flaxlora.predict", description="Predict QQP duplicates with a saved run.")
    p.add_argument("--checkpoint", required=True, action="append",
                   help="run output folder or its checkpoints/ folder; repeated: an ensemble of the runs' adapters")
    p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    p.add_argument("--q1", action="append", help="first question (repeatable, paired with --q2)")
    p.add_argument("--q2", action="append", help="second question")
    p.add_argument("--tsv", help="batch mode: TSV with question1/question2 columns (GLUE) or two columns")
    p.add_argument("--out", help="batch mode output TSV (default: stdout)")
    args = p.parse_args(argv)
    if bool(args.tsv) == bool(args.q1 or args.q2):
        p.error("give either --q1/--q2 pairs or --tsv")
    try:
        if args.tsv:
            q1s, q2s, ids = _read_pairs(args.tsv)
        else:
            if len(args.q1 or []) != len(args.q2 or []):
                p.error("give as many --q2 as --q1")
            q1s, q2s, ids = args.q1, args.q2, list(range(len(args.q1)))
        predictor = (restore(args.checkpoint[0], args.step) if len(args.checkpoint) == 1
                     else restore_ensemble(args.checkpoint, args.step))
    except (ValueError, FileNotFoundError) as err:
        p.fail(err)
    logits = predictor.logits(q1s, q2s)
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1)[:, 1])
    lines = ["id\tis_duplicate\tp_duplicate"]
    lines += [f"{i}\t{label}\t{prob:.6f}" for i, label, prob in zip(ids, logits.argmax(-1), probs)]
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)

if __name__ == "__main__":
    main()
