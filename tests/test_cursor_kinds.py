"""Cursor values are typed: numbers and UTC timestamps compare by value, a value that does not fit the
cursor's kind is a reject (`bad_cursor_value`), never a mark, and text is compared only when chosen."""

from __future__ import annotations

import csv
import sqlite3
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa

from cleanlist.errors import InputError
from cleanlist.io.cursor import CursorFilter, source_identity
from cleanlist.io.sources import iter_source
from cleanlist.store import EnrichmentStore
from cleanlist.vocab import CursorKind, Watermark
from tests.conftest import postgres_database
from tests.flow_helpers import read_csv, run_flow

FIELDS = ["id", "first_name", "last_name", "company_domain", "seq"]


def _contact(i: int, seq: object) -> dict[str, object]:
    return {
        "id": i,
        "first_name": f"Ann{i}",
        "last_name": f"Lee{i}",
        "company_domain": f"co{i}.example",
        "seq": seq,
    }


def _write_csv(path: Path, rows: list[dict[str, object]]) -> str:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def _mark(store_url: str, source: str, column: str, sql_query: str | None = None) -> Watermark | None:
    with EnrichmentStore(store_url) as store:
        return store.source_mark(source_identity(source, sql_query, column)[0])


def _ids(path: Path) -> list[int]:
    return sorted(read_csv(path)["id"].astype(int))


# --------------------------------------------------------------------------------------------- values


def test_one_odd_value_in_a_numeric_cursor_is_a_misfit_not_the_mark() -> None:
    frame = pd.DataFrame({"seq": [*map(str, range(1, 21)), "n/a", None]})
    cursor = CursorFilter("seq")
    split = cursor.apply(frame)
    assert cursor.kind is CursorKind.NUMBER and cursor.new_mark == Watermark(CursorKind.NUMBER, "20")
    assert split.misfits["seq"].tolist() == ["n/a"] and len(split.kept) == 21  # the empty one is read
    assert "'n/a' is not a number" in split.reasons[0]


def test_mixed_utc_offsets_compare_by_instant_across_a_dst_change() -> None:
    # New York's fall-back night: 01:10-05:00 is 40 minutes *after* 01:30-04:00, though it sorts before.
    mark = Watermark(CursorKind.TIMESTAMP, "2026-11-01T05:30:00+00:00")
    frame = pd.DataFrame(
        {"t": ["2026-11-01T01:10:00-05:00", "2026-11-01T01:20:00-04:00", "2026-11-01T07:00:00", "soon"]}
    )
    cursor = CursorFilter("t", after=mark)
    split = cursor.apply(frame)
    assert split.kept["t"].tolist() == ["2026-11-01T01:10:00-05:00", "2026-11-01T07:00:00"]  # no offset: UTC
    assert cursor.skipped == 1 and split.misfits["t"].tolist() == ["soon"]
    assert cursor.new_mark == Watermark(CursorKind.TIMESTAMP, "2026-11-01T07:00:00+00:00")


def test_auto_never_falls_back_to_text_and_text_is_compared_only_when_chosen() -> None:
    words = pd.DataFrame({"tag": ["b", "a", "c"]})
    with pytest.raises(InputError, match=r"neither numbers nor ISO 8601 timestamps.*--cursor-type text"):
        CursorFilter("tag").apply(words)
    chosen = CursorFilter("tag", kind=CursorKind.TEXT)
    chosen.apply(words)
    assert chosen.new_mark == Watermark(CursorKind.TEXT, "c")


def test_a_file_source_sends_misfits_to_bad_rows_with_their_own_code(tmp_path: Path) -> None:
    source = _write_csv(tmp_path / "crm.csv", [_contact(i, i) for i in range(1, 4)] + [_contact(4, "n/a")])
    (batch,) = iter_source(source, cursor=CursorFilter("seq", after=Watermark(CursorKind.NUMBER, "1")))
    assert list(batch.frame["id"]) == ["2", "3"] and batch.skipped == 1
    (bad,) = batch.bad_rows
    assert bad.row_number == 3 and bad.code.value == "bad_cursor_value" and bad.values["seq"] == "n/a"
    assert len(batch.frame) + len(batch.bad_rows) + batch.skipped == batch.end_row - batch.first_row


def _sqlite_source(path: Path, rows: list[dict[str, object]]) -> str:
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS crm (id integer, first_name text, last_name text, "
            "company_domain text, seq integer)"
        )
        conn.executemany("INSERT INTO crm VALUES (:id, :first_name, :last_name, :company_domain, :seq)", rows)
    return f"sqlite:///{path}"


def test_a_sql_column_of_mixed_types_is_read_without_a_cursor(tmp_path: Path) -> None:
    # SQLite keeps 'n/a' in an integer column: the rows come back as ints and one str.
    url = _sqlite_source(tmp_path / "crm.db", [_contact(i, i) for i in range(1, 21)] + [_contact(21, "n/a")])
    (batch,) = iter_source(url, sql_query="SELECT * FROM crm")
    assert batch.frame["seq"].tolist() == [*map(str, range(1, 21)), "n/a"] and not batch.bad_rows


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.usefixtures("prefect_harness")
def test_an_odd_cursor_value_does_not_hide_the_next_runs_new_contacts(
    tmp_path: Path, make_sandbox: Any, api_env: Any
) -> None:
    sandbox = make_sandbox(rate_limit=None)
    api_env(sandbox)
    store = f"sqlite:///{tmp_path / 'store.db'}"
    rows = [_contact(i, i) for i in range(1, 21)] + [_contact(21, "n/a")]
    source = _write_csv(tmp_path / "crm.csv", rows)
    output, rejects = tmp_path / "out.csv", tmp_path / "rejects.csv"
    run = {"source": source, "output": str(output), "rejects": str(rejects), "store": store, "cursor": "seq"}

    state, first = run_flow(**run)
    assert state.is_completed(), state.message
    assert first["submitted"] == 20 and first["rejects_by_reason"] == {"bad_cursor_value": 1}
    assert first["cursor_mark_new"] == "20" and _mark(store, source, "seq") == Watermark(
        CursorKind.NUMBER, "20"
    )
    (rejected,) = read_csv(rejects).to_dict("records")
    assert rejected["id"] == "21" and rejected["reject_code"] == "bad_cursor_value"
    assert "'n/a' is not a number" in rejected["reject_reason"]

    _write_csv(tmp_path / "crm.csv", [*rows, *(_contact(i, i) for i in range(22, 27))])
    state, second = run_flow(**run)
    assert state.is_completed(), state.message
    assert second["submitted"] == 5 and second["skipped_by_cursor"] == 20
    assert _ids(output) == [22, 23, 24, 25, 26] and _ids(rejects) == [21]
    assert second["cursor_mark_new"] == "26"
    assert sandbox.counters()["contacts_accepted_more_than_once"] == 0


@pytest.mark.usefixtures("prefect_harness")
def test_a_dst_spanning_export_is_read_in_instant_order(
    tmp_path: Path, make_sandbox: Any, api_env: Any
) -> None:
    sandbox = make_sandbox(rate_limit=None)
    api_env(sandbox)
    store = f"sqlite:///{tmp_path / 'store.db'}"
    before = [_contact(i, f"2026-11-01T01:{i:02d}:00-04:00") for i in range(1, 31)]  # EDT, up to 05:30Z
    source = _write_csv(tmp_path / "crm.csv", before)
    output = tmp_path / "out.csv"
    run = {"source": source, "output": str(output), "store": store, "cursor": "seq"}
    state, first = run_flow(**run)
    assert state.is_completed(), state.message
    assert first["cursor_mark_new"] == "2026-11-01T05:30:00+00:00"

    # After the clocks go back: 01:05-05:00 and 01:20-05:00 are later instants than every EDT row.
    after = [_contact(31, "2026-11-01T01:05:00-05:00"), _contact(32, "2026-11-01T01:20:00-05:00")]
    _write_csv(tmp_path / "crm.csv", [*before, *after])
    state, second = run_flow(**run)
    assert state.is_completed(), state.message
    assert second["submitted"] == 2 and second["skipped_by_cursor"] == 30 and _ids(output) == [31, 32]
    assert second["cursor_mark_new"] == "2026-11-01T06:20:00+00:00"


@pytest.mark.usefixtures("prefect_harness")
def test_a_sqlite_source_with_a_mixed_column_runs_with_and_without_a_cursor(
    tmp_path: Path, make_sandbox: Any, api_env: Any
) -> None:
    sandbox = make_sandbox(rate_limit=None)
    api_env(sandbox)
    store = f"sqlite:///{tmp_path / 'store.db'}"
    url = _sqlite_source(tmp_path / "crm.db", [_contact(i, i) for i in range(1, 21)] + [_contact(21, "n/a")])
    output, rejects = tmp_path / "out.csv", tmp_path / "rejects.csv"
    run = {"source": url, "sql_query": "SELECT * FROM crm", "output": str(output), "rejects": str(rejects)}

    state, plain = run_flow(**run, store=store)
    assert state.is_completed(), state.message
    assert plain["rows_read"] == 21 and _ids(output) == list(range(1, 22)) and plain["rejected"] == 0

    state, first = run_flow(**run, store=store, cursor="seq")
    assert state.is_completed(), state.message
    assert _ids(output) == list(range(1, 21)) and _ids(rejects) == [21] and first["cursor_mark_new"] == "20"

    _sqlite_source(tmp_path / "crm.db", [_contact(i, 100 + i) for i in range(22, 25)])  # '100' < '20' as text
    state, second = run_flow(**run, store=store, cursor="seq")
    assert state.is_completed(), state.message
    assert second["submitted"] == 3 and second["skipped_by_cursor"] == 20 and _ids(output) == [22, 23, 24]
    assert second["cursor_mark_new"] == "124"


@pytest.mark.postgres
@pytest.mark.usefixtures("prefect_harness")
def test_a_postgres_json_column_of_numbers_and_text_is_a_typed_cursor(
    tmp_path: Path, make_sandbox: Any, api_env: Any
) -> None:
    sandbox = make_sandbox(rate_limit=None)
    api_env(sandbox)
    with postgres_database() as url:
        engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE crm (id int, first_name text, last_name text, doc jsonb)"))
            conn.execute(
                sa.text(
                    "INSERT INTO crm SELECT i, 'Ann' || i, 'Lee' || i, jsonb_build_object('seq', "
                    "CASE WHEN i = 21 THEN to_jsonb('n/a'::text) ELSE to_jsonb(i) END) "
                    "FROM generate_series(1, 21) AS i"
                )
            )
        # psycopg hands back ints and one str for `seq`: the column Arrow refused before.
        query = (
            "SELECT id, first_name, last_name, 'co' || id || '.example' AS company_domain, "
            "doc->'seq' AS seq FROM crm"
        )
        output, rejects = tmp_path / "out.csv", tmp_path / "rejects.csv"
        run = {
            "source": url,
            "sql_query": query,
            "output": str(output),
            "rejects": str(rejects),
            "store": url,
        }

        state, _ = run_flow(**run)
        assert state.is_completed(), state.message
        assert _ids(output) == list(range(1, 22))

        state, first = run_flow(**run, cursor="seq")
        assert state.is_completed(), state.message
        assert (
            _ids(output) == list(range(1, 21)) and _ids(rejects) == [21] and first["cursor_mark_new"] == "20"
        )

        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO crm SELECT i, 'Ann' || i, 'Lee' || i, jsonb_build_object('seq', 100 + i) "
                    "FROM generate_series(22, 24) AS i"
                )
            )
        state, second = run_flow(**run, cursor="seq")
        assert state.is_completed(), state.message
        assert second["submitted"] == 3 and second["skipped_by_cursor"] == 20 and _ids(output) == [22, 23, 24]
        engine.dispose()


@pytest.mark.usefixtures("prefect_harness")
def test_marks_stored_by_the_previous_version_are_still_read(
    tmp_path: Path, make_sandbox: Any, api_env: Any
) -> None:
    sandbox = make_sandbox(rate_limit=None)
    api_env(sandbox)
    store = f"sqlite:///{tmp_path / 'store.db'}"
    rows = [_contact(i, f"2026-11-01T00:00:{i:02d}") for i in range(1, 11)]
    source = _write_csv(tmp_path / "crm.csv", rows)
    output = tmp_path / "out.csv"
    run = {"source": source, "output": str(output), "store": store, "cursor": "seq"}

    def store_old_mark(kind: str, text: str) -> None:  # the previous version wrote marks like these
        with EnrichmentStore(store) as opened:
            source_id, shown = source_identity(source, None, "seq")
            opened.advance_source_mark(
                source_id,
                source=shown,
                cursor_column="seq",
                mark=Watermark(CursorKind(kind), text),
                run_id="old",
            )

    store_old_mark("timestamp", "2026-11-01T00:00:07")  # naive: taken as UTC
    state, summary = run_flow(**run)
    assert state.is_completed(), state.message
    assert summary["skipped_by_cursor"] == 7 and _ids(output) == [8, 9, 10]
    assert summary["cursor_mark_new"] == "2026-11-01T00:00:10+00:00"

    # A text mark (the old fallback that hid every later number) is refused in one line, before reading.
    store_old_mark("text", "n/a")
    state, _ = run_flow(**run)
    assert (
        state.is_failed() and "--full-refresh" in (state.message or "") and "\n" not in (state.message or "")
    )
    assert _mark(store, source, "seq") == Watermark(CursorKind.TEXT, "n/a")
    state, full = run_flow(**run, full_refresh=True)
    assert state.is_completed(), state.message
    assert full["cursor_mark_new"] == "2026-11-01T00:00:10+00:00"

    state, _ = run_flow(**run, cursor_type="number")
    assert state.is_failed() and "is a timestamp, not a number" in (state.message or "")


@pytest.mark.usefixtures("prefect_harness")
def test_the_cli_refuses_an_old_text_mark_in_one_line(tmp_path: Path, make_sandbox: Any) -> None:
    from tests.test_cli import _cli, _no_traceback

    sandbox = make_sandbox(rate_limit=None)
    store = f"sqlite:///{tmp_path / 'store.db'}"
    url = _sqlite_source(tmp_path / "crm.db", [_contact(i, i) for i in range(1, 21)] + [_contact(21, "n/a")])
    with EnrichmentStore(store) as opened:
        source_id, shown = source_identity(url, "SELECT * FROM crm", "seq")
        text_mark = Watermark(CursorKind.TEXT, "n/a")  # what the previous version stored for this source
        opened.advance_source_mark(source_id, source=shown, cursor_column="seq", mark=text_mark, run_id="old")
    args = ["run", url, "--sql", "SELECT * FROM crm", "-o", str(tmp_path / "out.csv"), "--store", store]
    env = {"CLEANLIST_API_KEY": sandbox.api_key, "CLEANLIST_BASE_URL": sandbox.base_url}

    refused = _cli([*args, "--cursor", "seq"], env)
    assert refused.returncode != 0 and "--full-refresh" in refused.stderr
    _no_traceback(refused)

    fixed = _cli([*args, "--cursor", "seq", "--full-refresh"], env)
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    _no_traceback(fixed)
    assert _ids(tmp_path / "out.csv") == list(range(1, 21)) and _mark(
        store, url, "seq", "SELECT * FROM crm"
    ) == (Watermark(CursorKind.NUMBER, "20"))
