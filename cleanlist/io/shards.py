"""Splitting a large source into shards for backfills: files under `<output>/_shards/`, SQL windows.

Plain functions used by the `backfill-contacts` flow.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cleanlist.errors import InputError
from cleanlist.io.location import display_source
from cleanlist.io.sources import SourceBatch, iter_source

SHARD_DIR_NAME = "_shards"
SHARD_PATTERN = re.compile(r"^shard-(\d{5,})(\..+)?$")
SHARD_METRICS = ("rows_read", "rejected", "submitted", "emails_found", "phones_found", "credits_spent")
OutputFormat = Literal["csv", "parquet", "jsonl"]


@dataclass(frozen=True)
class Shard:
    """One slice of the source, staged as Parquet where every worker can read it."""

    number: int
    path: str
    rows: int
    unparsed: int
    origin: str

    @property
    def name(self) -> str:
        return shard_name(self.number)


def shard_name(number: int) -> str:
    return f"shard-{number:05d}"


def _parse_moment(text: str, name: str) -> dt.date | dt.datetime:
    value = str(text).strip()
    try:
        if len(value) == 10:
            return dt.date.fromisoformat(value)
        return dt.datetime.fromisoformat(value)
    except ValueError:
        raise InputError(f"{name} {text!r} is not an ISO date or datetime (e.g. 2024-01-31)") from None


def sql_windows(
    window_start: str | None, window_end: str | None, window_days: float | None
) -> list[tuple[dt.date | dt.datetime, dt.date | dt.datetime]] | None:
    """Half-open sub-windows [start, end) covering [window_start, window_end), `window_days` long each."""
    if window_start is None and window_end is None:
        if window_days is not None:
            raise InputError("window_days needs window_start and window_end")
        return None
    if window_start is None or window_end is None:
        raise InputError("give both window_start and window_end (the query binds :window_start/:window_end)")
    start = _parse_moment(window_start, "window_start")
    end = _parse_moment(window_end, "window_end")
    whole_days = window_days is None or float(window_days).is_integer()
    if isinstance(start, dt.datetime) != isinstance(end, dt.datetime) or not whole_days:
        start, end = _as_datetime(start), _as_datetime(end)
    if not end > start:
        raise InputError(f"window_end {window_end} must be after window_start {window_start}")
    if window_days is None:
        return [(start, end)]
    if not window_days > 0:
        raise InputError(f"window_days must be > 0, got {window_days}")
    step = dt.timedelta(days=float(window_days))
    windows = []
    low = start
    while low < end:
        high = min(low + step, end)
        windows.append((low, high))
        low = high
    return windows


def _as_datetime(value: dt.date | dt.datetime) -> dt.datetime:
    return value if isinstance(value, dt.datetime) else dt.datetime.combine(value, dt.time())


def absolute_location(location: str) -> str:
    """Local paths made absolute (children run in another working directory); URLs as given."""
    return location if "://" in location else os.path.abspath(os.path.expanduser(location))


def join_location(directory: str, name: str) -> str:
    return f"{directory.rstrip('/')}/{name}"


def _write_atomically(path: str, write: Any) -> None:
    fs, fs_path = fsspec.core.url_to_fs(path)
    parent = fs_path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    staging = f"{fs_path}.partial"
    with fs.open(staging, "wb") as handle:
        write(handle)
    fs.mv(staging, fs_path)


def _frame_to_parquet(frame: pd.DataFrame, path: str) -> None:
    try:
        table = pa.Table.from_pandas(frame, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        # A database column mixing types: keep every value, as text.
        table = pa.Table.from_pandas(frame.astype("string"), preserve_index=False)
    _write_atomically(path, lambda handle: pq.write_table(table, handle, compression="zstd"))


def _unparsed_to_csv(batch: SourceBatch, path: str) -> None:
    rows = [
        {**row.values, "source_row": row.row_number, "reject_reason": row.reason} for row in batch.bad_rows
    ]
    frame = pd.DataFrame(rows, columns=[*batch.frame.columns, "source_row", "reject_reason"])
    _write_atomically(path, lambda handle: handle.write(frame.to_csv(index=False).encode("utf-8")))


def _source_files(source: str) -> list[str]:
    """The files a glob matches, in name order; a plain path or URL is itself."""
    if not any(ch in source for ch in "*?["):
        return [source]
    fs, pattern = fsspec.core.url_to_fs(source)
    matches = sorted(path for path in fs.glob(pattern) if not fs.isdir(path))
    if not matches:
        raise InputError(f"no file matches {display_source(source)!r}")
    return matches if "://" not in source else [fs.unstrip_protocol(path) for path in matches]


def _sql_frames(url: str, query: str, params: dict[str, Any], batch_rows: int) -> Iterator[pd.DataFrame]:
    """Rows of `query` with bound parameters, `batch_rows` at a time (server-side cursor)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import SQLAlchemyError

    from cleanlist.dburl import display_url, to_sqlalchemy_url

    parsed = to_sqlalchemy_url(url, what="the SQL source")
    shown = display_url(parsed)
    engine = create_engine(parsed)
    try:
        with engine.connect() as conn:
            result = conn.execution_options(stream_results=True, max_row_buffer=batch_rows).execute(
                text(query), params
            )
            columns = list(result.keys())
            for part in result.partitions(batch_rows):
                yield pd.DataFrame(part, columns=columns)
    except SQLAlchemyError as exc:
        message = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        if parsed.password:
            message = message.replace(str(parsed.password), "***")
        raise InputError(f"SQL query failed on {shown}: {message}") from None
    finally:
        engine.dispose()


def split_source(
    source: str,
    shard_dir: str,
    unparsed_dir: str,
    *,
    shard_rows: int,
    sql_query: str | None = None,
    windows: list[tuple[Any, Any]] | None = None,
) -> list[Shard]:
    """Stage `source` as Parquet shards of at most `shard_rows` input rows, numbered in source order.

    A file or each file of a glob is cut every `shard_rows` rows (a shard never spans two files, whose
    columns may differ); a SQL query runs once per window and each window is cut the same way. Rows the
    parser could not read go to `<unparsed_dir>/shard-NNNNN.unparsed.csv`, counted in the shard's rows.
    Stale shard files of an earlier, longer split are removed.
    """
    if shard_rows < 1:
        raise InputError(f"shard_rows must be at least 1, got {shard_rows}")
    shards: list[Shard] = []

    def add(frame: pd.DataFrame, batch: SourceBatch | None, origin: str) -> None:
        number = len(shards)
        path = join_location(shard_dir, f"{shard_name(number)}.parquet")
        _frame_to_parquet(frame, path)
        unparsed = len(batch.bad_rows) if batch is not None else 0
        unparsed_path = join_location(unparsed_dir, f"{shard_name(number)}.unparsed.csv")
        if batch is not None and batch.bad_rows:
            _unparsed_to_csv(batch, unparsed_path)
        else:
            _remove(unparsed_path)  # an earlier run's file for this shard number would double rows
        rows = batch.end_row - batch.first_row if batch is not None else len(frame)
        shards.append(Shard(number, path, rows, unparsed, origin))

    if sql_query is not None:
        if windows is not None and not (":window_start" in sql_query and ":window_end" in sql_query):
            raise InputError("with a window the query must use :window_start and :window_end")
        for low, high in windows or [(None, None)]:
            params = {} if low is None else {"window_start": low, "window_end": high}
            origin = "query" if low is None else f"window {low} .. {high}"
            for frame in _sql_frames(source, sql_query, params, shard_rows):
                if len(frame):
                    add(frame, None, origin)
    else:
        for path in _source_files(source):
            for batch in iter_source(path, batch_rows=shard_rows):
                if batch.end_row > batch.first_row:
                    add(
                        batch.frame,
                        batch,
                        f"{display_source(path)} rows {batch.first_row}..{batch.end_row - 1}",
                    )
    remove_stale(shard_dir, len(shards), suffixes=(".parquet",))
    remove_stale(unparsed_dir, len(shards), suffixes=(".unparsed.csv",))
    return shards


def _remove(path: str) -> None:
    fs, fs_path = fsspec.core.url_to_fs(path)
    if fs.exists(fs_path):
        fs.rm(fs_path)


def remove_stale(directory: str, keep: int, *, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """Delete `shard-NNNNN*` files numbered `keep` or above (left by an earlier, longer split)."""
    fs, root = fsspec.core.url_to_fs(directory)
    if not fs.exists(root):
        return []
    removed = []
    for path in fs.ls(root, detail=False):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        match = SHARD_PATTERN.match(name)
        if match is None or int(match.group(1)) < keep:
            continue
        if suffixes is not None and not name.endswith(suffixes):
            continue
        fs.rm(path)
        removed.append(name)
    return removed
