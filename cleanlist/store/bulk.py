"""Statements at driver speed: the per-contact writes of million-contact backfills, and the few
statements every request runs (the rate book's).

SQLAlchemy checks and converts every parameter of every row of an executemany; for a 250-row chunk that
costs about twice the database's own work. Building a statement, keying its compiled form and setting up
its execution cost ~0.1 ms each time, several times a request. These statements are built once from Core
(module level, or one per count of an IN list), compiled once per backend, and fed values the driver
takes as they are (strings, numbers, booleans, None, `db_time`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, CursorResult
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

from cleanlist.store.schema import UtcDateTime

_TIME = UtcDateTime()


@functools.lru_cache(maxsize=256)
def _compiled(statement: ClauseElement, dialect: Dialect) -> SQLCompiler:
    """`statement` compiled for `dialect` (a few module-level statements per engine: a bounded cache)."""
    fresh = statement.compile(dialect=dialect)
    if not isinstance(fresh, SQLCompiler):
        raise TypeError(f"not a SQL statement: {statement!r}")
    return fresh


def execute_rows(conn: Connection, statement: ClauseElement, rows: Sequence[Mapping[str, Any]]) -> None:
    """Run a module-level statement whose every parameter is a named bindparam, once per row."""
    if not rows:
        return
    compiled = _compiled(statement, conn.dialect)
    names = compiled.positiontup
    if names is None:
        conn.exec_driver_sql(compiled.string, list(rows))
    else:
        conn.exec_driver_sql(compiled.string, [tuple(row[name] for name in names) for row in rows])


def execute_one(conn: Connection, statement: ClauseElement, params: Mapping[str, Any]) -> CursorResult[Any]:
    """Run a statement built once (every parameter a named bindparam) with one set of values; rows come
    back as the driver reads them (no result processing)."""
    compiled = _compiled(statement, conn.dialect)
    names = compiled.positiontup
    if names is None:
        return conn.exec_driver_sql(compiled.string, dict(params))
    return conn.exec_driver_sql(compiled.string, tuple(params[name] for name in names))


def db_time(conn: Connection, value: datetime) -> Any:
    """A datetime as this backend's driver stores it (what UtcDateTime would bind)."""
    return _TIME.process_bind_param(value, conn.dialect)
