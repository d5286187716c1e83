"""The one place that writes a run's rows: output (files or a database table) and rejects.

Every input row is written exactly once: valid rows (duplicates included) to the output with the
`cleanlist_*` columns joined from the store by contact key, invalid and quarantined rows to rejects
with a reason. Files are written to a local temporary file first and moved into place at the end, so
the final files appear atomically.

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
import errno
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cleanlist.errors import InputError
from cleanlist.run.states import ContactState, RejectCode
from cleanlist.run.workspace import KEY, META_COLUMNS, REJECT, REJECT_CODE, ROW, RunWorkspace
from cleanlist.store import EnrichmentStore, StoredResult
from cleanlist.store.database import make_private_dirs

OUTPUT_FORMATS = {".csv": "csv", ".parquet": "parquet", ".jsonl": "jsonl"}
RESULT_COLUMNS = (
    "cleanlist_status",
    "cleanlist_email",
    "cleanlist_email_status",
    "cleanlist_other_emails",
    "cleanlist_phones",
    "cleanlist_workflow_id",
    "cleanlist_task_id",
    "cleanlist_enriched_at",
    "cleanlist_note",  # why a row has no result: the API's final word, an unresolved task, a failed chunk
)
REJECT_REASON = "reject_reason"
REJECT_CODE_COLUMN = "reject_code"
LIST_SEPARATOR = "; "
# CSV line ending: RFC 4180's CRLF. Python's csv module quotes a cell only for the line terminator's own
# characters, so with "\n" a cell holding a bare CR was written unquoted and read back as two rows.
CSV_LINE_TERMINATOR = "\r\n"
# The OWASP rule: a cell starting with one of these is a formula (or becomes one) in a spreadsheet.
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
FORMULA_ESCAPE = "'"

# cleanlist_status of a row whose contact has no stored result, by what happened to it in this run.
STATUS_FOR_STATE = {
    ContactState.ACCEPTED: "pending",
    ContactState.IN_FLIGHT: "pending",
    ContactState.UNRESOLVED: "unresolved",
    ContactState.HELD: "pending",
    ContactState.PLANNED: "not_submitted",
    ContactState.NEW: "not_submitted",
    ContactState.NOT_SUBMITTED: "not_submitted",
    ContactState.SKIPPED_BUDGET: "skipped_budget",
    ContactState.ERROR: "error",
}
# States whose stored result (if any) is not this run's answer: the row shows the state instead. (An
# old result of a contact sent again for a refresh is not its answer: the row says pending.)
UNANSWERED = frozenset(
    {
        ContactState.ACCEPTED,
        ContactState.UNRESOLVED,
        ContactState.PLANNED,
        ContactState.NEW,
        ContactState.NOT_SUBMITTED,
        ContactState.SKIPPED_BUDGET,
        ContactState.ERROR,
    }
)


def output_format(output: str) -> str:
    suffix = Path(output.split("?", 1)[0]).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise InputError(f"output {output!r} must end in .csv, .parquet or .jsonl (or be a database URL)")
    return OUTPUT_FORMATS[suffix]


# A full disk or quota: the user's fix is room on that disk, not a bug report.
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def write_failed(exc: OSError, path: str | Path, *, what: str = "writing") -> InputError:
    """One line for an OSError while writing `path` ("no space left on device writing /x/out.csv")."""
    if exc.errno in _NO_ROOM:
        reason = "no space left on device" if exc.errno != errno.EDQUOT else "disk quota exceeded"
        if exc.errno == errno.EFBIG:
            reason = "file too large for its file system"
    else:
        reason = (exc.strerror or type(exc).__name__).lower()
    return InputError(f"{reason} {what} {path}")


class RowSink(Protocol):
    def write(self, frame: pd.DataFrame) -> None: ...
    def commit(self, columns: Sequence[str]) -> None: ...
    def abort(self) -> None: ...


def local_path(destination: str) -> Path | None:
    """The absolute local path `destination` is written to, or None for a remote (fsspec) URL."""
    if "::" in destination:  # a chained fsspec URL (simplecache::s3://…)
        return None
    if "://" in destination:
        scheme = destination.split("://", 1)[0].lower()
        if scheme not in ("file", "local"):
            return None
    _fs, path = fsspec.core.url_to_fs(destination)  # expands ~, makes a relative path absolute
    return Path(path)


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
        if pd.api.types.is_object_dtype(dtype) or isinstance(dtype, pd.StringDtype):
            cells = frame.iloc[:, position].map(lambda value: _csv_cell(value, raw=raw))
            safe.isetitem(position, cells.to_numpy(dtype=object))
    return safe


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


@dataclass(frozen=True)
class WriteReport:
    output_rows: int
    rejected_rows: int
    statuses: dict[str, int]
    reject_reasons: dict[str, int]


def _join(value: Sequence[str]) -> str | None:
    return LIST_SEPARATOR.join(value) if value else None


def _result_columns(
    state: tuple[ContactState, str | None] | None, result: StoredResult | None
) -> tuple[object, ...]:
    state_name = state[0] if state else ContactState.NOT_SUBMITTED
    if result is not None and state_name not in UNANSWERED:
        if state_name is ContactState.FRESH:
            status = "cached"
        elif result.status.lower() == "completed":
            status = "enriched"
        elif result.status.lower() == "failed":
            status = "not_found"
        else:
            status = result.status.lower()
        return (
            status,
            result.primary_email,
            result.primary_email_status,
            _join(result.other_emails),
            _join(result.phones),
            result.workflow_id,
            result.task_id,
            result.enriched_at.isoformat() if result.enriched_at else None,
            None,
        )
    note = state[1] if state is not None else None
    return (
        STATUS_FOR_STATE.get(state_name, state_name.value),
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        note,
    )


def write_rows(
    workspace: RunWorkspace,
    store: EnrichmentStore,
    enrichment_type: str,
    output: RowSink,
    rejects: RowSink,
) -> WriteReport:
    """Join every staged row with its contact's outcome and write it to output or rejects."""
    statuses: dict[str, int] = {}
    reasons_seen: dict[str, int] = {}
    written = rejected = 0
    columns = list(workspace.columns)
    try:
        for part in workspace.parts():
            keys = [k for k in part[KEY].tolist() if isinstance(k, str)]
            states = workspace.states(keys)
            results = store.results(list(dict.fromkeys(keys)), enrichment_type)
            rejects_of_part: list[tuple[str, str] | None] = []  # (code, detail) of each rejected row
            values: list[tuple[object, ...]] = []
            for key, detail, code in zip(
                part[KEY].tolist(), part[REJECT].tolist(), part[REJECT_CODE].tolist(), strict=True
            ):
                if not isinstance(key, str):
                    known = code if isinstance(code, str) else RejectCode.UNPARSABLE.value
                    rejects_of_part.append((known, detail if isinstance(detail, str) else "invalid row"))
                    values.append(())
                    continue
                state = states.get(key)
                if state is not None and state[0] is ContactState.QUARANTINED:
                    rejects_of_part.append(
                        (RejectCode.REFUSED_BY_API.value, state[1] or "refused by the API")
                    )
                    values.append(())
                    continue
                rejects_of_part.append(None)
                row = _result_columns(state, results.get(key))
                statuses[str(row[0])] = statuses.get(str(row[0]), 0) + 1
                values.append(row)
            reasons = [r[1] if r is not None else None for r in rejects_of_part]
            is_reject = pd.Series([r is not None for r in reasons], index=part.index)
            bad = part.loc[is_reject, columns].copy()
            bad[REJECT_CODE_COLUMN] = [r[0] for r in rejects_of_part if r is not None]
            bad[REJECT_REASON] = [r[1] for r in rejects_of_part if r is not None]
            good = part.loc[~is_reject, columns].copy()
            if getattr(output, "wants_keys", False):
                good["cleanlist_contact_key"] = part.loc[~is_reject, KEY]
            kept = [v for v, r in zip(values, reasons, strict=True) if r is None]
            for i, name in enumerate(RESULT_COLUMNS):
                good[name] = pd.Series([v[i] for v in kept], index=good.index, dtype="object")
            output.write(good)
            rejects.write(bad)
            for code in bad[REJECT_CODE_COLUMN]:
                reasons_seen[code] = reasons_seen.get(code, 0) + 1
            written += len(good)
            rejected += len(bad)
        output.commit([*columns, *RESULT_COLUMNS])
        rejects.commit([*columns, REJECT_CODE_COLUMN, REJECT_REASON])
    except BaseException:
        output.abort()
        rejects.abort()
        raise
    return WriteReport(written, rejected, statuses, reasons_seen)


def open_sinks(
    output: str,
    rejects: str,
    table: str | None,
    *,
    raw_csv: bool = False,
    scratch_dir: Path | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> tuple[RowSink, RowSink]:
    """Sinks for the output and the rejects: files by extension, or with `table` two database tables.

    `raw_csv` turns off the spreadsheet-safe prefix of CSV files; `scratch_dir` holds their temporary
    files (default: the system's temp directory); `storage_options` go to fsspec for remote URLs. None
    of them applies to database tables.
    """
    if table is not None:
        from cleanlist.io.dbsink import DatabaseSink, SharedTransaction

        transaction = SharedTransaction(output, members=2)
        return DatabaseSink(transaction, table), DatabaseSink(transaction, rejects, kind="rejects")
    return (
        FileSink(
            output,
            output_format(output),
            raw_csv=raw_csv,
            scratch_dir=scratch_dir,
            storage_options=storage_options,
        ),
        FileSink(rejects, "csv", raw_csv=raw_csv, scratch_dir=scratch_dir, storage_options=storage_options),
    )


__all__ = [
    "META_COLUMNS",
    "ROW",
    "WriteReport",
    "csv_safe",
    "local_path",
    "open_sinks",
    "output_format",
    "write_rows",
]
