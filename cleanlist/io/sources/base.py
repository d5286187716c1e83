"""What every source reader shares: batches and bad rows, opening a file (local or fsspec, maybe
compressed), unique column names, and the cursor applied to a batch."""

from __future__ import annotations

import lzma
import os
import re
import zlib
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, closing, contextmanager
from dataclasses import dataclass, field
from typing import IO, Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from cleanlist.errors import InputError
from cleanlist.io.cursor import CursorFilter, CursorSplit
from cleanlist.io.location import display_source
from cleanlist.vocab import RejectCode

DEFAULT_BATCH_ROWS = 50_000


SNIFF_BYTES = 64 * 1024


READ_BLOCK_BYTES = 1024 * 1024


# The API refuses values over 2,048 characters; a field this long means an unbalanced quote ate the file.
MAX_FIELD_CHARS = 16 * 1024 * 1024


# pandas' default string dtype ("str"): Arrow-backed, NaN for missing.
STRING_DTYPE = pd.StringDtype("pyarrow", na_value=np.nan)


_NULL_STRING = pa.scalar(None, pa.large_string())


_PANDAS_INDEX_COLUMN = re.compile(r"__index_level_\d+__")


# Only the line-oriented formats are read through a decompressor; the others need random access.
_COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz"}


Opener = Callable[[], AbstractContextManager[IO[bytes]]]


@dataclass(frozen=True)
class BadRow:
    """An input row that could not be parsed into the header's shape; it belongs in the rejects.

    `values` maps column → value for what could be read; fields past the header's width are joined
    under "_extra", and a line that is not JSON at all is kept whole under "_raw".
    """

    row_number: int
    values: dict[str, object]
    reason: str
    # Why it is rejected: unreadable, or a cursor value that does not fit the cursor's kind.
    code: RejectCode = RejectCode.UNPARSABLE


@dataclass
class SourceBatch:
    """Input rows `[first_row, end_row)`: parsed rows in `frame` (index = row numbers), others in bad_rows."""

    frame: pd.DataFrame
    first_row: int
    end_row: int
    bad_rows: list[BadRow] = field(default_factory=list)
    # How text that is not UTF-8 was decoded so far ("cp1251 (detected)", "cp1251 (--encoding)",
    # "utf-16"); None while all of it was UTF-8, and for Parquet, XLSX and SQL.
    encoding: str | None = None
    # Rows of [first_row, end_row) left out because their cursor is not past the mark (see io/cursor.py):
    # with a cursor, len(frame) + len(bad_rows) + skipped == end_row - first_row.
    skipped: int = 0


def _unique_names(names: Sequence[object]) -> list[str]:
    """Empty names become `column_<n>` (1-based); repeats get pandas' `.1`, `.2` suffixes."""
    named = [str(name).strip() if name is not None else "" for name in names]
    named = [name or f"column_{i}" for i, name in enumerate(named, start=1)]
    counts: dict[str, int] = {}
    unique: list[str] = []
    for name in named:
        seen = counts.get(name, 0)
        while seen > 0:  # same walk as pandas' dedup_names, so "a", "a", "a.1" → "a", "a.1", "a.1.1"
            counts[name] = seen + 1
            name = f"{name}.{seen}"
            seen = counts.get(name, 0)
        counts[name] = seen + 1
        unique.append(name)
    return unique


def _opener(source: str, compression: str | None, storage_options: Mapping[str, Any] | None = None) -> Opener:
    shown = display_source(source)
    local = "://" not in source
    if local:
        source = os.path.expanduser(source)
        if not os.path.exists(source):
            raise InputError(f"source '{shown}' not found")
        if os.path.isdir(source):
            raise InputError(f"source '{shown}' is a directory, not a file")

    @contextmanager
    def open_source() -> Iterator[IO[bytes]]:
        try:
            if local and compression is None:
                stream: IO[bytes] = open(source, "rb")  # noqa: SIM115 - closed below
            else:
                options = dict(storage_options or {}) if not local else {}
                stream = fsspec.open(source, "rb", compression=compression, **options).open()
        except FileNotFoundError:
            raise InputError(f"source '{shown}' not found") from None
        except (ImportError, ValueError) as exc:  # fsspec: unknown protocol or its package missing
            raise InputError(f"cannot open source '{shown}': {_first_line(exc)}") from None
        except OSError as exc:
            raise InputError(f"cannot open source '{shown}': {exc.strerror or _first_line(exc)}") from None
        with stream:
            try:
                yield stream
            except (EOFError, zlib.error, lzma.LZMAError, OSError) as exc:
                # Raised by reading: a decompressor that ran out of data or met garbage (gzip's
                # BadGzipFile and bz2's "Invalid data stream" are OSErrors), or the file system.
                if compression is not None:
                    raise InputError(
                        f"source '{shown}' is truncated or corrupt ({compression}): {_first_line(exc)}"
                    ) from None
                if isinstance(exc, OSError):
                    reason = exc.strerror or _first_line(exc)
                    raise InputError(f"cannot read source '{shown}': {reason}") from None
                raise

    return open_source


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _is_blank(fields: Sequence[str]) -> bool:
    return not fields or (len(fields) == 1 and not fields[0].strip())


def _string_frame(rows: Sequence[Sequence[object]], columns: Sequence[str], index: pd.Index) -> pd.DataFrame:
    """Frame of `str` columns from row lists; "" and None become missing."""
    data: dict[str, Any] = {}
    columns_of_rows = zip(*rows, strict=True) if rows else ([] for _ in columns)
    for name, column in zip(columns, columns_of_rows, strict=True):
        # Built through Arrow: about twice as fast as pandas converting a list of Python strings.
        array = pa.array(column, type=pa.large_string())
        array = pc.if_else(pc.equal(array, ""), _NULL_STRING, array)
        data[name] = pd.array(pa.chunked_array([array]), dtype=STRING_DTYPE)
    return pd.DataFrame(data, index=index, columns=list(columns))


def _past_mark(
    batches: Generator[SourceBatch, None, None], cursor: CursorFilter
) -> Generator[SourceBatch, None, None]:
    with closing(batches):
        for batch in batches:
            yield _cursor_batch(batch, cursor)


def _cursor_batch(batch: SourceBatch, cursor: CursorFilter, *, filtered_already: bool = False) -> SourceBatch:
    """`batch` through the cursor: rows not past the mark counted in `skipped`, misfits as BadRows."""
    split: CursorSplit = cursor.apply(batch.frame, filtered_already=filtered_already)
    batch.skipped += len(batch.frame) - len(split.kept) - len(split.misfits)
    batch.frame = split.kept
    rows = split.misfits.to_dict("records")
    for number, row, reason in zip(split.misfits.index, rows, split.reasons, strict=True):
        values = {str(k): (None if _missing(v) else v) for k, v in row.items()}
        reason = f"row {number}: {reason}"
        batch.bad_rows.append(BadRow(int(number), values, reason, RejectCode.BAD_CURSOR_VALUE))
    if len(split.misfits):
        batch.bad_rows.sort(key=lambda bad: bad.row_number)
    return batch


def _missing(value: object) -> bool:
    try:
        return bool(pd.isna(value))  # type: ignore[call-overload]
    except (TypeError, ValueError):  # array-like values (JSON lists): present
        return False


@dataclass(frozen=True)
class FileRead:
    """What a file reader is given: how to open the file, how to name it in messages, the batch size,
    its extension (lower case, with the dot), and the `encoding` / `sheet` options (None unless the
    format takes them)."""

    open_source: Opener
    shown: str
    batch_rows: int
    extension: str
    encoding: str | None = None
    sheet: str | None = None


@dataclass(frozen=True)
class SourceFormat:
    """One kind of file source, found by its extension (`extensions`, lower case, with the dot).

    `text`: decoded as text, so `encoding` applies and the file may be compressed (.gz .bz2 .xz);
    `sheets`: `sheet` applies. `read` streams the batches (see the package docstring)."""

    name: str
    extensions: tuple[str, ...]
    read: Callable[[FileRead], Generator[SourceBatch, None, None]]
    text: bool = False
    sheets: bool = False


@dataclass(frozen=True)
class QuerySource:
    """One kind of query source, found by the URL's scheme (`schemes`: backends, any `+driver`)."""

    name: str
    schemes: tuple[str, ...]
    read: Callable[[str, str, int, CursorFilter | None], Generator[SourceBatch, None, None]]
