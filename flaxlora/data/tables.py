"""Raw tables: the rows of TSV, CSV and parquet files, or of in-memory columns, and their report.

A `Table` keeps every row, even one that could not be read (its fields are then the reason: a
line the csv module rejects, or one with bytes that are not UTF-8), so that malformed rows are
counted rather than lost or silently altered; a file that cannot be read at all is a `Table` with
a `problem`. `row_problem` and `RowTally` are the checks and the per-reason report every reader
of tables shares (for QQP, `flaxlora.qqp.data` adds its own checks of columns and labels).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

_SPLIT_FILE = re.compile(r"(train|dev|validation|test)(-\d+-of-\d+)?")
SPLIT_ALIASES = {"train": "train", "dev": "validation", "validation": "validation", "test": "test"}
# Why a row is dropped, in the order reports list them.
UNPARSEABLE, INVALID_UTF8, WRONG_COLUMN_COUNT = "unparseable", "invalid_utf8", "wrong_column_count"
ROW_REASONS = (UNPARSEABLE, INVALID_UTF8, WRONG_COLUMN_COUNT)
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # bytes that are not UTF-8, as errors="surrogateescape" keeps them
_MAX_EXAMPLES = 20


class _Readable(Protocol):
    """A `pathlib.Path` or an `importlib.resources` Traversable."""

    name: str

    def open(self, *args: Any, **kwargs: Any) -> Any: ...


@dataclasses.dataclass(frozen=True)
class Table:
    """The rows of one file or hub split.

    Attributes:
        name: where the rows came from, for messages.
        split: 'train', 'validation' or 'test' when the source names it, else None.
        header: column names (bytes that are not UTF-8 kept as lone surrogates, see `row_problem`).
        rows: (line number, fields) per data row; for a line that could not be read, the reason
          (``UNPARSEABLE`` or ``INVALID_UTF8``) instead of the fields.
        problem: why the file could not be read at all (then there are no rows), else None.
    """

    name: str
    split: str | None
    header: tuple[str, ...]
    rows: Sequence[tuple[int, list[Any] | str]]
    problem: str | None = None


def row_problem(fields: list[Any] | str, width: int) -> str | None:
    """Why a row of a table ``width`` columns wide is unusable (one of ``ROW_REASONS``), or None.

    ``fields`` may also be a header read as a row (a header keeps bytes that are not UTF-8 as
    lone surrogates, so that it matches no column name)."""
    if isinstance(fields, str):
        return fields
    if any(isinstance(f, str) and _UNDECODABLE.search(f) for f in fields):
        return INVALID_UTF8
    return WRONG_COLUMN_COUNT if len(fields) != width else None


class RowTally:
    """Rows read and rows dropped per reason; the first few dropped kept as ``name:line: reason``."""

    def __init__(self, reasons: Sequence[str] = ROW_REASONS):
        self.rows_read = 0
        self.dropped = dict.fromkeys(reasons, 0)
        self.examples: list[str] = []

    def drop(self, where: str, reason: str) -> None:
        self.dropped[reason] += 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(f"{where}: {reason}")

    @property
    def total(self) -> int:
        return sum(self.dropped.values())

    def summary(self) -> str:
        """E.g. ``"wrong_column_count 2, invalid_utf8 1"``, or ``"none"``."""
        return ", ".join(f"{r} {n}" for r, n in self.dropped.items() if n) or "none"


def split_of_name(file_name: str) -> str | None:
    """'train', 'validation' or 'test' from a file name such as dev.tsv or train-00000-of-00002.parquet."""
    match = _SPLIT_FILE.fullmatch(file_name.split(".", 1)[0].lower())
    return SPLIT_ALIASES[match.group(1)] if match else None


def _read_delimited(file: _Readable, delimiter: str, quoting: int) -> Table:
    """Reads a header line and the rows after it (a UTF-8 BOM is dropped, CRLF and LF both end a
    line); a line the csv module rejects or with bytes that are not UTF-8 keeps only its reason."""
    rows: list[tuple[int, list[Any] | str]] = []
    split = split_of_name(file.name)
    with file.open("r", newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
        reader = csv.reader(handle, delimiter=delimiter, quoting=quoting)
        try:
            header = next(reader, [])
        except csv.Error as err:
            return Table(file.name, split, (), [], problem=f"its header line cannot be parsed ({err})")
        while True:
            try:
                fields: list[Any] | str = next(reader)
            except StopIteration:
                break
            except csv.Error:
                fields = UNPARSEABLE
            else:
                if any(_UNDECODABLE.search(f) for f in fields):
                    fields = INVALID_UTF8
            rows.append((reader.line_num, fields))
    return Table(file.name, split, tuple(header), rows)


def from_columns(name: str, split: str | None, columns: dict[str, list[Any]]) -> Table:
    header = tuple(columns)
    rows = [(i + 1, list(fields)) for i, fields in enumerate(zip(*columns.values()))]
    return Table(name, split, header, rows)


def read_tsv(path: _Readable) -> Table:
    """A tab-separated file without quoting: GLUE TSVs keep raw quote characters, as the HF GLUE
    loader reads them."""
    return _read_delimited(path, "\t", csv.QUOTE_NONE)


def read_file(path: _Readable) -> Table | None:
    """Reads a .tsv (GLUE: no quoting), .csv (standard quoting) or .parquet file; else None."""
    suffix = Path(path.name).suffix.lower()
    if suffix == ".tsv":
        return read_tsv(path)
    if suffix == ".csv":
        return _read_delimited(path, ",", csv.QUOTE_MINIMAL)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return from_columns(path.name, split_of_name(path.name), pq.read_table(path).to_pydict())
    return None


def _read_or_problem(path: Path) -> Table | None:
    """`read_file`, with a file that cannot be read at all (a broken parquet, no permission) as a
    `Table` with its ``problem``."""
    try:
        return read_file(path)
    except (OSError, ValueError) as err:  # pyarrow's errors are OSError or ValueError subclasses
        first = str(err).strip().splitlines()
        return Table(path.name, split_of_name(path.name), (), [],
                     problem=f"unreadable: {type(err).__name__}: {first[0] if first else ''}"[:300])


def directory_tables(data_dir: str | os.PathLike[str]) -> list[Table]:
    """Every .tsv/.csv/.parquet file directly in `data_dir`, in name order."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {str(root)!r} does not exist")
    tables = [t for p in sorted(root.iterdir()) if p.is_file() and (t := _read_or_problem(p)) is not None]
    if not tables:
        raise FileNotFoundError(f"no .tsv, .csv or .parquet files in {str(root)!r}")
    return tables
