"""Parquet sources: .parquet .pq, read by row groups in batches."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from cleanlist.errors import InputError
from cleanlist.io.sources.base import (
    _PANDAS_INDEX_COLUMN,
    READ_BLOCK_BYTES,
    Opener,
    SourceBatch,
    SourceFormat,
    _first_line,
    _unique_names,
)


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


PARQUET = SourceFormat(
    name="parquet",
    extensions=(".parquet", ".pq"),
    read=lambda r: _iter_parquet(r.open_source, r.shown, r.batch_rows),
)
