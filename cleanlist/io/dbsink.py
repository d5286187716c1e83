"""Writing a run's rows to a database table (SQLite or PostgreSQL), upserted so reruns are idempotent.

The output table holds one row per contact: rows are upserted on `cleanlist_contact_key` (ON CONFLICT
DO UPDATE), so a rerun — or a duplicate row of the same contact — updates instead of inserting again.
Rejects have no contact key; their table is keyed by a hash of the row's input values. Every column is
TEXT; columns that appear in a later source are added to an existing table. All of a run's rows are
written in one transaction, so a failed run leaves the table as it was.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from cleanlist.errors import InputError
from cleanlist.io.sink import RowSink, SinkKind, SinkOptions
from cleanlist.store.database import resolve_url

CONTACT_KEY = "cleanlist_contact_key"
ROW_HASH = "cleanlist_row_hash"


def row_hashes(frame: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    values = frame[list(columns)].astype("string").fillna("").itertuples(index=False, name=None)
    return [hashlib.sha256(json.dumps(v, ensure_ascii=False).encode()).hexdigest()[:32] for v in values]


class SharedTransaction:
    """One connection and transaction for the output table and its rejects table: both land or neither."""

    def __init__(self, url: str, members: int) -> None:
        self.url = resolve_url(url)
        self._engine = sa.create_engine(self.url)
        self._conn: sa.Connection | None = None
        self._txn: sa.RootTransaction | None = None
        self._pending = members

    @property
    def conn(self) -> sa.Connection:
        if self._conn is None:
            self._conn = self._engine.connect()
            self._txn = self._conn.begin()
        return self._conn

    def member_done(self) -> None:
        self._pending -= 1
        if self._pending == 0:
            self.conn  # noqa: B018 - open it if nobody wrote, so empty tables get created and committed
            assert self._txn is not None
            self._txn.commit()
            self.close()

    def abort(self) -> None:
        if self._txn is not None and self._txn.is_active:
            self._txn.rollback()
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._engine.dispose()


class DatabaseSink:
    """Upserts frames into `table`; `kind` "output" keys on the contact key, "rejects" on a row hash."""

    @property
    def wants_keys(self) -> bool:
        return True

    def __init__(self, transaction: SharedTransaction, table: str, *, kind: str = "output") -> None:
        if not table or not table.replace("_", "").isalnum():
            raise InputError(f"table name {table!r} must be letters, digits and underscores")
        self._txn = transaction
        self.url = transaction.url
        self.table_name = table
        self.key = CONTACT_KEY if kind == "output" else ROW_HASH
        self._table: sa.Table | None = None

    @property
    def _conn(self) -> sa.Connection:
        return self._txn.conn

    def _prepare(self, columns: Sequence[str]) -> sa.Table:
        if self._conn.dialect.name == "postgresql":
            # Backfill shards write one table at once: serialize CREATE/ALTER (held until commit).
            self._conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:t))"), {"t": self.table_name})
        metadata = sa.MetaData()
        inspector = sa.inspect(self._conn)
        if not inspector.has_table(self.table_name):
            table = sa.Table(
                self.table_name,
                metadata,
                sa.Column(self.key, sa.Text, primary_key=True),
                *[sa.Column(c, sa.Text) for c in columns if c != self.key],
            )
            table.create(self._conn)
            return table
        existing = {c["name"] for c in inspector.get_columns(self.table_name)}
        if self.key not in existing:
            raise InputError(
                f"table {self.table_name!r} exists without a {self.key} column; choose another --table"
            )
        quote = self._conn.dialect.identifier_preparer.quote
        for column in columns:
            if column not in existing:
                self._conn.execute(
                    sa.text(f"ALTER TABLE {quote(self.table_name)} ADD COLUMN {quote(column)} TEXT")
                )
        return sa.Table(self.table_name, metadata, autoload_with=self._conn)

    def write(self, frame: pd.DataFrame) -> None:
        if frame.empty:
            return
        frame = frame.copy()
        if self.key == ROW_HASH:
            frame[ROW_HASH] = row_hashes(frame, [c for c in frame.columns if c != ROW_HASH])
        frame = frame.astype("string").astype(object).where(frame.notna(), None)
        # One statement must not touch a key twice (PostgreSQL refuses); the last row of a contact wins.
        frame = frame.drop_duplicates(subset=[self.key], keep="last")
        if self._table is None:
            self._table = self._prepare(list(frame.columns))
        records = frame.to_dict(orient="records")
        dialect = postgresql if self.url.get_backend_name() == "postgresql" else sqlite
        for start in range(0, len(records), 2000):
            batch = records[start : start + 2000]
            stmt = dialect.insert(self._table).values(batch)
            updates = {c: stmt.excluded[c] for c in frame.columns if c != self.key}
            stmt = stmt.on_conflict_do_update(index_elements=[self.key], set_=updates)
            self._conn.execute(stmt)

    def commit(self, columns: Sequence[str]) -> None:
        if self._table is None:
            self._table = self._prepare([*columns, self.key])
        self._txn.member_done()

    def abort(self) -> None:
        self._txn.abort()


def _open_tables(output: str, rejects: str, options: SinkOptions) -> tuple[RowSink, RowSink]:
    """The output table `options.table` and the rejects table `rejects`, in one transaction."""
    assert options.table is not None
    transaction = SharedTransaction(output, members=2)
    return DatabaseSink(transaction, options.table), DatabaseSink(transaction, rejects, kind="rejects")


DATABASE_SINK = SinkKind(
    name="database", open_pair=_open_tables, schemes=("sqlite", "postgresql", "postgres")
)
