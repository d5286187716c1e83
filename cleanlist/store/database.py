"""Opening the store's database: URL rules, engine settings per backend, and the schema check."""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from sqlalchemy import Connection, Engine, create_engine, event, insert, select, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.pool import ConnectionPoolEntry

from cleanlist.dburl import display_url, to_sqlalchemy_url
from cleanlist.errors import InputError
from cleanlist.store.migrations import upgrade
from cleanlist.store.schema import SCHEMA_COMPONENT, SCHEMA_VERSION, metadata, schema_info

DEFAULT_STORE_PATH: Final = Path("~/.cleanlist/store.db")
SQLITE_BUSY_TIMEOUT_SECONDS: Final = 30.0
# Execution option naming the kind of transaction, which SQLite opens accordingly (see _begin):
# "read", "write", or "durable" (a write that must survive a power cut: the ledger of spent money).
TRANSACTION_OPTION: Final = "cleanlist_transaction"
# Any constant works; it only has to be the same in every process that creates the schema.
_SCHEMA_LOCK_ID: Final = 0x636C_6E6C_7374  # "clnlst"


# The files SQLite keeps beside a database (WAL mode, rollback journal); they hold the same personal data.
_SQLITE_SIDE_FILES: Final = ("-wal", "-shm", "-journal")


def resolve_url(url: str | None) -> URL:
    """The SQLAlchemy URL to open: the default SQLite file, or `url` with PostgreSQL bound to psycopg 3.

    A SQLite store holds personal data: a directory created for it is 0700 and a file created for it
    0600 (SQLite gives its -wal and -shm files the database file's mode). An existing file keeps its
    mode, except the default store, which is tightened to owner-only (never opened up).
    """
    if url is None:
        path = DEFAULT_STORE_PATH.expanduser()
        _prepare_sqlite_file(path)
        _tighten(path)
        return URL.create("sqlite", database=str(path))
    parsed = to_sqlalchemy_url(url, what="store URL")
    if parsed.get_backend_name() != "sqlite":
        return parsed
    if parsed.database in (None, "", ":memory:") or (parsed.database or "").startswith("file::memory:"):
        raise InputError(
            "store URL points at an in-memory SQLite database; give a file path (sqlite:///path)"
        )
    database = parsed.database or ""
    path = Path(database).expanduser()
    if database.startswith("file:"):  # an SQLite URI (…?uri=true): SQLite parses it, not us
        path.parent.mkdir(parents=True, exist_ok=True)
    else:
        _prepare_sqlite_file(path)
    return parsed.set(database=str(path))


def make_private_dirs(directory: Path) -> None:
    """Create `directory` and its missing parents owner-only (0700); existing ones are left as they are.

    (`Path.mkdir(parents=True, mode=…)` gives the parents it creates the default mode.) Raises OSError
    when a component is not a directory or cannot be created.
    """
    missing: list[Path] = []
    current = directory
    while not current.is_dir():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            if not path.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, f"{path} is not a directory", str(path)) from None
            continue  # made by someone else meanwhile: theirs, left alone
        os.chmod(path, 0o700)  # exactly 0700, whatever the umask


def _prepare_sqlite_file(path: Path) -> None:
    """Create the store's directories 0700 and its file 0600 (empty: an empty file is an empty SQLite
    database) unless they exist; one InputError line when they cannot be."""
    try:
        make_private_dirs(path.parent)
        if not path.exists():
            with contextlib.suppress(FileExistsError):  # created by another process meanwhile
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        raise InputError(f"cannot create the store at {path}: {exc.strerror or exc}") from None


def _tighten(path: Path) -> None:
    """Take group and other permissions off the default store's files (never add any)."""
    for name in (path, *(path.with_name(path.name + side) for side in _SQLITE_SIDE_FILES)):
        try:
            mode = stat.S_IMODE(name.stat().st_mode)
            if mode & 0o077:
                os.chmod(name, mode & 0o700)
        except FileNotFoundError:
            continue


def open_engine(url: URL) -> Engine:
    """An engine for `url`: SQLite in WAL mode with our own BEGIN, PostgreSQL with connection checks."""
    if url.get_backend_name() == "sqlite":
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_SECONDS},
            # The connection used last goes out next: SQLite drops a connection's page cache whenever
            # another connection of the store wrote, so rotating through the pool re-read most pages.
            pool_use_lifo=True,
        )
        event.listen(engine, "connect", _configure_sqlite)
        event.listen(engine, "begin", _begin)
        return engine
    # Workers sleep between nightly runs; a checked connection beats a dead one from the pool.
    return create_engine(url, pool_pre_ping=True)


def ensure_schema(writer: Engine) -> None:
    """Create the tables on first use, migrate an older store; refuse one of a newer schema version."""
    display = display_url(writer.url)
    try:
        with writer.connect() as conn, _schema_lock(conn):
            with conn.begin():
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
                    conn.execute(
                        insert(schema_info).values(component=SCHEMA_COMPONENT, version=SCHEMA_VERSION)
                    )
            if found is not None and found < SCHEMA_VERSION:
                # In batches, one write transaction each (SQLite: BEGIN IMMEDIATE); the version moves
                # only once a step is complete, so a killed migration runs again on the next open.
                upgrade(conn, found)
    except DBAPIError as exc:
        raise InputError(f"cannot open the store at {display}: {describe(exc, writer.url)}") from None


@contextlib.contextmanager
def _schema_lock(conn: Connection) -> Iterator[None]:
    """On PostgreSQL, hold the schema's advisory lock for the session: creating tables and migrating
    (many transactions) happen in one process at a time; the others wait, then find the work done.

    SQLite needs none: each step takes the write lock, and a migration repeated by a second process
    finds nothing left to do.
    """
    if conn.dialect.name != "postgresql":
        yield
        return
    conn.execute(text("SELECT pg_advisory_lock(:lock_id)"), {"lock_id": _SCHEMA_LOCK_ID})
    conn.commit()
    try:
        yield
    finally:
        try:
            conn.rollback()
            conn.execute(text("SELECT pg_advisory_unlock(:lock_id)"), {"lock_id": _SCHEMA_LOCK_ID})
            conn.commit()
        except SQLAlchemyError:
            # A session lock outlives its transactions: a connection that cannot say unlock is closed
            # rather than pooled (closing the session releases the lock).
            conn.invalidate()


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
        # Statement journals and sorts stay in memory: with the default they spill to temporary files in
        # /var/tmp (strace of a 40,000-contact run: 154 files of ~400 page writes each for 160 chunks).
        cursor.execute("PRAGMA temp_store=MEMORY")
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
