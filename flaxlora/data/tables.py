"""Raw tables: the rows of TSV, CSV and parquet files, or of in-memory columns, unvalidated.

Nothing here validates rows (for QQP, `flaxlora.qqp.data` does that). A `Table` keeps every row, even
those that could not be parsed, so that malformed rows can be counted rather than lost.
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
        header: column names.
        rows: (line number, fields) per data row; fields None for a line that could not be parsed.
    """

    name: str
    split: str | None
    header: tuple[str, ...]
    rows: Sequence[tuple[int, list[Any] | None]]


def split_of_name(file_name: str) -> str | None:
    """'train', 'validation' or 'test' from a file name such as dev.tsv or train-00000-of-00002.parquet."""
    match = _SPLIT_FILE.fullmatch(file_name.split(".", 1)[0].lower())
    return SPLIT_ALIASES[match.group(1)] if match else None


def _read_delimited(file: _Readable, delimiter: str, quoting: int) -> Table:
    """Reads a header line and the rows after it; lines the csv module rejects become None."""
    rows: list[tuple[int, list[Any] | None]] = []
    with file.open("r", newline="", encoding="utf-8", errors="replace") as handle:
        reader = csv.reader(handle, delimiter=delimiter, quoting=quoting)
        header = next(reader, [])
        while True:
            try:
                fields: list[Any] | None = next(reader)
            except StopIteration:
                break
            except csv.Error:
                fields = None
            rows.append((reader.line_num, fields))
    return Table(file.name, split_of_name(file.name), tuple(header), rows)


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


def directory_tables(data_dir: str | os.PathLike[str]) -> list[Table]:
    """Every .tsv/.csv/.parquet file directly in `data_dir`, in name order."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {str(root)!r} does not exist")
    tables = [t for p in sorted(root.iterdir()) if p.is_file() and (t := read_file(p)) is not None]
    if not tables:
        raise FileNotFoundError(f"no .tsv, .csv or .parquet files in {str(root)!r}")
    return tables
