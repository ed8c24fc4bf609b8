"""Reading the public datasets' CSV label files for `cxr.data.select`: the shared types (a filter step, an image to
locate, the selection options, the error) and checked reading (columns present, row lengths, values in a known set),
with errors that name the file, line and column.
"""

from __future__ import annotations

import csv
import gzip
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path


class SelectionError(ValueError):
    """A label file is malformed or the selection is empty; the message names the file, line and column."""


@dataclass(frozen=True)
class Step:
    """One filter step: a short name, what it keeps, and how many items are left after it."""

    name: str
    description: str
    count: int


@dataclass(frozen=True)
class LabelOptions:
    """The optional filters of a selection; each applies to the sources that have the label it reads."""

    exclude_support_devices: bool = False  # chexpert, mimic
    physician_labels_only: bool = False  # padchest


@dataclass(frozen=True)
class ImageToLocate:
    """An image that passed the label filters; `locations` are where to look, in order of preference."""

    key: str
    patient_id: str
    view: str
    locations: tuple[str, ...]


# ---------------------------------------------------------------------------------------------------------
# Reading label files


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


# A zip, an image or a text file in another encoding passed by mistake as a label file; a truncated or damaged
# .csv.gz (EOFError: the stream ends early; zlib.error: damaged data).
_UNREADABLE = (UnicodeDecodeError, OSError, csv.Error, EOFError, zlib.error)


def _unreadable(path: Path, error: Exception) -> SelectionError:
    return SelectionError(
        f"{path} cannot be read as a UTF-8 CSV file ({type(error).__name__}: {error}); "
        "pass the label file as released (.csv or .csv.gz)"
    )


def read_header(path: Path) -> list[str]:
    """The column names of a CSV label file (plain or .gz)."""
    path = Path(path)
    if not path.is_file():
        raise SelectionError(f"label file {path} does not exist")
    try:
        with _open_text(path) as handle:
            header = next(csv.reader(handle), None)
    except _UNREADABLE as error:
        raise _unreadable(path, error) from None
    if not header or not any(name.strip() for name in header):
        raise SelectionError(f"{path} is empty: expected a CSV file with a header row")
    return [name.strip() for name in header]


def iter_label_rows(path: Path, required: Sequence[str], what: str) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (line number, row) of a CSV label file after checking that every `required` column is there.

    Values are stripped. A row too short to hold a required column, a row with more fields than the header,
    or a file with a header but no rows is an error naming the file and line.
    """
    path = Path(path)
    columns = read_header(path)
    duplicated = sorted({name for name in columns if name and columns.count(name) > 1})
    if duplicated:
        raise SelectionError(f"{path}: column(s) {duplicated} appear more than once in the header")
    missing = [name for name in required if name not in columns]
    if missing:
        raise SelectionError(
            f"{path}: missing column(s) {missing} needed for a {what} file; columns found: {columns}. "
            "Check that --source matches the file and that the file is the original release."
        )
    rows = 0
    with _open_text(path) as handle:
        reader = csv.reader(handle)
        try:
            next(reader)
            for fields in reader:
                if not fields:
                    continue  # blank line
                if len(fields) > len(columns):
                    raise SelectionError(
                        f"{path}, line {reader.line_num}: {len(fields)} fields but the header has {len(columns)}"
                    )
                row = {name: value.strip() for name, value in zip(columns, fields)}
                short = [name for name in required if name not in row]
                if short:
                    raise SelectionError(
                        f"{path}, line {reader.line_num}: row has {len(fields)} fields, so column(s) {short} are "
                        f"missing"
                    )
                rows += 1
                yield reader.line_num, row
        except _UNREADABLE as error:  # decoding runs ahead of the csv reader, so no reliable line number
            raise _unreadable(path, error) from None
    if rows == 0:
        raise SelectionError(f"{path} has a header but no rows")


def bad_value(path: Path, line: int, column: str, value: str, expected: str) -> SelectionError:
    return SelectionError(f"{path}, line {line}, column {column!r}: unexpected value {value!r}; expected {expected}")


def check_known(value: str, known: Iterable[str], path: Path, line: int, column: str) -> str:
    if value not in known:
        shown = ", ".join(repr(v) for v in sorted(known))
        raise bad_value(path, line, column, value, f"one of {shown}")
    return value


def require_value(value: str, path: Path, line: int, column: str) -> str:
    if not value:
        raise SelectionError(f"{path}, line {line}, column {column!r}: value is blank")
    return value
