"""Incremental sources: `cursor` reads only rows past the last completed run's mark, `full_refresh` all."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa

from cleanlist.io.cursor import CursorFilter, CursorKind, Watermark, source_identity
from cleanlist.io.sources import iter_source
from cleanlist.store import EnrichmentStore
from cleanlist_prefect.deployments.cli import _flow_kwargs, build_parser
from tests.conftest import postgres_database
from tests.flow_helpers import read_csv, run_flow

CHUNK = 250  # contacts per bulk request: 300 rows are two chunks


def _rows(count: int, start: int = 0) -> list[dict[str, str]]:
    return [
        {
            "id": str(i),
            "first_name": f"Ann{i}",
            "last_name": f"Lee{i}",
            "company_domain": f"co{i}.example",
            "updated_at": f"2026-11-01T00:{i // 60:02d}:{i % 60:02d}",
        }
        for i in range(start, start + count)
    ]


def _write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


# ------------------------------------------------------------------------------------------ filtering


@pytest.mark.parametrize(
    ("values", "mark", "kept"),
    [
        (["1", "2", "10", "3"], Watermark(CursorKind.NUMBER, "2"), ["10", "3"]),  # numbers, not text order
        (
            ["2026-01-02", "2026-01-01T12:00", "2026-01-03"],
            Watermark(CursorKind.TIMESTAMP, "2026-01-02T00:00:00"),  # an old mark: no offset = UTC
            ["2026-01-03"],
        ),
        (
            [
                "2026-01-02T01:00:00+02:00",
                "2026-01-01T23:30:00-01:00",
            ],  # 2026-01-01T23:00Z, 2026-01-02T00:30Z
            Watermark(CursorKind.TIMESTAMP, "2026-01-02T00:00:00+00:00"),
            ["2026-01-01T23:30:00-01:00"],
        ),
        (["b", "a", "c"], Watermark(CursorKind.TEXT, "b"), ["c"]),
        ([None, "5", ""], Watermark(CursorKind.NUMBER, "7"), [None, ""]),  # no value: always read
    ],
)
def test_rows_past_the_mark_are_kept(values: list[Any], mark: Watermark, kept: list[Any]) -> None:
    frame = pd.DataFrame({"updated_at": pd.Series(values, dtype=object), "x": range(len(values))})
    cursor = CursorFilter("updated_at", after=mark)
    result = cursor.apply(frame).kept
    assert result["updated_at"].tolist() == kept
    assert cursor.skipped == len(values) - len(kept)


def test_the_new_mark_is_the_largest_value_read() -> None:
    cursor = CursorFilter("n")
    cursor.apply(pd.DataFrame({"n": ["9", "10", None]}))
    cursor.apply(pd.DataFrame({"n": ["2"]}))
    assert cursor.new_mark == Watermark(CursorKind.NUMBER, "10")
    stamps = CursorFilter("t")
    stamps.apply(
        pd.DataFrame({"t": pd.to_datetime(["2026-11-30 10:00:00.5", "2026-01-01"], format="ISO8601")})
    )
    assert stamps.new_mark == Watermark(CursorKind.TIMESTAMP, "2026-11-30T10:00:00.500000+00:00")
    assert stamps.new_mark.value() > Watermark(CursorKind.TIMESTAMP, "2026-11-30T10:00:00").value()


def test_a_missing_cursor_column_is_one_line(tmp_path: Path) -> None:
    from cleanlist.errors import InputError

    source = _write_csv(tmp_path / "crm.csv", _rows(3))
    with pytest.raises(InputError, match="the cursor column 'changed' is not in the source"):
        list(iter_source(source, cursor=CursorFilter("changed")))


def test_a_source_is_identified_without_its_password(tmp_path: Path) -> None:
    one, shown = source_identity("postgresql://u:hunter2@db/crm", "SELECT * FROM c", "updated_at")
    two, _ = source_identity("postgresql://u:other@db/crm", "SELECT * FROM c", "updated_at")
    assert one == two and "hunter2" not in shown
    assert source_identity("postgresql://u@db/crm", "SELECT * FROM c", "modified_at")[0] != one
    assert source_identity("crm.csv", None, "t")[0] != source_identity("other.csv", None, "t")[0]


def test_cli_flags() -> None:
    args = build_parser().parse_args(
        ["run", "in.csv", "-o", "out.csv", "--cursor", "updated_at", "--full-refresh"]
    )
    assert _flow_kwargs(args) == {
        "source": "in.csv",
        "output": "out.csv",
        "cursor": "updated_at",
        "full_refresh": True,
    }
    args = build_parser().parse_args(
        ["run", "in.csv", "-o", "o.csv", "--cursor", "n", "--cursor-type", "number"]
    )
    assert _flow_kwargs(args)["cursor_type"] == "number"


# ------------------------------------------------------------------------------------------ end to end


def _mark(store_url: str, source: str, sql_query: str | None = None) -> Watermark | None:
    with EnrichmentStore(store_url) as store:
        return store.source_mark(source_identity(source, sql_query, "updated_at")[0])


@pytest.mark.usefixtures("prefect_harness")
def test_csv_second_run_reads_only_changed_rows(tmp_path: Path, make_sandbox: Any, api_env: Any) -> None:
    sandbox = make_sandbox(rate_limit=None, revoke_after_batches=1)
    api_env(sandbox)
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    rows = _rows(300)
    source = str(_write_csv(tmp_path / "crm.csv", rows))
    output = tmp_path / "out.csv"
    run = {"source": source, "output": str(output), "store": store_url, "cursor": "updated_at"}

    # A run that fails after reading (the key is revoked after the first chunk) leaves no mark.
    state, failed = run_flow(**run)
    assert state.is_failed()
    assert failed["cursor_mark_new"] is None and _mark(store_url, source) is None

    sandbox.restore_key()
    state, first = run_flow(**run)
    assert state.is_completed(), state.message
    assert first["rows_read"] == 300 and first["skipped_by_cursor"] == 0
    assert first["cursor_mark_used"] is None
    assert first["cursor_mark_new"] == "2026-11-01T00:04:59+00:00" == _mark(store_url, source).text  # type: ignore[union-attr]

    # Three rows change, two are added, one loses its date: only those six are read.
    for i in (3, 150, 299):
        rows[i] = {**rows[i], "first_name": f"Changed{i}", "updated_at": "2026-11-30T09:00:00"}
    rows[7] = {**rows[7], "updated_at": ""}
    rows += _rows(2, start=300)
    rows[-1]["updated_at"] = rows[-2]["updated_at"] = "2026-11-30T10:00:00"
    _write_csv(tmp_path / "crm.csv", rows)
    state, second = run_flow(**run)
    assert state.is_completed(), state.message
    assert second["rows_read"] == 6 and second["skipped_by_cursor"] == 296
    assert second["cursor_mark_used"] == "2026-11-01T00:04:59+00:00"
    assert second["cursor_mark_new"] == "2026-11-30T10:00:00+00:00"
    assert sorted(read_csv(output)["id"].astype(int)) == [3, 7, 150, 299, 300, 301]
    assert second["submitted"] == 5  # the row without a date was answered already: from the store

    # Full refresh reads everything (nothing is paid again) and keeps the mark up to date.
    state, full = run_flow(**run, full_refresh=True)
    assert state.is_completed(), state.message
    assert full["rows_read"] == 302 and full["skipped_by_cursor"] == 0 and full["submitted"] == 0
    assert full["cursor_mark_used"] is None and full["cursor_mark_new"] == "2026-11-30T10:00:00+00:00"
    assert len(read_csv(output)) == 302
    assert sandbox.counters()["contacts_accepted_more_than_once"] == 0


@pytest.mark.postgres
@pytest.mark.usefixtures("prefect_harness")
def test_sql_table_second_run_reads_only_changed_rows(
    tmp_path: Path, make_sandbox: Any, api_env: Any
) -> None:
    sandbox = make_sandbox(rate_limit=None)
    api_env(sandbox)
    with postgres_database() as url:
        engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "CREATE TABLE crm (id int PRIMARY KEY, first_name text, last_name text, "
                    "company_domain text, updated_at timestamp)"
                )
            )
            conn.execute(
                sa.text(
                    "INSERT INTO crm SELECT i, 'Ann' || i, 'Lee' || i, 'co' || i || '.example', "
                    "timestamp '2026-11-01' + i * interval '1 second' FROM generate_series(0, 299) AS i"
                )
            )
        # Colons and a cast in the user's query stay theirs: only the mark is a bound parameter.
        query = "SELECT *, 'a:b' AS note FROM crm WHERE first_name::text <> '' AND last_name LIKE 'Lee%'"
        output = tmp_path / "out.csv"
        run = {"source": url, "sql_query": query, "output": str(output), "store": url, "cursor": "updated_at"}

        sandbox.revoke_key()
        state, _ = run_flow(**run)
        assert state.is_failed() and _mark(url, url, query) is None  # an invalid key: no mark

        sandbox.restore_key()
        state, first = run_flow(**run)
        assert state.is_completed(), state.message
        assert first["rows_read"] == 300 and first["cursor_mark_new"] == "2026-11-01T00:04:59+00:00"

        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "UPDATE crm SET first_name = 'New' || id, updated_at = timestamp '2026-11-30 08:00' + id "
                    "* interval '1 second' WHERE id IN (5, 6, 250)"
                )
            )
        state, second = run_flow(**run)
        assert state.is_completed(), state.message
        assert second["rows_read"] == 3 and second["skipped_by_cursor"] == 297
        assert second["cursor_mark_used"] == "2026-11-01T00:04:59+00:00"
        assert second["cursor_mark_new"] == "2026-11-30T08:04:10+00:00" == _mark(url, url, query).text  # type: ignore[union-attr]
        written = read_csv(output)
        assert sorted(written["id"].astype(int)) == [5, 6, 250] and set(written["note"]) == {"a:b"}

        state, full = run_flow(**run, full_refresh=True)
        assert state.is_completed(), state.message
        assert full["rows_read"] == 300 and full["submitted"] == 0
        assert full["cursor_mark_new"] == "2026-11-30T08:04:10+00:00"
        engine.dispose()
