"""Read contact sources (CSV/TSV, Parquet, JSONL, XLSX, SQL) as bounded batches with global row numbers.

Every batch covers a contiguous range of input rows `[first_row, end_row)`: the rows that parsed into
the header's shape are in `frame`, whose index holds their global 0-based row numbers, and the rows
that did not are in `bad_rows`, each with its own row number and a reason. So every input row is in
exactly one of the two, and `len(frame) + len(bad_rows) == end_row - first_row == batch_rows` for every
batch but the last. A source without data rows still yields one (empty) batch, so its columns are known
without a second read. Row numbers count data rows (the header is not a row); blank lines carry no
data and are skipped without a number.

Text formats (delimited, JSONL, XLSX) give every column the pandas `str` dtype: values are never
type-inferred (leading zeros stay) and an empty value is a missing value (NaN). Parquet and SQL keep
their native dtypes. Header names are made unique the way pandas does ("Email", "Email.1") and an empty
one becomes `column_<n>`; whether two similar columns are ambiguous is for header mapping to decide.

Delimited files: the delimiter is `,` `;` tab or `|`, taken from the header line when only one of them
occurs there, else sniffed from the first 64 KiB (`.tsv` is always tab; an Excel `sep=;` line is obeyed).
Encoding is decided per line (see `_decoded_lines`). A row with fewer fields than the header is padded
with missing values (exports drop trailing empty fields); a row with more is a BadRow, unless the extra
fields are all empty (a trailing delimiter).
"""

from __future__ import annotations

import codecs
import csv
import datetime as dt
import io
import json
import os
import re
import zipfile
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import AbstractContextManager, closing, contextmanager
from dataclasses import dataclass, field
from itertools import chain
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from cleanlist.errors import InputError

DEFAULT_BATCH_ROWS = 50_000
SNIFF_BYTES = 64 * 1024
READ_BLOCK_BYTES = 1024 * 1024
# The API refuses values over 2,048 characters; a field this long means an unbalanced quote ate the file.
MAX_FIELD_CHARS = 16 * 1024 * 1024
SNIFF_DELIMITERS = ",;\t|"
# pandas' default string dtype ("str"): Arrow-backed, NaN for missing.
STRING_DTYPE = pd.StringDtype("pyarrow", na_value=np.nan)
_NULL_STRING = pa.scalar(None, pa.large_string())
_PANDAS_INDEX_COLUMN = re.compile(r"__index_level_\d+__")

_KINDS = {
    ".csv": "delimited",
    ".tsv": "delimited",
    ".txt": "delimited",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".xlsx": "xlsx",
}
# Only the line-oriented formats are read through a decompressor; the others need random access.
_COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz"}
SUPPORTED = (
    ".csv .tsv .txt .parquet .pq .jsonl .ndjson .xlsx (.csv/.tsv/.txt/.jsonl/.ndjson also .gz .bz2 .xz)"
)

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


@dataclass
class SourceBatch:
    """Input rows `[first_row, end_row)`: parsed rows in `frame` (index = row numbers), others in bad_rows."""

    frame: pd.DataFrame
    first_row: int
    end_row: int
    bad_rows: list[BadRow] = field(default_factory=list)


def display_source(source: str) -> str:
    """The source as it may appear in a message: a URL's password and query (signed URLs) are hidden."""
    if "://" not in source:
        return source
    try:
        parts = urlsplit(source)
        if parts.password is not None:
            parts = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1))
        if parts.query:
            parts = parts._replace(query="…")
        return urlunsplit(parts)
    except ValueError:
        return source.split("://", 1)[0] + "://…"


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


def _kind_of(source: str) -> tuple[str, str, str | None]:
    """(kind, extension, compression) from the file name; the query string of a URL is ignored."""
    path = source.split("://", 1)[1].split("?", 1)[0].split("#", 1)[0] if "://" in source else source
    name = os.path.basename(path.rstrip("/")).lower()
    stem, dot, ext = name.rpartition(".")
    compression = _COMPRESSIONS.get(f".{ext}") if dot else None
    if compression:
        stem, dot, ext = stem.rpartition(".")
    kind = _KINDS.get(f".{ext}") if dot else None
    if kind is None or (compression and kind not in ("delimited", "jsonl")):
        shown = f".{ext}" if dot else "no extension"
        raise InputError(
            f"source '{display_source(source)}' has an unsupported type ({shown}); supported: {SUPPORTED}"
        )
    return kind, f".{ext}", compression


def _opener(source: str, compression: str | None) -> Opener:
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
                stream = fsspec.open(source, "rb", compression=compression).open()
        except FileNotFoundError:
            raise InputError(f"source '{shown}' not found") from None
        except (ImportError, ValueError) as exc:  # fsspec: unknown protocol or its package missing
            raise InputError(f"cannot open source '{shown}': {_first_line(exc)}") from None
        except OSError as exc:
            raise InputError(f"cannot open source '{shown}': {exc.strerror or _first_line(exc)}") from None
        with stream:
            yield stream

    return open_source


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------- text


def _decode_line(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        return raw.decode("cp1252")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _decoded_lines(stream: IO[bytes]) -> Iterator[str]:
    """Lines (with their endings) of a byte stream, decoded line by line.

    Each line is UTF-8 if it decodes as UTF-8, else CP-1252, else Latin-1 (which cannot fail). Deciding
    per line needs no pre-pass (one read, also for remote files), lets a bad byte at row 900,000 cost
    nothing, and decodes files glued together from UTF-8 and Windows exports correctly row by row; a
    CP-1252 line that happens to be valid UTF-8 needs byte pairs like "Ã©", which real text lacks.
    A UTF-8 BOM is dropped; a UTF-16 BOM switches the whole stream to UTF-16 (Excel "Unicode text").
    """
    block = stream.read(READ_BLOCK_BYTES)
    if block.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        yield from _utf16_lines(block, stream)
        return
    if block.startswith(codecs.BOM_UTF8):
        block = block[len(codecs.BOM_UTF8) :]
    pending = b""
    while block:
        data = pending + block if pending else block
        cut = data.rfind(b"\n") + 1
        pending, data = data[cut:], data[:cut]
        if data:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                yield from map(_decode_line, io.BytesIO(data))
            else:
                yield from io.StringIO(text, newline="\n")
        block = stream.read(READ_BLOCK_BYTES)
    if pending:
        yield _decode_line(pending)


def _utf16_lines(block: bytes, stream: IO[bytes]) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-16")(errors="replace")
    pending = ""
    while True:
        text = pending + decoder.decode(block, final=not block)
        cut = text.rfind("\n") + 1
        pending = text[cut:]
        yield from io.StringIO(text[:cut], newline="\n")
        if not block:
            break
        block = stream.read(READ_BLOCK_BYTES)
    if pending:
        yield pending


def _sniff_delimiter(sample: list[str]) -> str:
    header = sample[0]
    counts = {d: header.count(d) for d in SNIFF_DELIMITERS}
    present = [d for d in SNIFF_DELIMITERS if counts[d]]
    if len(present) == 1:  # the usual case, and the header cannot be misread by data rows
        return present[0]
    try:
        sniffed = csv.Sniffer().sniff("".join(sample), delimiters=SNIFF_DELIMITERS).delimiter
    except csv.Error:
        sniffed = ""
    if sniffed and counts[sniffed]:
        return sniffed
    # A delimiter that never occurs in the header cannot split it; trust the header's own counts.
    best = max(SNIFF_DELIMITERS, key=lambda d: counts[d])
    return best if counts[best] else ","


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


class _Batcher:
    """Collects parsed rows and bad rows and cuts them into batches of `batch_rows` input rows."""

    def __init__(self, columns: Sequence[str], batch_rows: int) -> None:
        self.columns = list(columns)
        self.batch_rows = batch_rows
        self.next_row = 0
        self.first_row = 0
        self.rows: list[Sequence[object]] = []
        self.bad: list[BadRow] = []
        self.batches = 0

    def add(self, row: Sequence[object]) -> SourceBatch | None:
        self.rows.append(row)
        self.next_row += 1
        return self._cut() if self.next_row - self.first_row >= self.batch_rows else None

    def reject(self, values: dict[str, object], reason: str) -> SourceBatch | None:
        self.bad.append(BadRow(self.next_row, values, f"row {self.next_row} {reason}"))
        self.next_row += 1
        return self._cut() if self.next_row - self.first_row >= self.batch_rows else None

    def finish(self) -> SourceBatch | None:
        return self._cut() if self.next_row > self.first_row or self.batches == 0 else None

    def _cut(self) -> SourceBatch:
        batch = SourceBatch(
            frame=_string_frame(self.rows, self.columns, self._index()),
            first_row=self.first_row,
            end_row=self.next_row,
            bad_rows=self.bad,
        )
        self.first_row, self.rows, self.bad = self.next_row, [], []
        self.batches += 1
        return batch

    def _index(self) -> pd.Index:
        if not self.bad:
            return pd.RangeIndex(self.first_row, self.first_row + len(self.rows))
        bad = {row.row_number for row in self.bad}
        return pd.Index([n for n in range(self.first_row, self.next_row) if n not in bad], dtype="int64")


# A row-by-row state machine (sep= line, header, width checks, blank lines, batches): its branches are
# the cases of the format, kept in one reading order.
def _iter_delimited(  # noqa: C901, PLR0912
    open_source: Opener, shown: str, batch_rows: int, tab: bool
) -> Generator[SourceBatch, None, None]:
    # Raising the limit is process-wide but only ever loosens csv's default of 128 KiB.
    csv.field_size_limit(max(csv.field_size_limit(), MAX_FIELD_CHARS))
    with open_source() as stream:
        lines = _decoded_lines(stream)
        sample: list[str] = []
        size = 0
        for line in lines:
            if not sample and not line.strip():
                continue  # leading blank lines
            sample.append(line)
            size += len(line)
            if size >= SNIFF_BYTES:
                break
        if not sample:
            raise InputError(f"source '{shown}' is empty")
        first = sample[0].strip()
        if len(first) == 5 and first.lower().startswith("sep="):  # Excel's delimiter hint line
            delimiter = first[4]
            sample = sample[1:]
        else:
            delimiter = "\t" if tab else _sniff_delimiter(sample)
        reader = csv.reader(chain(sample, lines), delimiter=delimiter)
        batcher: _Batcher | None = None
        try:
            header = next((fields for fields in reader if not _is_blank(fields)), None)
            if header is None:
                raise InputError(f"source '{shown}' is empty")
            header[0] = header[0].lstrip("\ufeff")
            batcher = _Batcher(_unique_names(header), batch_rows)
            width = len(header)
            add = batcher.add
            for fields in reader:
                if len(fields) != width or width == 1:
                    if _is_blank(fields):
                        continue
                    if len(fields) < width:
                        # Exports often drop trailing empty fields; the missing ones are empty.
                        fields.extend([""] * (width - len(fields)))
                    elif any(extra.strip() for extra in fields[width:]):
                        values: dict[str, object] = dict(zip(batcher.columns, fields, strict=False))
                        values["_extra"] = delimiter.join(fields[width:])
                        reason = f"has {len(fields)} fields, the header has {width}"
                        if (batch := batcher.reject(values, reason)) is not None:
                            yield batch
                        continue
                    else:  # trailing delimiters only
                        del fields[width:]
                if (batch := add(fields)) is not None:
                    yield batch
        except csv.Error as exc:
            row = batcher.next_row if batcher else 0
            raise InputError(
                f"source '{shown}' cannot be parsed at row {row} ({exc}); look for an unbalanced quote"
            ) from None
        if (batch := batcher.finish()) is not None:
            yield batch


# --------------------------------------------------------------------------------------------- JSONL


def _json_objects(open_source: Opener) -> Iterator[tuple[str, dict[str, Any] | str]]:
    """(line, object) per non-blank line; the second item is an error message when it is not an object."""
    with open_source() as stream:
        for line in _decoded_lines(stream):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as exc:
                yield line, f"is not valid JSON ({_first_line(exc)})"
                continue
            if isinstance(value, dict):
                yield line, value
            else:
                yield line, f"is a JSON {type(value).__name__}, not an object"


def _json_text(value: object) -> object:
    """A JSON value as text, like every value of a text format: numbers and nested values as JSON."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _iter_jsonl(open_source: Opener, shown: str, batch_rows: int) -> Generator[SourceBatch, None, None]:
    # Keys may first appear on any line (writers omit null keys), so one pass collects them all:
    # columns stay the same in every batch and no value is left out.
    keys: dict[str, None] = {}
    lines = 0
    for _, value in _json_objects(open_source):
        lines += 1
        if isinstance(value, dict):
            keys.update(dict.fromkeys(value))
    if not lines:
        raise InputError(f"source '{shown}' is empty")
    key_list = list(keys)
    batcher = _Batcher(_unique_names(key_list), batch_rows)
    for line, value in _json_objects(open_source):
        if isinstance(value, str):
            if (batch := batcher.reject({"_raw": line.rstrip("\r\n")}, value)) is not None:
                yield batch
        else:
            get = value.get
            row = [v if (v := get(key)) is None or v.__class__ is str else _json_text(v) for key in key_list]
            if (batch := batcher.add(row)) is not None:
                yield batch
    if (batch := batcher.finish()) is not None:
        yield batch


# ------------------------------------------------------------------------------------------- Parquet


def _iter_parquet(open_source: Opener, shown: str, batch_rows: int) -> Generator[SourceBatch, None, None]:
    import pyarrow.parquet as pq

    with open_source() as stream:
        try:
            # Without pre-buffering, memory follows the batch more closely (a row group is the floor).
            parquet = pq.ParquetFile(stream, pre_buffer=False, buffer_size=READ_BLOCK_BYTES)
        except (pa.ArrowInvalid, OSError) as exc:
            if "size is 0 bytes" in str(exc):
                raise InputError(f"source '{shown}' is empty") from None
            raise InputError(
                f"source '{shown}' is not a readable Parquet file ({_first_line(exc)})"
            ) from None
        names = parquet.schema_arrow.names
        # pandas stores a non-default index as "__index_level_0__": an artifact of writing, not data.
        data_names = [name for name in names if not _PANDAS_INDEX_COLUMN.fullmatch(name)]
        columns = _unique_names(data_names)
        selected = data_names if len(data_names) < len(names) else None

        def to_frame(table: Any, first_row: int) -> SourceBatch:
            frame = table.to_pandas(ignore_metadata=True)
            frame.columns = pd.Index(columns)
            frame.index = pd.RangeIndex(first_row, first_row + len(frame))
            return SourceBatch(frame, first_row, first_row + len(frame))

        # Row groups cut Parquet's own batches short; regroup so every batch but the last is full.
        pending: list[Any] = []
        pending_rows = first_row = 0
        for record_batch in parquet.iter_batches(batch_size=batch_rows, columns=selected):
            pending.append(record_batch)
            pending_rows += record_batch.num_rows
            while pending_rows >= batch_rows:
                table = pa.Table.from_batches(pending)
                yield to_frame(table.slice(0, batch_rows), first_row)
                first_row += batch_rows
                rest = table.slice(batch_rows)
                pending, pending_rows = rest.to_batches(), rest.num_rows
        if pending_rows or first_row == 0:
            schema = parquet.schema_arrow
            if selected is not None:
                schema = pa.schema([schema.field(name) for name in selected])
            yield to_frame(
                pa.Table.from_batches(pending, schema=pending[0].schema if pending else schema), first_row
            )


# ---------------------------------------------------------------------------------------------- XLSX


def _excel_text(value: object) -> object:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, dt.datetime):
        return value.date().isoformat() if value.time() == dt.time() else value.isoformat()
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # phone numbers and ids typed as numbers
    return str(value)


# The same state machine as _iter_delimited, over worksheet rows.
def _iter_xlsx(  # noqa: C901, PLR0912
    open_source: Opener, shown: str, batch_rows: int
) -> Generator[SourceBatch, None, None]:
    import openpyxl  # type: ignore[import-untyped]
    from openpyxl.utils.exceptions import InvalidFileException  # type: ignore[import-untyped]

    with open_source() as stream:
        if not stream.read(1):
            raise InputError(f"source '{shown}' is empty")
        stream.seek(0)
        try:
            workbook = openpyxl.load_workbook(stream, read_only=True, data_only=True)
        except (zipfile.BadZipFile, InvalidFileException, KeyError, OSError) as exc:
            raise InputError(f"source '{shown}' is not a readable .xlsx file ({_first_line(exc)})") from None
        try:
            if not workbook.worksheets:
                raise InputError(f"source '{shown}' has no worksheet")
            sheet = workbook.worksheets[0]
            batcher: _Batcher | None = None
            width = 0
            for cells in sheet.iter_rows(values_only=True):
                values = [_excel_text(cell) for cell in cells]
                if all(value is None or value == "" for value in values):
                    continue
                if batcher is None:
                    while values and values[-1] is None:  # formatting widens the sheet, not the header
                        values.pop()
                    batcher = _Batcher(_unique_names(values), batch_rows)
                    width = len(batcher.columns)
                    continue
                if len(values) > width:
                    extra = values[width:]
                    if any(value not in (None, "") for value in extra):
                        row: dict[str, object] = dict(zip(batcher.columns, values, strict=False))
                        row["_extra"] = "\t".join("" if value is None else str(value) for value in extra)
                        reason = f"has {width + len(extra)} cells, the header has {width}"
                        if (batch := batcher.reject(row, reason)) is not None:
                            yield batch
                        continue
                    del values[width:]
                elif len(values) < width:
                    values.extend([None] * (width - len(values)))
                if (batch := batcher.add(values)) is not None:
                    yield batch
            if batcher is None:
                raise InputError(f"source '{shown}' is empty")
            if (batch := batcher.finish()) is not None:
                yield batch
        finally:
            workbook.close()


# ----------------------------------------------------------------------------------------------- SQL


def _iter_sql(url: str, query: str, batch_rows: int) -> Generator[SourceBatch, None, None]:
    from sqlalchemy import create_engine
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

    from cleanlist.dburl import display_url, to_sqlalchemy_url

    parsed = to_sqlalchemy_url(url, what="the SQL source")
    shown = display_url(parsed)
    database = parsed.database or ""
    is_sqlite_file = parsed.get_backend_name() == "sqlite" and database not in ("", ":memory:")
    if is_sqlite_file and not database.startswith("file:") and not os.path.exists(database):
        raise InputError(f"source '{shown}' not found")  # sqlite would create an empty database

    def failure(action: str, exc: BaseException) -> InputError:
        cause = getattr(exc, "orig", None) or exc
        message = _first_line(cause)
        if parsed.password:
            message = message.replace(str(parsed.password), "***")
        return InputError(f"{action} {shown}: {message}")

    try:
        engine = create_engine(parsed)
    except (NoSuchModuleError, ImportError, ArgumentError) as exc:
        raise failure("no database driver for", exc) from None
    try:
        try:
            connection = engine.connect()
        except SQLAlchemyError as exc:
            raise failure("cannot connect to", exc) from None
        with connection:
            try:
                # exec_driver_sql: the query goes to the database as written (":x" and "%" stay literal).
                result = connection.execution_options(
                    stream_results=True, max_row_buffer=batch_rows, no_parameters=True
                ).exec_driver_sql(query)
                columns = _unique_names(list(result.keys()))
                first_row = 0
                for part in result.partitions(batch_rows):
                    frame = pd.DataFrame(part, columns=columns)
                    frame.index = pd.RangeIndex(first_row, first_row + len(frame))
                    yield SourceBatch(frame, first_row, first_row + len(frame))
                    first_row += len(frame)
            except SQLAlchemyError as exc:
                raise failure("SQL query failed on", exc) from None
            if first_row == 0:
                yield SourceBatch(pd.DataFrame(columns=columns), 0, 0)
    finally:
        engine.dispose()


# -------------------------------------------------------------------------------------------- public


def iter_source(
    source: str | os.PathLike[str],
    *,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    sql_query: str | None = None,
) -> Generator[SourceBatch, None, None]:
    """Stream `source` as SourceBatches of `batch_rows` input rows each (see the module docstring).

    `source` is a local path or an fsspec URL (memory://, file://, s3://…) whose extension picks the
    format, or a SQLAlchemy database URL when `sql_query` is given. Problems with the source (missing,
    unsupported, empty, unreadable, failing query) raise InputError; this happens on the call for what can
    be checked up front, else on the first batch. Memory is bounded by the batch size, not the source.
    """
    if batch_rows < 1:
        raise InputError(f"batch_rows must be at least 1, got {batch_rows}")
    source = os.fspath(source)
    if sql_query is not None:
        if not sql_query.strip():
            raise InputError("the SQL query is empty")
        return _iter_sql(source, sql_query, batch_rows)
    shown = display_source(source)
    kind, extension, compression = _kind_of(source)
    open_source = _opener(source, compression)
    if kind == "delimited":
        return _iter_delimited(open_source, shown, batch_rows, tab=extension == ".tsv")
    if kind == "jsonl":
        return _iter_jsonl(open_source, shown, batch_rows)
    if kind == "parquet":
        return _iter_parquet(open_source, shown, batch_rows)
    return _iter_xlsx(open_source, shown, batch_rows)


def source_columns(source: str | os.PathLike[str], sql_query: str | None = None) -> list[str]:
    """Column names of `source` as iter_source names them (unique, `column_<n>` for empty ones).

    Reads only the header, except for JSONL (keys may first appear on any line: one pass over the file)
    and SQL (the query is started and closed after its first row).
    """
    with closing(iter_source(source, batch_rows=1, sql_query=sql_query)) as batches:
        first = next(batches)
    return [str(column) for column in first.frame.columns]
