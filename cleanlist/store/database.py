"""Opening the store's database: URL rules, engine settings per backend, and the schema check."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Final

from sqlalchemy import Connection, Engine, create_engine, event, insert, select, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import ConnectionPoolEntry

from cleanlist.dburl import display_url, to_sqlalchemy_url
from cleanlist.errors import InputError
from cleanlist.store.schema import SCHEMA_COMPONENT, SCHEMA_VERSION, metadata, schema_info

DEFAULT_STORE_PATH: Final = Path("~/.cleanlist/store.db")
SQLITE_BUSY_TIMEOUT_SECONDS: Final = 30.0
# Execution option naming the kind of transaction, which SQLite opens accordingly (see _begin):
# "read", "write", or "durable" (a write that must survive a power cut: the ledger of spent money).
TRANSACTION_OPTION: Final = "cleanlist_transaction"
# Any constant works; it only has to be the same in every process that creates the schema.
_SCHEMA_LOCK_ID: Final = 0x636C_6E6C_7374  # "clnlst"


def resolve_url(url: str | None) -> URL:
    """The SQLAlchemy URL to open: the default SQLite file, or `url` with PostgreSQL bound to psycopg 3."""
    if url is None:
        path = DEFAULT_STORE_PATH.expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return URL.create("sqlite", database=str(path))
    parsed = to_sqlalchemy_url(url, what="store URL")
    if parsed.get_backend_name() != "sqlite":
        return parsed
    if parsed.database in (None, "", ":memory:") or (parsed.database or "").startswith("file::memory:"):
        raise InputError(
            "store URL points at an in-memory SQLite database; give a file path (sqlite:///path)"
        )
    path = Path(parsed.database or "").expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    return parsed.set(database=str(path))


def open_engine(url: URL) -> Engine:
    """An engine for `url`: SQLite in WAL mode with our own BEGIN, PostgreSQL with connection checks."""
    if url.get_backend_name() == "sqlite":
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_SECONDS},
        )
        event.listen(engine, "connect", _configure_sqlite)
        event.listen(engine, "begin", _begin)
        return engine
    # Workers sleep between nightly runs; a checked connection beats a dead one from the pool.
    return create_engine(url, pool_pre_ping=True)


def ensure_schema(writer: Engine) -> None:
    """Create the tables on first use; refuse a store written by a newer schema version."""
    display = display_url(writer.url)
    try:
        with writer.begin() as conn:
            if conn.dialect.name == "postgresql":
                # Two workers starting on an empty database would otherwise race on CREATE TABLE.
                conn.execute(text("SELECT pg_advisory_xact_lock(:lock_id)"), {"lock_id": _SCHEMA_LOCK_ID})
            schema_info.create(conn, checkfirst=True)
            found = conn.execute(
                select(schema_info.c.version).where(schema_info.c.component == SCHEMA_COMPONENT)
            ).scalar_one_or_none()
            if found is not None and found > SCHEMA_VERSION:
                raise InputError(
                    f"store at {display} has schema version {found}, newer than {SCHEMA_VERSION} "
                    "that this cleanlist understands: upgrade cleanlist"
                )
            metadata.create_all(conn, checkfirst=True)
            if found is None:
                conn.execute(insert(schema_info).values(component=SCHEMA_COMPONENT, version=SCHEMA_VERSION))
    except DBAPIError as exc:
        raise InputError(f"cannot open the store at {display}: {describe(exc, writer.url)}") from None


def describe(exc: DBAPIError, url: URL) -> str:
    """The driver's own first line of an error, with the URL's password scrubbed just in case."""
    lines = str(exc.orig).strip().splitlines() or [type(exc.orig).__name__]
    message = lines[0]
    if url.password:
        message = message.replace(str(url.password), "***")
    return message


def _configure_sqlite(dbapi_connection: sqlite3.Connection, _record: ConnectionPoolEntry) -> None:
    # sqlite3 would open transactions lazily and only before writes; _begin opens them instead.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_SECONDS * 1000)}")
    finally:
        cursor.close()


def _begin(conn: Connection) -> None:
    kind = conn.get_execution_options().get(TRANSACTION_OPTION, "read")
    if kind == "read":
        conn.exec_driver_sql("BEGIN")
        return
    # In WAL mode NORMAL survives a killed process; only a power cut may undo the last commits. That is
    # acceptable for claims and results (a rerun claims or polls again) but not for an accepted
    # workflow, whose loss means paying twice: those commits fsync (and flush every earlier one too).
    conn.exec_driver_sql(f"PRAGMA synchronous={'FULL' if kind == 'durable' else 'NORMAL'}")
    # IMMEDIATE takes the write lock up front, so a read-then-write transaction (claim) can neither
    # interleave with another writer nor fail halfway with SQLITE_BUSY on lock upgrade.
    conn.exec_driver_sql("BEGIN IMMEDIATE")
