"""File sinks: CSV, Parquet and JSONL outputs and CSV rejects, local or remote (fsspec). Files are
written to a local temporary file first and moved into place at the end, so they appear atomically.

What the files hold is personal data and is opened in spreadsheets:

- local files are created owner-only: the file 0600 (whatever mode an earlier file of that name had),
  each directory the writer creates 0700 (existing directories are left as they are). Remote (fsspec)
  destinations get what their filesystem gives.
- CSV (outputs and rejects) reads back the same: lines end in CRLF (RFC 4180), so every cell holding a
  CR or an LF is quoted; NUL characters are dropped from CSV cells (spreadsheets and many CSV readers
  stop at them). Parquet and JSONL keep every character.
- CSV is spreadsheet-safe unless `raw_csv`: a text cell whose first character is =, +, -, @, tab or CR
  gets a leading ' (the OWASP rule for CSV injection), so a spreadsheet shows it instead of running it.
  Only text cells are touched (object and string columns): numbers are left alone, but a number held
  as text ("-5", "+1 555 0100") is prefixed too. Header names are written as they are. Parquet, JSONL
  and database outputs are never altered.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cleanlist.io.sink import RowSink, SinkKind, SinkOptions, write_failed
from cleanlist.store.database import make_private_dirs

# CSV line ending: RFC 4180's CRLF. Python's csv module quotes a cell only for the line terminator's own
# characters, so with "\n" a cell holding a bare CR was written unquoted and read back as two rows.
CSV_LINE_TERMINATOR = "\r\n"
# The OWASP rule: a cell starting with one of these is a formula (or becomes one) in a spreadsheet.
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
FORMULA_ESCAPE = "'"
_FORMULA_START = "[" + "".join(re.escape(c) for c in FORMULA_TRIGGERS) + "]"


def _csv_cell(value: object, *, raw: bool) -> object:
    if not isinstance(value, str):
        return value
    if "\0" in value:
        value = value.replace("\0", "")
    if not raw and value.startswith(FORMULA_TRIGGERS):
        return FORMULA_ESCAPE + value
    return value


def csv_safe(frame: pd.DataFrame, *, raw: bool = False) -> pd.DataFrame:
    """`frame` as it is written to CSV: NULs dropped from text cells and, unless `raw`, a text cell
    starting with = + - @ tab or CR prefixed with ' (numeric columns untouched)."""
    safe = frame.copy(deep=False)
    for position, dtype in enumerate(frame.dtypes):
        column = frame.iloc[:, position]
        if isinstance(dtype, pd.StringDtype) and not _needs_cell_pass(column, raw=raw):
            # The common case, found by vectorized string tests: no cell to change.
            safe.isetitem(position, column.to_numpy(dtype=object))
        elif _text_only(column) and not _needs_cell_pass(column, raw=raw):
            continue  # an object column of text and missing cells (the writer's own), none to change
        elif pd.api.types.is_object_dtype(dtype) or isinstance(dtype, pd.StringDtype):
            cells = np.empty(len(column), dtype=object)
            cells[:] = [_csv_cell(value, raw=raw) for value in column.to_numpy(dtype=object)]
            safe.isetitem(position, cells)
    return safe


def _text_only(column: pd.Series[Any]) -> bool:
    """An object column whose cells are all text or missing (told in C, without a pass in Python)."""
    return pd.api.types.is_object_dtype(column.dtype) and pd.api.types.infer_dtype(column, skipna=True) in (
        "string",
        "empty",
    )


def _needs_cell_pass(column: pd.Series[Any], *, raw: bool) -> bool:
    """Whether a text column holds a NUL or (unless `raw`) a cell starting with a formula trigger."""
    if isinstance(column.dtype, pd.StringDtype):
        if column.str.contains("\0", regex=False, na=False).any():
            return True
        return not raw and bool(column.str.match(_FORMULA_START, na=False).any())
    # An object column of text (`_text_only`): tested in Arrow, 4x faster than pandas' `.str` on objects.
    text = pa.array(column.to_numpy(dtype=object), type=pa.string(), from_pandas=True)
    if pc.any(pc.match_substring(text, "\0")).as_py():
        return True
    return not raw and bool(pc.any(pc.match_substring_regex(text, "^" + _FORMULA_START)).as_py())


class FileSink:
    """Appends frames to a local temporary file; `commit` moves it to the destination in one step.

    CSV is written spreadsheet-safe unless `raw_csv` (see the module's docstring). The temporary file
    is made in `scratch_dir` (the run's workspace, removed with it even after kill -9), else in the
    system's temp directory; it is 0600 either way.
    """

    def __init__(
        self,
        destination: str,
        fmt: str,
        *,
        raw_csv: bool = False,
        scratch_dir: Path | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.destination = destination
        self.storage_options = dict(storage_options or {})
        self.fmt = fmt
        self.raw_csv = raw_csv
        handle, name = tempfile.mkstemp(prefix="cleanlist-", suffix=f".{fmt}.partial", dir=scratch_dir)
        os.close(handle)
        self._tmp = Path(name)
        self._rows = 0
        self._parquet: pq.ParquetWriter | None = None
        self._schema: pa.Schema | None = None

    @property
    def wants_keys(self) -> bool:
        return False

    def write(self, frame: pd.DataFrame) -> None:
        if frame.empty:
            return
        try:
            self._append(frame)
        except OSError as exc:  # the scratch disk is full: name what was being written, and where
            raise write_failed(exc, self._tmp, what=f"the temporary copy of {self.destination} at") from None
        self._rows += len(frame)

    def _append(self, frame: pd.DataFrame) -> None:
        if self.fmt == "csv":
            csv_safe(frame, raw=self.raw_csv).to_csv(
                self._tmp, mode="a", header=self._rows == 0, index=False, lineterminator=CSV_LINE_TERMINATOR
            )
        elif self.fmt == "jsonl":
            with self._tmp.open("a", encoding="utf-8") as out:
                out.write(frame.to_json(orient="records", lines=True, force_ascii=False, date_format="iso"))
                if not frame.empty:
                    out.write("\n")
        else:
            self._write_parquet(frame)

    def _write_parquet(self, frame: pd.DataFrame) -> None:
        table = pa.Table.from_pandas(frame, preserve_index=False)
        if self._schema is None:
            # A column that is empty in the first batch has no type yet: call it a string.
            fields = [pa.field(f.name, pa.string()) if pa.types.is_null(f.type) else f for f in table.schema]
            self._schema = pa.schema(fields)
            self._parquet = pq.ParquetWriter(self._tmp, self._schema, compression="zstd")
        try:
            table = table.cast(self._schema)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
            table = pa.Table.from_pandas(frame.astype("string"), preserve_index=False).cast(self._schema)
        assert self._parquet is not None
        self._parquet.write_table(table)

    def commit(self, columns: Sequence[str]) -> None:
        try:
            self._finish(columns)
        except OSError as exc:
            raise write_failed(exc, self._tmp, what=f"the temporary copy of {self.destination} at") from None
        _move_into_place(self._tmp, self.destination, self.storage_options)

    def _finish(self, columns: Sequence[str]) -> None:
        if self._rows == 0:
            empty = pd.DataFrame({c: pd.Series(dtype="string") for c in columns})
            if self.fmt == "csv":
                empty.to_csv(self._tmp, index=False, lineterminator=CSV_LINE_TERMINATOR)
            elif self.fmt == "parquet":
                pq.write_table(pa.Table.from_pandas(empty, preserve_index=False), self._tmp)
            else:
                self._tmp.write_text("", encoding="utf-8")
        if self._parquet is not None:
            self._parquet.close()
            self._parquet = None

    def abort(self) -> None:
        if self._parquet is not None:
            with contextlib.suppress(
                OSError
            ):  # its file is removed next: what it could not flush is not wanted
                self._parquet.close()
            self._parquet = None
        self._tmp.unlink(missing_ok=True)


def _move_into_place(tmp: Path, destination: str, storage_options: Mapping[str, Any] | None = None) -> None:
    fs, path = fsspec.core.url_to_fs(destination)
    local = fs.protocol in ("file", ("file", "local")) or "file" in fs.protocol
    if not local and storage_options:  # s3fs's key/secret/endpoint_url…: never for the local disk
        fs, path = fsspec.core.url_to_fs(destination, **storage_options)
    if local:
        target = Path(path)
        make_private_dirs(target.parent)
        staging = target.with_name(f".{target.name}.partial")
        # The staging file becomes the destination (os.replace keeps its inode, so its mode): 0600, even
        # when a staging file of an interrupted run is still there with another mode.
        try:
            with os.fdopen(os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
                os.fchmod(out.fileno(), 0o600)
                with tmp.open("rb") as src:
                    shutil.copyfileobj(src, out, 1024 * 1024)
            os.replace(staging, target)
        except OSError as exc:
            # A full disk keeps the half-copied staging file otherwise: the next run would find no room
            # either. The destination itself is untouched (an earlier output of that name stays whole).
            staging.unlink(missing_ok=True)
            raise write_failed(exc, target) from None
    else:
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        if parent:
            fs.makedirs(parent, exist_ok=True)
        remote_staging = f"{path}.partial"
        fs.put_file(str(tmp), remote_staging)
        fs.mv(remote_staging, path)
    tmp.unlink(missing_ok=True)


def _file_sinks(fmt: str) -> SinkKind:
    def open_pair(output: str, rejects: str, options: SinkOptions) -> tuple[RowSink, RowSink]:
        def sink(destination: str, kind: str) -> FileSink:
            return FileSink(
                destination,
                kind,
                raw_csv=options.raw_csv,
                scratch_dir=options.scratch_dir,
                storage_options=options.storage_options,
            )

        return sink(output, fmt), sink(rejects, "csv")

    return SinkKind(name=fmt, open_pair=open_pair, extensions=(f".{fmt}",))


CSV_SINK = _file_sinks("csv")
PARQUET_SINK = _file_sinks("parquet")
JSONL_SINK = _file_sinks("jsonl")
