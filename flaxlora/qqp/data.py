"""QQP as validated, de-duplicated splits: ``load_qqp`` and the types it returns.

Sources: the bundled sample (the offline default), a local directory of GLUE TSVs / parquet /
CSV files, or GLUE QQP from the Hugging Face hub. Malformed rows are counted per reason and
dropped, never raised. A source with its own train and dev files keeps them (dev becomes
'validation'); any other source is pooled, de-duplicated and split into 'train', 'validation'
and 'test' by a hash of the pair id, so the split does not depend on row or file order.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import importlib.resources
import math
import os
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

from flaxlora.data import tables

SPLITS = ("train", "validation", "test")
# Why a row is dropped: the table checks, then a file without question columns (all its rows),
# an empty or whitespace-only question, a label other than 0 or 1.
REASONS = (*tables.ROW_REASONS, "no_question_columns", "empty_question", "bad_label")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
UNLABELLED = -1
# Labels 0 and 1 as words: the T5 paper's text-to-text targets for QQP, and the exports' id2label.
LABEL_WORDS = ("not_duplicate", "duplicate")
_ID_COLUMNS = ("id", "idx", "pair_id", "test_id")
_LABEL_COLUMNS = ("label", "is_duplicate")
HUB_NAME = ("nyu-mll/glue", "qqp")


@dataclasses.dataclass(frozen=True, eq=False)
class QQPSplit:
    """One split of question pairs.

    Attributes:
      ids: (n,) pair ids (a content hash where the source has no id column).
      question1: (n,) first questions, verbatim.
      question2: (n,) second questions, verbatim.
      labels: (n,) int32, 1 = duplicate; all ``UNLABELLED`` (-1) for GLUE's test split.
    """

    ids: tuple[str, ...]
    question1: tuple[str, ...]
    question2: tuple[str, ...]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def sample(self, n: int) -> "QQPSplit":
        """A fair subset of ``n`` pairs: the first ``n`` by a sha256 of each pair id.

        The split itself is sorted by id, and ids carry their source (``quora_...``,
        ``pcp_train_...``, GLUE's numbers), so its first rows are one source only; the hash order
        is independent of the id's text, of the row order and of the seed. ``sample(m)`` is the
        first ``m`` pairs of ``sample(n)`` for ``m <= n``.
        """
        order = sorted(range(len(self)), key=lambda i: _sample_key(self.ids[i]))[:n]
        labels = self.labels[order]
        labels.flags.writeable = False
        pick = lambda column: tuple(column[i] for i in order)  # noqa: E731
        return QQPSplit(pick(self.ids), pick(self.question1), pick(self.question2), labels)

    @property
    def has_labels(self) -> bool:
        return bool(np.all(self.labels != UNLABELLED))

    @property
    def positive_rate(self) -> float:
        """Fraction of duplicates (nan when empty or unlabelled)."""
        return float(np.mean(self.labels)) if len(self) and self.has_labels else math.nan


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What loading dropped and why.

    Attributes:
      rows_read: data rows seen in all inputs (headers excluded).
      malformed: rows dropped, per reason in ``REASONS``.
      duplicates_dropped: rows dropped because their pair (normalised text, either order) was
        already kept: within the pool for split sources, or in validation/test for train rows.
      label_conflicts: de-duplicated pairs whose copies disagreed on the label (first id kept).
      problems: the first few malformed rows, as "name:line: reason".
      notes: inputs that were not used, and why.
    """

    rows_read: int
    malformed: dict[str, int]
    duplicates_dropped: int
    label_conflicts: int
    problems: tuple[str, ...]
    notes: tuple[str, ...]

    @property
    def malformed_total(self) -> int:
        return sum(self.malformed.values())

    def summary(self) -> str:
        reasons = ", ".join(f"{r} {n}" for r, n in self.malformed.items() if n) or "none"
        ignored = "".join(f"; {note}" for note in self.notes)
        return (
            f"{self.rows_read} rows read; malformed dropped: {reasons}; "
            f"duplicates dropped: {self.duplicates_dropped} "
            f"(label conflicts {self.label_conflicts}){ignored}"
        )


@dataclasses.dataclass(frozen=True, eq=False)
class QQPData:
    """Splits by name ('train', 'validation', 'test'), the load report and a source description."""

    splits: dict[str, QQPSplit]
    report: LoadReport
    source: str

    def __getitem__(self, split: str) -> QQPSplit:
        return self.splits[split]


class _Pair(NamedTuple):
    id: str
    question1: str
    question2: str
    label: int


def _sample_key(pair_id: str) -> bytes:
    return hashlib.sha256(f"qqp-sample/{pair_id}".encode()).digest()


def pair_key(question1: str, question2: str) -> tuple[str, str]:
    """The identity of a pair for de-duplication: case- and whitespace-folded, order-free."""
    a, b = (" ".join(q.casefold().split()) for q in (question1, question2))
    return (a, b) if a <= b else (b, a)


def split_of(pair_id: str, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> str:
    """The split of ``pair_id``: a sha256 of the id mapped to [0, 1) against ``fractions``."""
    digest = hashlib.sha256(f"qqp-split/{pair_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    return SPLITS[int(np.searchsorted(np.cumsum(fractions)[:-1], u, side="right"))]


def _column(header: Sequence[str], names: Sequence[str]) -> int | None:
    lowered = [h.strip().lower() for h in header]
    return next((lowered.index(n) for n in names if n in lowered), None)


def _is_unlabelled(value: object) -> bool:
    return str(value).strip() == str(UNLABELLED)


def _parse(table: tables.Table, tally: tables.RowTally, notes: list[str]) -> tuple[list[_Pair], bool | None]:
    """Valid pairs of ``table`` and whether it has labels (None: the file is of no use, as said in
    ``notes``); malformed rows go to ``tally``."""
    if table.problem:
        notes.append(f"{table.name}: ignored ({table.problem})")
        return [], None
    i1, i2 = _column(table.header, ("question1",)), _column(table.header, ("question2",))
    if i1 is None or i2 is None:
        notes.append(f"{table.name}: ignored (no question1/question2 columns in header {table.header})")
        for line, _ in table.rows:
            tally.rows_read += 1
            tally.drop(f"{table.name}:{line}", "no_question_columns")
        return [], None
    i_id, i_label = _column(table.header, _ID_COLUMNS), _column(table.header, _LABEL_COLUMNS)
    width = len(table.header)
    # GLUE's test split has a label column of -1s (parquet) or none at all (TSV).
    labelled = i_label is not None and not all(
        _is_unlabelled(f[i_label]) for _, f in table.rows if tables.row_problem(f, width) is None
    )
    pairs = []
    for line, fields in table.rows:
        tally.rows_read += 1
        where = f"{table.name}:{line}"
        problem = tables.row_problem(fields, width)
        if problem:
            tally.drop(where, problem)
            continue
        q1, q2 = ("" if fields[i] is None else str(fields[i]) for i in (i1, i2))
        if not q1.strip() or not q2.strip():
            tally.drop(where, "empty_question")
            continue
        label = UNLABELLED
        if labelled:
            label_text = str(fields[i_label]).strip()
            if label_text not in ("0", "1"):
                tally.drop(where, "bad_label")
                continue
            label = int(label_text)
        pair_id = "" if i_id is None or fields[i_id] is None else str(fields[i_id]).strip()
        if not pair_id:
            pair_id = "sha1:" + hashlib.sha1(f"{q1}\t{q2}".encode()).hexdigest()[:16]
        pairs.append(_Pair(pair_id, q1, q2, label))
    return pairs, labelled


def _to_split(pairs: Iterable[_Pair]) -> QQPSplit:
    pairs = list(pairs)
    labels = np.array([p.label for p in pairs], dtype=np.int32)
    labels.flags.writeable = False
    return QQPSplit(
        ids=tuple(p.id for p in pairs),
        question1=tuple(p.question1 for p in pairs),
        question2=tuple(p.question2 for p in pairs),
        labels=labels,
    )


def _pool_and_split(
    pairs: list[_Pair], fractions: Sequence[float]
) -> tuple[dict[str, QQPSplit], int, int]:
    """De-duplicates by ``pair_key`` (smallest id kept), then splits by ``split_of`` the id."""
    groups: dict[tuple[str, str], list[_Pair]] = collections.defaultdict(list)
    for pair in pairs:
        groups[pair_key(pair.question1, pair.question2)].append(pair)
    kept = sorted(min(group) for group in groups.values())
    conflicts = sum(len({p.label for p in group}) > 1 for group in groups.values())
    by_split: dict[str, list[_Pair]] = {name: [] for name in SPLITS}
    for pair in kept:
        by_split[split_of(pair.id, fractions)].append(pair)
    return {name: _to_split(by_split[name]) for name in SPLITS}, len(pairs) - len(kept), conflicts


def _keep_given_splits(
    pairs_by_split: dict[str, list[_Pair]],
) -> tuple[dict[str, QQPSplit], int]:
    """Keeps validation/test verbatim and drops train pairs that also occur in them."""
    held_out = {
        pair_key(p.question1, p.question2)
        for name in ("validation", "test")
        for p in pairs_by_split.get(name, ())
    }
    train = [
        p for p in pairs_by_split["train"] if pair_key(p.question1, p.question2) not in held_out
    ]
    dropped = len(pairs_by_split["train"]) - len(train)
    splits = {name: _to_split(pairs_by_split[name]) for name in SPLITS if name in pairs_by_split}
    splits["train"] = _to_split(train)
    return splits, dropped


def _build_dataset(
    found: Sequence[tables.Table],
    description: str,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> QQPData:
    """Validates ``found`` and forms the splits (given train+validation, else a hash split)."""
    if len(fractions) != 3 or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {fractions}")
    tally, notes = tables.RowTally(REASONS), []
    parsed = [(table, *_parse(table, tally, notes)) for table in found]
    named = {table.split for table, _, labelled in parsed if labelled is not None}
    conflicts = 0
    if {"train", "validation"} <= named:
        pairs_by_split: dict[str, list[_Pair]] = collections.defaultdict(list)
        for table, pairs, labelled in parsed:
            if table.split is None and labelled is not None:
                notes.append(f"{table.name}: ignored (not a train/dev/validation/test file)")
            else:
                pairs_by_split[table.split].extend(pairs)
        splits, dropped = _keep_given_splits(pairs_by_split)
        how = "given splits (train de-duplicated against validation/test)"
    else:
        pool = []
        for table, pairs, labelled in parsed:
            if labelled:
                pool.extend(pairs)
            elif labelled is False:
                notes.append(f"{table.name}: ignored (no labels, so it cannot be split)")
        splits, dropped, conflicts = _pool_and_split(pool, fractions)
        percent = "/".join(f"{100 * f:g}" for f in fractions)
        how = f"pooled, de-duplicated, split {percent} by sha256 of the pair id"
    report = LoadReport(
        rows_read=tally.rows_read,
        malformed=tally.dropped,
        duplicates_dropped=dropped,
        label_conflicts=conflicts,
        problems=tuple(tally.examples),
        notes=tuple(notes),
    )
    if not any(len(split) for split in splits.values()):
        examples = "".join(f"; {e}" for e in tally.examples[:3])
        raise ValueError(f"{description}: no usable question pairs ({report.summary()}{examples})")
    return QQPData(splits=splits, report=report, source=f"{description}; {how}")


def sample_tables() -> list[tables.Table]:
    """The QQP sample bundled with the package (see flaxlora/qqp/qqp_sample/README.md)."""
    folder = importlib.resources.files("flaxlora.qqp") / "qqp_sample"
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".tsv")), key=lambda f: f.name)
    if not files:
        raise FileNotFoundError(f"the bundled QQP sample is missing from {folder}")
    return [tables.read_file(f) for f in files]


def hub_tables() -> list[tables.Table]:
    """GLUE QQP (train, validation and the unlabelled test split) from the Hugging Face hub."""
    import datasets

    try:
        dataset = datasets.load_dataset(*HUB_NAME)
    except ConnectionError as err:
        raise ConnectionError(
            f"could not download GLUE QQP ({'/'.join(HUB_NAME)}) from the Hugging Face hub: {err}. "
            "Offline, pass a local directory of GLUE TSVs or parquet files instead "
            "(--data-dir DIR, or load_qqp(data_dir=DIR)), or use the bundled sample "
            "(no --data-dir, or load_qqp())."
        ) from err
    return [
        tables.from_columns(f"{'/'.join(HUB_NAME)}:{split}", tables.SPLIT_ALIASES.get(split), ds.to_dict())
        for split, ds in dataset.items()
    ]


def load_qqp(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    from_hub: bool = False,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> QQPData:
    """Loads QQP from ``data_dir``, the hub (``from_hub=True``) or, by default, the bundled sample.

    ``data_dir`` holds .tsv (GLUE quoting), .csv or .parquet files with question1/question2 and
    label or is_duplicate columns. Files named train/dev/validation/test (HF shards
    ``train-00000-of-00001.parquet`` too) give the splits when train and dev are both present;
    otherwise all labelled files are pooled and hash-split by ``fractions`` (train, validation,
    test).
    """
    if from_hub and data_dir is not None:
        raise ValueError("pass either data_dir or from_hub=True, not both")
    if from_hub:
        found = hub_tables()
        description = f"GLUE QQP from the hub ({'/'.join(HUB_NAME)})"
    elif data_dir is not None:
        found = tables.directory_tables(data_dir)
        description = f"QQP files in {os.fspath(data_dir)}"
    else:
        found = sample_tables()
        description = "bundled QQP sample (flaxlora/qqp/qqp_sample)"
    return _build_dataset(found, description, fractions)
