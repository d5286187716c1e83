"""One statement over many rows at driver speed: the per-contact writes of million-contact backfills."""

# SQLAlchemy checks and converts every parameter of every row of an executemany; for a 250-row chunk
# that costs about twice the database's own work. These statements are built once from Core, compiled
# once per backend, and fed rows the driver takes as they are (strings, numbers, None, `db_time`).

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

from cleanlist.store.schema import UtcDateTime

_TIME = UtcDateTime()


@functools.lru_cache(maxsize=64)
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


def db_time(conn: Connection, value: datetime) -> Any:
    """A datetime as this backend's driver stores it (what UtcDateTime would bind)."""
    return _TIME.process_bind_param(value, conn.dialect)
