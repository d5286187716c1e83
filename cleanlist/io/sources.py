"""Read contact sources (CSV/TSV, Parquet, JSONL, XLSX, SQL) as bounded batches with global row numbers.

Every batch covers a contiguous range of input rows `[first_row, end_row)`: the rows that parsed into
the header's shape are in `frame`, whose index holds their global 0-based row numbers, and the rows
that did not are in `bad_rows`, each with its own row number and a reason. So every input row is in
exactly one of the two, and `len(frame) + len(bad_rows) == end_row - first_row == batch_rows` for every
batch but the last. A source without data rows still yields one (empty) batch, so its columns are known
without a second read. Row numbers count data rows (the header is not a row); blank lines carry no
data and are skipped without a number.

A BadRow's reason starts with its row number. For JSONL and XLSX, where the user looks for the row by
another number, that place follows in parentheses: "row 7 (line 8)" (rows count data rows from 0, lines
count every physical line of the file from 1, blank ones included) and "row 2 (sheet 'Contacts' row 4)"
(Excel's own row number). A JSONL line that is not a JSON object keeps its raw text at the end of the
reason, after a colon (and under "_raw"), so the rejects show what was there.

Text formats (delimited, JSONL, XLSX) give every column the pandas `str` dtype: values are never
type-inferred (leading zeros stay) and an empty value is a missing value (NaN). Parquet and SQL keep
their native dtypes, except a SQL column whose values Arrow cannot hold as one type (ints and 'n/a' from
a SQLite column, a JSON field of numbers and strings, UUIDs): it is read as text (`_storable`). Header
names are made unique the way pandas does ("Email", "Email.1") and an empty one becomes `column_<n>`;
whether two similar columns are ambiguous is for header mapping to decide.
NUL characters are removed from text values of every format at read time (they break CSV tools and
databases; an .xlsx cannot hold them).

Delimited files: the delimiter is `,` `;` tab or `|`, taken from the header line when only one of them
occurs there, else sniffed from the first 64 KiB (`.tsv` is always tab; an Excel `sep=;` line is obeyed).
Lines end with LF, CRLF or a bare CR (old Mac exports), mixed in one file if need be; a quoted cell keeps
the CR or LF inside it as one cell. A row with fewer fields than the header is padded with missing
values (exports drop trailing empty fields); a row with more is a BadRow, unless the extra fields are
all empty (a trailing delimiter).

Encodings of text files (delimited and JSONL; see `_Text`): with `encoding` (any Python codec name:
cp1251, latin-1, utf-16, …) the whole file is decoded with it. Otherwise a UTF-16 byte-order mark (or
the NUL pattern of BOM-less UTF-16) makes the file UTF-16; else every line that is valid UTF-8 is
UTF-8 (a UTF-8 BOM is dropped), and the lines that are not are decoded with one legacy code page,
detected with charset-normalizer from the first 64 KiB of such lines. When several code pages fit the
sample equally well the more common one wins (CP-1252, then CP-1251, CP-1250, …), and one INFO line on
the logger "cleanlist.sources" names the code page used, "detected", and the others that would fit
(choose with `encoding`). A byte the code page leaves undefined is kept as its Latin-1 character. A
file that looks binary is an InputError.

Workbooks (.xlsx): a sheet without any value does not count. A workbook with one sheet is read; one with
several and no `sheet` is refused with one line naming them, since rows on a sheet nobody named would
be in neither the output nor the rejects. `sheet="NAME"` reads that sheet (matched exactly, else
ignoring case and surrounding spaces; an unknown name is refused, listing the sheets). `sheet="*"`
reads every sheet, in workbook order, as one list: each sheet's header row must equal the first sheet's
(a sheet with another header is refused, named), header rows after the first are not rows, and row
numbers continue from sheet to sheet. `sheet` with a source that is not a workbook is refused, as is
`encoding` with one that is not text.

A truncated or corrupt compressed file (.gz .bz2 .xz), workbook or Parquet file is one InputError line.
"""

from __future__ import annotations

import codecs
import csv
import datetime as dt
import io
import json
import logging
import lzma
import os
import re
import zipfile
import zlib
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, closing, contextmanager
from dataclasses import dataclass, field
from itertools import chain
from typing import IO, Any, AnyStr
from urllib.parse import urlsplit, urlunsplit

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from cleanlist.errors import InputError
from cleanlist.io.cursor import CursorFilter, CursorSplit, sql_column_type, sql_past_mark
from cleanlist.vocab import CursorKind, RejectCode

logger = logging.getLogger("cleanlist.sources")

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
ALL_SHEETS = "*"

# Legacy code pages the detector chooses from, most common first: the order breaks ties between code
# pages that fit a sample equally well (short samples often fit several).
LEGACY_CODE_PAGES = (
    "cp1252",
    "cp1251",
    "cp1250",
    "cp1253",
    "cp1254",
    "cp1257",
    "cp932",
    "gb18030",
    "cp949",
    "big5",
    "koi8_r",
    "cp1255",
    "cp1256",
    "cp1258",
    "cp874",
    "cp866",
    "koi8_u",
    "mac_roman",
    "cp850",
    "cp437",
    "euc_jp",
)
# Bytes CP-1252 leaves undefined: kept out of the detector's sample, so that a stray one does not turn a
# Western file into Arabic or Cyrillic.
_CP1252_UNDEFINED = re.compile(rb"[\x81\x8d\x8f\x90\x9d]")
# Control bytes that text does not contain (NUL, tab, LF, VT, FF, CR and ESC excepted).
_BINARY_BYTES = bytes([*range(1, 9), *range(14, 27), *range(28, 32), 127])


class _LenientDecoder:
    """An incremental decoder that never fails: a byte the codec cannot decode becomes its Latin-1
    character, and decoding goes on after it. (No codec error handler is registered: that registry is
    the whole process's.)"""

    def __init__(self, codec: str) -> None:
        self._decoder = codecs.getincrementaldecoder(codec)()

    def decode(self, data: bytes, final: bool = False) -> str:
        parts: list[str] = []
        while True:
            held, flag = self._decoder.getstate()
            try:
                parts.append(self._decoder.decode(data, final))
                return "".join(parts)
            except UnicodeDecodeError as exc:
                seen = held + data  # what the codec was decoding (its held-back bytes first)
                self._decoder.setstate((b"", flag))
                parts.append(self._decoder.decode(seen[: exc.start], False))
                parts.append(seen[exc.start : exc.end].decode("latin-1"))
                data = seen[exc.end :]

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


# ---------------------------------------------------------------------------------------------- text


def _line_cut(data: AnyStr, final: bool) -> int:
    """Length of the complete lines at the start of `data` (LF, CRLF or bare CR); all of it if final.

    A CR at the very end is held back: its LF may be the first byte of the next block.
    """
    if final:
        return len(data)
    cr, lf = ("\r", "\n") if isinstance(data, str) else (b"\r", b"\n")
    end = len(data) - 1 if data.endswith(cr) else len(data)
    return max(data.rfind(lf, 0, end), data.rfind(cr, 0, end)) + 1


def _text_lines(text: str) -> Iterator[str]:
    """Lines of `text` with their endings, split at LF, CRLF and bare CR only; NULs removed."""
    if "\x00" in text:
        text = text.replace("\x00", "")
    return iter(io.StringIO(text, newline=""))


def _resolve_codec(encoding: str) -> str:
    """The codec name Python knows `encoding` by; an unknown or non-text codec is one InputError line."""
    try:
        info = codecs.lookup(encoding)
    except LookupError:
        info = None
    if info is None or not getattr(info, "_is_text_encoding", True):
        raise InputError(
            f"unknown encoding {encoding!r}: --encoding takes a Python codec name "
            "(utf-8, cp1251, cp1252, latin-1, utf-16, shift_jis, …)"
        )
    return "utf-8-sig" if info.name == "utf-8" else info.name  # a forced UTF-8 still drops a BOM


def _bomless_utf16(block: bytes) -> str | None:
    """'utf-16-le'/'utf-16-be' when the block has UTF-16's NUL pattern (Latin text without a BOM)."""
    sample = block[: SNIFF_BYTES - SNIFF_BYTES % 2]
    if len(sample) < 4:
        return None
    even, odd = sample[0::2], sample[1::2]
    for zeros, others, name in ((odd, even, "utf-16-le"), (even, odd, "utf-16-be")):
        if zeros.count(0) >= 0.4 * len(zeros) and others.count(0) <= 0.02 * len(others):
            return name
    return None


def _looks_binary(block: bytes) -> bool:
    sample = block[:SNIFF_BYTES]
    control = len(sample) - len(sample.translate(None, _BINARY_BYTES))
    return control > 0.05 * len(sample) or sample.count(0) > 0.3 * len(sample)


def _detect_code_page(sample: bytes) -> tuple[str, list[str]]:
    """(code page, others that fit as well) for `sample`, lines that are not UTF-8.

    charset-normalizer scores each candidate (chaos: how much the decoded text looks like noise;
    coherence: how much like a language). Candidates within 0.1 of the least chaos and of the most
    coherence tie, and the tie goes to the more common code page; with nothing fitting, CP-1252.
    """
    from charset_normalizer import from_bytes

    sample = _CP1252_UNDEFINED.sub(b"", sample)

    def rank(match: Any) -> int:
        names = [match.encoding, *match.could_be_from_charset]
        return min((LEGACY_CODE_PAGES.index(n) for n in names if n in LEGACY_CODE_PAGES), default=-1)

    # A sample left with ASCII only (its odd bytes were CP-1252's undefined ones) matches "ascii".
    matches = [m for m in from_bytes(sample, cp_isolation=list(LEGACY_CODE_PAGES)) if rank(m) >= 0]
    if not matches:
        return "cp1252", []
    least_chaos = min(match.chaos for match in matches)
    fitting = [match for match in matches if match.chaos <= least_chaos + 0.1]
    most_coherent = max(match.coherence for match in fitting)
    fitting = sorted((m for m in fitting if m.coherence >= most_coherent - 0.1), key=rank)
    names = [LEGACY_CODE_PAGES[rank(match)] for match in fitting]
    return names[0], list(dict.fromkeys(names[1:]))


class _Text:
    """The lines of a text source as str, with their endings (see "Encodings" in the module docstring).

    Deciding per line whether it is UTF-8 needs no pre-pass (one read, also for remote files), lets a
    bad byte at row 900,000 cost nothing, and decodes files glued together from UTF-8 and Windows exports
    correctly row by row; a legacy line that happens to be valid UTF-8 needs byte pairs like "Ã©", which
    real text lacks. The legacy code page is detected once, from the first block that needs it.
    `encoding_used` says how text that is not UTF-8 was decoded (None while all of it was UTF-8).
    """

    def __init__(self, shown: str, encoding: str | None, *, announce: bool = True) -> None:
        self.shown = shown
        self.forced = encoding
        self.announce = announce
        self.encoding_used: str | None = None
        self._legacy: str | None = None

    def _use(self, encoding: str, how: str, note: str = "", *, legacy: bool = False) -> None:
        self.encoding_used = f"{encoding} ({how})"
        if self.announce:
            what = ": text that is not UTF-8" if legacy else ""
            logger.info("source '%s'%s is decoded as %s (%s%s)", self.shown, what, encoding, how, note)

    def lines(self, stream: IO[bytes]) -> Iterator[str]:
        block = stream.read(READ_BLOCK_BYTES)
        if self.forced is not None:
            self._use(self.forced, "--encoding")
            yield from self._decoded(self.forced, block, stream)
            return
        if block.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # Excel "Unicode text"
            self.encoding_used = "utf-16"
            yield from self._decoded("utf-16", block, stream)
            return
        if (utf16 := _bomless_utf16(block)) is not None:
            self._use(utf16, "detected", ": UTF-16 without a byte-order mark")
            yield from self._decoded(utf16, block, stream)
            return
        if _looks_binary(block):
            raise InputError(
                f"source '{self.shown}' is not text (it holds binary data); "
                "if it is UTF-16 or UTF-32 without a byte-order mark, name it with --encoding"
            )
        if block.startswith(codecs.BOM_UTF8):
            block = block[len(codecs.BOM_UTF8) :]
        pending = b""
        while True:
            final = not block
            data = pending + block if pending else block
            cut = _line_cut(data, final)
            pending, data = data[cut:], data[:cut]
            if data:
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError:
                    yield from self._mixed_lines(data)
                else:
                    yield from _text_lines(text)
            if final:
                return
            block = stream.read(READ_BLOCK_BYTES)

    def _decoded(self, codec: str, block: bytes, stream: IO[bytes]) -> Iterator[str]:
        """The whole stream decoded with one codec (incrementally: UTF-16 cannot be cut at b"\\n")."""
        decoder = _LenientDecoder(codec)
        pending = ""
        while True:
            final = not block
            text = pending + decoder.decode(block, final=final)
            cut = _line_cut(text, final)
            pending = text[cut:]
            yield from _text_lines(text[:cut])
            if final:
                return
            block = stream.read(READ_BLOCK_BYTES)

    def _mixed_lines(self, data: bytes) -> Iterator[str]:
        """Complete lines of a block that is not all UTF-8: each line UTF-8 if it is, else legacy."""
        raw_lines = data.splitlines(keepends=True)  # LF, CRLF and bare CR only
        if self._legacy is None:
            sample = bytearray()
            for raw in raw_lines:
                if len(sample) >= SNIFF_BYTES:
                    break
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError:
                    sample += raw
            self._legacy, others = _detect_code_page(bytes(sample))
            note = f"; {', '.join(others[:3])} would fit too: choose with --encoding" if others else ""
            self._use(self._legacy, "detected", note, legacy=True)
        legacy = self._legacy
        for raw in raw_lines:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                line = _LenientDecoder(legacy).decode(raw, final=True)
            yield line.replace("\x00", "") if "\x00" in line else line


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

    def __init__(self, columns: Sequence[str], batch_rows: int, text: _Text | None = None) -> None:
        self.columns = list(columns)
        self.batch_rows = batch_rows
        self.text = text
        self.next_row = 0
        self.first_row = 0
        self.rows: list[Sequence[object]] = []
        self.bad: list[BadRow] = []
        self.batches = 0

    def add(self, row: Sequence[object]) -> SourceBatch | None:
        self.rows.append(row)
        self.next_row += 1
        return self._cut() if self.next_row - self.first_row >= self.batch_rows else None

    def reject(self, values: dict[str, object], reason: str, where: str | None = None) -> SourceBatch | None:
        """A bad row; `where` is its place under another number (a file line, a sheet row)."""
        number = f"row {self.next_row} ({where})" if where else f"row {self.next_row}"
        self.bad.append(BadRow(self.next_row, values, f"{number} {reason}"))
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
            encoding=self.text.encoding_used if self.text is not None else None,
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
    open_source: Opener, shown: str, batch_rows: int, tab: bool, encoding: str | None
) -> Generator[SourceBatch, None, None]:
    # Raising the limit is process-wide but only ever loosens csv's default of 128 KiB.
    csv.field_size_limit(max(csv.field_size_limit(), MAX_FIELD_CHARS))
    text = _Text(shown, encoding)
    with open_source() as stream:
        lines = text.lines(stream)
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
            batcher = _Batcher(_unique_names(header), batch_rows, text)
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


def _json_objects(open_source: Opener, text: _Text) -> Iterator[tuple[int, str, dict[str, Any] | str]]:
    """(line number, line, object) per non-blank line; the object is an error message when the line is
    not a JSON object. Line numbers count every line of the file from 1, blank ones included."""
    with open_source() as stream:
        for number, line in enumerate(text.lines(stream), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:  # its own "line 1 column 5" would contradict ours
                yield number, line, f"is not valid JSON ({exc.msg} at column {exc.colno})"
                continue
            except (ValueError, RecursionError) as exc:  # a number too long, nesting too deep
                yield number, line, f"is not valid JSON ({_first_line(exc)})"
                continue
            if isinstance(value, dict):
                yield number, line, value
            else:
                yield number, line, f"is a JSON {type(value).__name__}, not an object"


def _json_text(value: object) -> object:
    """A JSON value as text, like every value of a text format: numbers and nested values as JSON."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _iter_jsonl(
    open_source: Opener, shown: str, batch_rows: int, encoding: str | None
) -> Generator[SourceBatch, None, None]:
    # Keys may first appear on any line (writers omit null keys), so one pass collects them all:
    # columns stay the same in every batch and no value is left out.
    keys: dict[str, None] = {}
    lines = 0
    for _, _, value in _json_objects(open_source, _Text(shown, encoding)):
        lines += 1
        if isinstance(value, dict):
            keys.update(dict.fromkeys(value))
    if not lines:
        raise InputError(f"source '{shown}' is empty")
    key_list = list(keys)
    text = _Text(shown, encoding, announce=False)  # the first pass said how it decodes
    batcher = _Batcher(_unique_names(key_list), batch_rows, text)
    for number, line, value in _json_objects(open_source, text):
        if isinstance(value, str):
            raw = line.rstrip("\r\n")
            if (batch := batcher.reject({"_raw": raw}, f"{value}: {raw}", f"line {number}")) is not None:
                yield batch
        else:
            get = value.get
            row = [v if (v := get(key)) is None or v.__class__ is str else _json_text(v) for key in key_list]
            if "\\u0000" in line:  # an escaped NUL in a string (raw NULs are gone already)
                row = [v.replace("\x00", "") if isinstance(v, str) else v for v in row]
            if (batch := batcher.add(row)) is not None:
                yield batch
    if (batch := batcher.finish()) is not None:
        yield batch


# ------------------------------------------------------------------------------------------- Parquet


def _arrow_without_nul(table: pa.Table) -> pa.Table:
    """`table` with NULs removed from its string columns (a scan per string column; rarely a copy)."""
    for i, column in enumerate(table.columns):
        is_text = pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
        if is_text and pc.any(pc.match_substring(column, "\x00")).as_py():
            table = table.set_column(i, table.field(i), pc.replace_substring(column, "\x00", ""))
    return table


def _frame_without_nul(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with NULs removed from the strings of its object columns (what a database hands back)."""
    for name in frame.select_dtypes(include="object").columns:
        column = frame[name]
        try:
            has_nul = column.str.contains("\x00", regex=False, na=False)
        except (AttributeError, TypeError):  # no strings in it (numbers, dates, bytes)
            continue
        if has_nul.any():
            frame[name] = column.where(~has_nul, column[has_nul].str.replace("\x00", "", regex=False))
    return frame


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
            frame = _arrow_without_nul(table).to_pandas(ignore_metadata=True)
            frame.columns = pd.Index(columns)
            frame.index = pd.RangeIndex(first_row, first_row + len(frame))
            return SourceBatch(frame, first_row, first_row + len(frame))

        def record_batches() -> Iterator[Any]:
            batches = parquet.iter_batches(batch_size=batch_rows, columns=selected)
            while True:
                try:
                    record_batch = next(batches, None)
                except (pa.ArrowException, OSError) as exc:  # a page or row group cut off or mangled
                    raise InputError(
                        f"source '{shown}' is truncated or corrupt (parquet): {_first_line(exc)}"
                    ) from None
                if record_batch is None:
                    return
                yield record_batch

        # Row groups cut Parquet's own batches short; regroup so every batch but the last is full.
        pending: list[Any] = []
        pending_rows = first_row = 0
        for record_batch in record_batches():
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


def _sheet_rows(sheet: Any) -> Generator[tuple[int, list[object]], None, None]:
    """(Excel row number, values as text) of each row of a worksheet that holds a value."""
    sheet.reset_dimensions()  # read-only mode trusts the file's <dimension>; a wrong one cuts rows off
    for number, cells in enumerate(sheet.iter_rows(values_only=True), start=1):
        values = [_excel_text(cell) for cell in cells]
        if any(value is not None and value != "" for value in values):
            yield number, values


def _sheet_header(values: list[object]) -> list[str]:
    values = list(values)
    while values and values[-1] is None:  # formatting widens the sheet, not the header
        values.pop()
    return _unique_names(values)


def _sheet_list(titles: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(f"'{title}'" for title in titles[:limit])
    return f"{shown}, … ({len(titles)} sheets)" if len(titles) > limit else shown


def _header_difference(first: list[str], other: list[str]) -> str:
    for column, (want, got) in enumerate(zip(first, other, strict=False), start=1):
        if want != got:
            return f"column {column} is '{got}', not '{want}'"
    return f"{len(other)} columns, not {len(first)}"


@dataclass
class _Sheet:
    title: str
    worksheet: Any
    header_row: int  # Excel's number of the header row
    header: list[str]


def _chosen_sheets(workbook: Any, shown: str, sheet: str | None) -> list[_Sheet]:
    """The sheets to read, by the rule of the module docstring; their headers are checked up front."""
    worksheets = list(workbook.worksheets)
    if not worksheets:
        raise InputError(f"source '{shown}' has no worksheet")
    candidates = worksheets
    if sheet is not None and sheet != ALL_SHEETS:
        wanted = sheet.strip().casefold()
        candidates = [ws for ws in worksheets if ws.title == sheet] or [
            ws for ws in worksheets if ws.title.strip().casefold() == wanted
        ]
        if len(candidates) != 1:
            titles = [ws.title for ws in worksheets]
            raise InputError(f"workbook '{shown}' has no sheet '{sheet}'; its sheets: {_sheet_list(titles)}")
    chosen: list[_Sheet] = []
    for worksheet in candidates:
        with closing(_sheet_rows(worksheet)) as rows:
            first = next(rows, None)
        if first is not None:
            chosen.append(_Sheet(worksheet.title, worksheet, first[0], _sheet_header(first[1])))
    if not chosen:
        if len(candidates) == 1 and len(worksheets) > 1:
            raise InputError(f"sheet '{candidates[0].title}' of workbook '{shown}' is empty")
        raise InputError(f"source '{shown}' is empty")
    if sheet is None and len(chosen) > 1:
        raise InputError(
            f"workbook '{shown}' has sheets {_sheet_list([s.title for s in chosen])}: name one with --sheet, "
            f"or --sheet '{ALL_SHEETS}' to read every sheet (same header)"
        )
    first_sheet = chosen[0]
    for other in chosen[1:]:
        if other.header != first_sheet.header:
            raise InputError(
                f"sheet '{other.title}' of workbook '{shown}' has another header than sheet "
                f"'{first_sheet.title}' ({_header_difference(first_sheet.header, other.header)}): "
                f"read it on its own with --sheet '{other.title}'"
            )
    return chosen


def _iter_xlsx(
    open_source: Opener, shown: str, batch_rows: int, sheet: str | None
) -> Generator[SourceBatch, None, None]:
    import openpyxl  # type: ignore[import-untyped]
    from openpyxl.utils.exceptions import InvalidFileException  # type: ignore[import-untyped]

    with open_source() as stream:
        if not stream.read(1):
            raise InputError(f"source '{shown}' is empty")
        stream.seek(0)
        try:
            workbook = openpyxl.load_workbook(stream, read_only=True, data_only=True)
        except (zipfile.BadZipFile, InvalidFileException, KeyError, OSError, zlib.error, SyntaxError) as exc:
            raise InputError(f"source '{shown}' is not a readable .xlsx file ({_first_line(exc)})") from None
        try:
            yield from _xlsx_batches(_chosen_sheets(workbook, shown, sheet), batch_rows)
        except (zipfile.BadZipFile, KeyError, EOFError, zlib.error, SyntaxError) as exc:
            # Sheets are read as they stream: a damaged part of the archive shows up here.
            raise InputError(f"source '{shown}' is truncated or corrupt (xlsx): {_first_line(exc)}") from None
        finally:
            workbook.close()


# The same state machine as _iter_delimited, over worksheet rows.
def _xlsx_batches(sheets: list[_Sheet], batch_rows: int) -> Generator[SourceBatch, None, None]:
    batcher = _Batcher(sheets[0].header, batch_rows)
    width = len(batcher.columns)
    for sheet in sheets:
        for number, values in _sheet_rows(sheet.worksheet):
            if number <= sheet.header_row:
                continue  # the header (no row above it holds a value)
            if len(values) > width:
                extra = values[width:]
                if any(value not in (None, "") for value in extra):
                    row: dict[str, object] = dict(zip(batcher.columns, values, strict=False))
                    row["_extra"] = "\t".join("" if value is None else str(value) for value in extra)
                    reason = f"has {width + len(extra)} cells, the header has {width}"
                    where = f"sheet '{sheet.title}' row {number}"
                    if (batch := batcher.reject(row, reason, where)) is not None:
                        yield batch
                    continue
                del values[width:]
            elif len(values) < width:
                values.extend([None] * (width - len(values)))
            if (batch := batcher.add(values)) is not None:
                yield batch
    if (batch := batcher.finish()) is not None:
        yield batch


# ----------------------------------------------------------------------------------------------- SQL


def _iter_sql(
    url: str, query: str, batch_rows: int, cursor: CursorFilter | None = None
) -> Generator[SourceBatch, None, None]:
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
                skipped = 0
                pushed = cursor is not None and cursor.after is not None
                if cursor is not None and pushed and _can_push_mark(connection, query, cursor):
                    result, skipped = _sql_past_mark(connection, query, cursor, batch_rows)
                else:
                    pushed = False
                    # exec_driver_sql: the query goes to the database as written (":x" and "%" stay literal).
                    result = connection.execution_options(
                        stream_results=True, max_row_buffer=batch_rows, no_parameters=True
                    ).exec_driver_sql(query)
                columns = _unique_names(list(result.keys()))
                first_row = 0
                for part in result.partitions(batch_rows):
                    frame = _storable(_frame_without_nul(pd.DataFrame(part, columns=columns)))
                    end_row = first_row + len(frame)
                    frame.index = pd.RangeIndex(first_row, end_row)
                    batch = SourceBatch(frame, first_row, end_row, skipped=skipped)
                    if cursor is not None:
                        _cursor_batch(batch, cursor, filtered_already=pushed)
                    yield batch
                    skipped = 0  # the rows the database left out are counted once, on the first batch
                    first_row = end_row
            except SQLAlchemyError as exc:
                raise failure("SQL query failed on", exc) from None
            if first_row == 0:
                yield SourceBatch(pd.DataFrame(columns=columns), 0, 0, skipped=skipped)
    finally:
        engine.dispose()


def _storable(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with every object column Arrow cannot type (a number column holding 'n/a' in SQLite,
    datetimes with mixed offsets, UUIDs, JSON documents) turned into text, so it can be staged; the
    cursor logic then types the cursor column itself (io/cursor.py)."""
    for name in frame.select_dtypes(include="object").columns:
        column = frame[name]
        try:
            pa.array(column, from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
            frame[name] = column.map(_as_text).astype(STRING_DTYPE)
    return frame


def _as_text(value: object) -> object:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


# PostgreSQL column types that compare with a bound mark of each kind the way io/cursor.py compares
# values. For any other column (text holding numbers or ISO timestamps, SQLite's untyped columns, where
# '100' < '20' as text) the mark is applied while reading, never in a WHERE that could leave rows out.
_PUSHABLE_TYPES = {
    CursorKind.NUMBER: {"smallint", "integer", "bigint", "numeric", "real", "double precision"},
    CursorKind.TIMESTAMP: {"timestamp without time zone", "timestamp with time zone", "date"},
}
_NAIVE_TYPES = {"timestamp without time zone", "date"}


def _can_push_mark(connection: Any, query: str, cursor: CursorFilter) -> bool:
    """Whether the database can apply the cursor's mark itself (a PostgreSQL column of a matching type);
    remembers whether the mark is bound without a time zone."""
    from sqlalchemy import text

    assert cursor.after is not None
    if connection.dialect.name != "postgresql" or cursor.after.kind not in _PUSHABLE_TYPES:
        return False
    probe = sql_column_type(query, cursor.column, connection.dialect.identifier_preparer.quote)
    # As the user wrote it: no parameters, so "%" and ":x" stay literal (as for the unfiltered read).
    described = connection.execution_options(no_parameters=True).exec_driver_sql(probe).cursor.description
    if not described:
        return False
    type_name = connection.execute(
        text("SELECT format_type(:oid, NULL)"), {"oid": int(described[0].type_code)}
    ).scalar_one()
    type_name = re.sub(r"\(.*?\)", "", str(type_name)).strip()  # numeric(10,2), timestamp(3) …
    if type_name not in _PUSHABLE_TYPES[cursor.after.kind]:
        logger.info(
            "cursor %r is a %s column: the mark is applied while reading (every row is read)",
            cursor.column,
            type_name,
        )
        return False
    cursor.naive_sql = type_name in _NAIVE_TYPES
    return True


def _sql_past_mark(connection: Any, query: str, cursor: CursorFilter, batch_rows: int) -> tuple[Any, int]:
    """The query's rows past the cursor's mark (bound as a parameter), and how many it leaves out."""
    from sqlalchemy import text

    assert cursor.after is not None
    select_past, count_not_past = sql_past_mark(
        query, cursor.column, connection.dialect.identifier_preparer.quote
    )
    mark = {"cleanlist_mark": cursor.after.sql_value(naive=cursor.naive_sql)}
    skipped = int(connection.execute(text(count_not_past), mark).scalar_one())
    cursor.skipped += skipped
    result = connection.execution_options(stream_results=True, max_row_buffer=batch_rows).execute(
        text(select_past), mark
    )
    return result, skipped


# -------------------------------------------------------------------------------------------- public


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
        return _iter_sql(source, sql_query, batch_rows, cursor)
    batches = _iter_file(source, batch_rows, sheet, encoding, storage_options)
    return batches if cursor is None else _past_mark(batches, cursor)


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


def _iter_file(
    source: str,
    batch_rows: int,
    sheet: str | None,
    encoding: str | None,
    storage_options: Mapping[str, Any] | None = None,
) -> Generator[SourceBatch, None, None]:
    shown = display_source(source)
    kind, extension, compression = _kind_of(source)
    if sheet is not None and kind != "xlsx":
        raise InputError(f"--sheet applies to .xlsx workbooks only, not to '{shown}'")
    if encoding is not None:
        if kind not in ("delimited", "jsonl"):
            raise InputError(
                f"--encoding applies to text files (.csv .tsv .txt .jsonl .ndjson) only, not to '{shown}'"
            )
        encoding = _resolve_codec(encoding)
    open_source = _opener(source, compression, storage_options)
    if kind == "delimited":
        return _iter_delimited(open_source, shown, batch_rows, extension == ".tsv", encoding)
    if kind == "jsonl":
        return _iter_jsonl(open_source, shown, batch_rows, encoding)
    if kind == "parquet":
        return _iter_parquet(open_source, shown, batch_rows)
    return _iter_xlsx(open_source, shown, batch_rows, sheet)


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
