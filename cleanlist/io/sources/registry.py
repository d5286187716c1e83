"""The registry of sources: which reader reads a source, by its extension (files) or its scheme (a
query).

To add a kind of source, write one module with its reader and its `SourceFormat` (or `QuerySource`),
and add it to `FILE_FORMATS` (or `QUERY_SOURCES`) below. The registry is tuples: fixed at import,
never changed at run time.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Mapping
from contextlib import closing
from typing import Any, Final

from cleanlist.errors import InputError
from cleanlist.io.cursor import CursorFilter
from cleanlist.io.location import display_source
from cleanlist.io.sources.base import (
    _COMPRESSIONS,
    DEFAULT_BATCH_ROWS,
    FileRead,
    QuerySource,
    SourceBatch,
    SourceFormat,
    _opener,
    _past_mark,
)
from cleanlist.io.sources.delimited import DELIMITED
from cleanlist.io.sources.jsonl import JSONL
from cleanlist.io.sources.parquet import PARQUET
from cleanlist.io.sources.sql import SQL
from cleanlist.io.sources.text import _resolve_codec
from cleanlist.io.sources.xlsx import XLSX

FILE_FORMATS: Final[tuple[SourceFormat, ...]] = (DELIMITED, PARQUET, JSONL, XLSX)
QUERY_SOURCES: Final[tuple[QuerySource, ...]] = (SQL,)


def _extensions(formats: tuple[SourceFormat, ...]) -> str:
    return " ".join(ext for fmt in formats for ext in fmt.extensions)


_TEXT_FORMATS = tuple(fmt for fmt in FILE_FORMATS if fmt.text)
SUPPORTED: Final = (
    f"{_extensions(FILE_FORMATS)} "
    f"({'/'.join(ext for fmt in _TEXT_FORMATS for ext in fmt.extensions)} also {' '.join(_COMPRESSIONS)})"
)


def file_format(source: str) -> tuple[SourceFormat, str, str | None]:
    """(format, extension, compression) from the file name; the query string of a URL is ignored."""
    path = source.split("://", 1)[1].split("?", 1)[0].split("#", 1)[0] if "://" in source else source
    name = os.path.basename(path.rstrip("/")).lower()
    stem, dot, ext = name.rpartition(".")
    compression = _COMPRESSIONS.get(f".{ext}") if dot else None
    if compression:
        stem, dot, ext = stem.rpartition(".")
    found = next((fmt for fmt in FILE_FORMATS if f".{ext}" in fmt.extensions), None) if dot else None
    if found is None or (compression and not found.text):
        shown = f".{ext}" if dot else "no extension"
        raise InputError(
            f"source '{display_source(source)}' has an unsupported type ({shown}); supported: {SUPPORTED}"
        )
    return found, f".{ext}", compression


def query_source(url: str) -> QuerySource:
    """The query source for `url` by its scheme; the first one (which names what it expects) otherwise."""
    head, sep, _ = url.partition("://")
    scheme = head.split("+", 1)[0].lower() if sep else ""
    return next((source for source in QUERY_SOURCES if scheme in source.schemes), QUERY_SOURCES[0])


def iter_source(
    source: str | os.PathLike[str],
    *,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    sql_query: str | None = None,
    sheet: str | None = None,
    encoding: str | None = None,
    cursor: CursorFilter | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Generator[SourceBatch, None, None]:
    """Stream `source` as SourceBatches of `batch_rows` input rows each (see the module docstring).

    `source` is a local path or an fsspec URL (memory://, file://, s3://…) whose extension picks the
    format, or a SQLAlchemy database URL when `sql_query` is given. `sheet` picks the sheets of an .xlsx
    ("NAME", or "*" for every sheet); `encoding` forces the codec of a text file. Problems with the
    source or these options (missing, unsupported, empty, unreadable, failing query, unknown sheet or
    codec) raise InputError; this happens on the call for what can be checked up front, else on the
    first batch (or, for a file damaged further in, where the damage is). Memory is bounded by the batch
    size, not the source. With `cursor`, only rows past its mark are read (`SourceBatch.skipped` counts
    the others) and the largest cursor value read is tracked (see cleanlist/io/cursor.py).
    `storage_options` go to fsspec for a URL source (s3fs's `key`, `endpoint_url`…).
    """
    if batch_rows < 1:
        raise InputError(f"batch_rows must be at least 1, got {batch_rows}")
    source = os.fspath(source)
    sheet = sheet if sheet and sheet.strip() else None
    encoding = encoding.strip() if encoding and encoding.strip() else None
    if sql_query is not None:
        if sheet is not None or encoding is not None:
            raise InputError("--sheet and --encoding apply to file sources, not to a SQL query")
        if not sql_query.strip():
            raise InputError("the SQL query is empty")
        return query_source(source).read(source, sql_query, batch_rows, cursor)
    batches = _iter_file(source, batch_rows, sheet, encoding, storage_options)
    return batches if cursor is None else _past_mark(batches, cursor)


def _iter_file(
    source: str,
    batch_rows: int,
    sheet: str | None,
    encoding: str | None,
    storage_options: Mapping[str, Any] | None = None,
) -> Generator[SourceBatch, None, None]:
    shown = display_source(source)
    fmt, extension, compression = file_format(source)
    if sheet is not None and not fmt.sheets:
        shown_formats = _extensions(tuple(f for f in FILE_FORMATS if f.sheets))
        raise InputError(f"--sheet applies to {shown_formats} workbooks only, not to '{shown}'")
    if encoding is not None:
        if not fmt.text:
            raise InputError(
                f"--encoding applies to text files ({_extensions(_TEXT_FORMATS)}) only, not to '{shown}'"
            )
        encoding = _resolve_codec(encoding)
    open_source = _opener(source, compression, storage_options)
    return fmt.read(FileRead(open_source, shown, batch_rows, extension, encoding=encoding, sheet=sheet))


def source_columns(
    source: str | os.PathLike[str],
    sql_query: str | None = None,
    *,
    sheet: str | None = None,
    encoding: str | None = None,
) -> list[str]:
    """Column names of `source` as iter_source names them (unique, `column_<n>` for empty ones).

    Reads only the header, except for JSONL (keys may first appear on any line: one pass over the file)
    and SQL (the query is started and closed after its first row). Every sheet's header is read when
    `sheet` is "*".
    """
    batches = iter_source(source, batch_rows=1, sql_query=sql_query, sheet=sheet, encoding=encoding)
    with closing(batches):
        first = next(batches)
    return [str(column) for column in first.frame.columns]
