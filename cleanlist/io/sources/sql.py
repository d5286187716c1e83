"""SQL query sources: a SQLite or PostgreSQL URL and a query, streamed in batches (a cursor mark pushed
into the query when the column type allows)."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from collections.abc import Generator
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from cleanlist.errors import InputError
from cleanlist.io.cursor import CursorFilter, sql_column_type, sql_past_mark
from cleanlist.io.sources.base import (
    STRING_DTYPE,
    QuerySource,
    SourceBatch,
    _cursor_batch,
    _first_line,
    _unique_names,
)
from cleanlist.io.sources.parquet import _frame_without_nul
from cleanlist.io.sources.text import logger
from cleanlist.vocab import CursorKind


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


SQL = QuerySource(name="sql", schemes=("sqlite", "postgresql", "postgres"), read=_iter_sql)
