"""Schema 1 → 2: contacts stored under a full host move to the key of their registrable domain, so a
rerun after the upgrade reuses or polls them instead of paying for them again."""

from __future__ import annotations

import csv
import json
import socket
import subprocess
import threading
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from cleanlist.errors import InputError
from cleanlist.prepare import bare_domain, contact_key, key_part, normalize_contact
from cleanlist.run.journal import AcceptanceJournal
from cleanlist.store import EnrichmentStore
from cleanlist.store.migrations import CONTACT_BATCH_ROWS, upgraded_key
from cleanlist.store.schema import (
    SCHEMA_COMPONENT,
    SCHEMA_VERSION,
    contacts,
    metadata,
    runs,
    schema_info,
    workflows,
)
from tests.flow_helpers import read_csv, run_flow

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def raw_engine(url: str) -> sa.Engine:
    """An engine beside the store's, to build an old store or read what the migration left."""
    return sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))


def contact_row(
    key: str, state: str = "done", enrichment_type: str = "partial", **values: Any
) -> dict[str, Any]:
    """A cleanlist_contacts row as schema version 1 wrote it (every column named, so one executemany)."""
    row: dict[str, Any] = dict.fromkeys(c.name for c in contacts.columns)
    row.update(contact_key=key, enrichment_type=enrichment_type, state=state, run_id="old-run")
    row.update(values)
    return row


def with_result(key: str, task: str, at: datetime, **values: Any) -> dict[str, Any]:
    """A contact row holding a stored result (answered by task `task` at `at`)."""
    result = {
        "result_workflow_id": f"wf-of-{task}",
        "result_task_id": task,
        "result_status": "completed",
        "primary_email": f"{task}@example.com",
        "primary_email_status": "valid",
        "other_emails": "[]",
        "phones": "[]",
        "raw": "{}",
        "enriched_at": at,
    }
    return contact_row(key, **{**result, **values})


def in_flight(key: str, workflow: str, task: str, at: datetime = NOW) -> dict[str, Any]:
    """A contact row accepted by the API in `workflow`, its answer still due."""
    return contact_row(key, "accepted", workflow_id=workflow, task_id=task, claimed_at=at, accepted_at=at)


def workflow_row(workflow_id: str, keys: Sequence[str], tasks: Sequence[str]) -> dict[str, Any]:
    return {
        "workflow_id": workflow_id,
        "run_id": "old-run",
        "chunk_key": "0",
        "enrichment_type": "partial",
        "state": "accepted",
        "contact_count": len(keys),
        "contact_keys": json.dumps(list(keys)),
        "task_ids": json.dumps(list(tasks)),
        "worst_case_credits": float(len(keys)),
        "credits_charged": None,
        "submitted_at": NOW,
        "completed_at": None,
    }


def build_version_1_store(
    url: str, rows: Sequence[Mapping[str, Any]], ledger: Sequence[Mapping[str, Any]] = ()
) -> None:
    """A store as schema version 1 left it: its tables, its rows, version 1 recorded."""
    EnrichmentStore(url).close()  # the tables, with the files' and directories' modes of a real store
    engine = raw_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.update(schema_info).where(schema_info.c.component == SCHEMA_COMPONENT).values(version=1)
        )
        if rows:
            conn.execute(sa.insert(contacts), list(rows))
        if ledger:
            conn.execute(sa.insert(workflows), list(ledger))
    engine.dispose()


def snapshot(url: str) -> tuple[dict[tuple[str, str], dict[str, Any]], dict[str, list[str]], int]:
    """(contact rows by (key, type), ledger keys by workflow, schema version) as stored."""
    engine = raw_engine(url)
    with engine.connect() as conn:
        rows = {
            (row.contact_key, row.enrichment_type): dict(row._mapping)
            for row in conn.execute(sa.select(contacts))
        }
        ledger = {
            row.workflow_id: json.loads(row.contact_keys)
            for row in conn.execute(sa.select(workflows.c.workflow_id, workflows.c.contact_keys))
        }
        version = conn.execute(sa.select(schema_info.c.version)).scalar_one()
    engine.dispose()
    return rows, ledger, version


# The key as version 1 built it, from what prepare.py did then: the host as `bare_domain` left it.
def old_key(first: str, last: str, website: str) -> str:
    host = website.split("://", 1)[-1].split("/", 1)[0].lower()
    return f"nm:{key_part(first)}|{key_part(last)}|{key_part(bare_domain(host))}"


@pytest.mark.parametrize(
    ("website", "registrable"),
    [
        ("https://blog.acme.co.uk/about", "acme.co.uk"),
        ("http://eu.shop.acme.com", "acme.com"),
        ("https://www.app.acme.github.io/", "acme.github.io"),  # a private suffix is a suffix
        ("https://x.blogspot.com", "x.blogspot.com"),  # already registrable under a private suffix
        ("https://intranet.acme.internal", "intranet.acme.internal"),  # no known suffix: kept whole
        ("https://acme.co.uk", "acme.co.uk"),
        ("https://mail.münchen.de", "xn--mnchen-3ya.de"),
    ],
)
def test_a_rewritten_key_is_the_key_prepare_gives_the_same_row_today(website: str, registrable: str) -> None:
    today = contact_key(
        normalize_contact({"first_name": "Jane|Q", "last_name": "Doe", "company_domain": website})
    )
    assert today == f"nm:jane\\|q|doe|{registrable}"
    assert upgraded_key(old_key("Jane|Q", "Doe", website)) == today
    assert upgraded_key(today) == today  # a rerun of the migration finds nothing to do


@pytest.mark.parametrize(
    "key",
    [
        "li:jane-doe",
        "li:blog.acme.co.uk",
        "nm:jane|doe|acme holdings ltd.",  # a company name
        "nm:jane|doe|www.acme.co.uk",  # a company name spelled as a host: a domain was stored without www.
        "nm:jane|doe|blog.acme.co.uk|x",  # not first|last|org
        "nm:j.r.r.|tolkien|allen & unwin",
        "nm:jane|doe\\|blog.acme.co.uk",  # the org part is "doe|blog.acme.co.uk"'s neighbour: escaped
    ],
)
def test_keys_that_are_not_a_subdomain_keep_their_spelling(key: str) -> None:
    assert upgraded_key(key) == key


OLD_IN_FLIGHT = "nm:carl|moe|eu.shop.delta.com"
FIRST_SHOP, SECOND_SHOP = "nm:dina|fox|blog.echo.io", "nm:dina|fox|shop.echo.io"


def old_rows() -> list[dict[str, Any]]:
    day = timedelta(days=1)
    return [
        # Plain move, in two enrichment types.
        with_result("nm:jane|doe|blog.acme.co.uk", "t-jane", NOW - day),
        with_result("nm:jane|doe|blog.acme.co.uk", "t-jane-full", NOW - day, enrichment_type="full"),
        # Collision: the old key's result is newer than the one already under the new key.
        with_result("nm:ann|lee|app.beta.com", "t-ann-new", NOW - day),
        with_result("nm:ann|lee|beta.com", "t-ann-old", NOW - 9 * day),
        # Collision: the old key is in flight, the new key holds an older result.
        in_flight(OLD_IN_FLIGHT, "wf-1", "t-carl"),
        with_result("nm:carl|moe|delta.com", "t-carl-old", NOW - 9 * day),
        # Two old keys become one: a claim of a dead run and an accepted contact in flight.
        contact_row(FIRST_SHOP, "claimed", claimed_at=NOW),
        in_flight(SECOND_SHOP, "wf-1", "t-dina"),
        # Left alone.
        with_result("nm:bob|ray|acme holdings ltd.", "t-bob", NOW - day),
        with_result("nm:eve|ng|www.acme.co.uk", "t-eve", NOW - day),
        with_result("li:jane-doe", "t-li", NOW - day),
        with_result("nm:fay|oh|acme.co.uk", "t-fay", NOW - day),
    ]


def old_ledger() -> list[dict[str, Any]]:
    return [
        workflow_row("wf-1", [OLD_IN_FLIGHT, SECOND_SHOP, "li:kim"], ["t-carl", "t-dina", "t-kim"]),
        workflow_row("wf-2", ["li:kim", "nm:bob|ray|acme holdings ltd."], ["t-x", "t-y"]),
    ]


def test_opening_a_version_1_store_moves_subdomain_keys_and_merges_collisions(store_url: str) -> None:
    build_version_1_store(store_url, old_rows(), old_ledger())
    _, _, before = snapshot(store_url)
    assert before == 1

    with EnrichmentStore(store_url) as store:
        owed = store.owed("wf-1")
        jane = store.results(["nm:jane|doe|acme.co.uk"], "partial")
        ann = store.results(["nm:ann|lee|beta.com"], "partial")
        carl = store.peek(["nm:carl|moe|delta.com"], "partial", fresh_after=NOW)
        dina = store.peek(["nm:dina|fox|echo.io"], "partial", fresh_after=NOW)
        wf1 = store.workflow("wf-1")

    rows, ledger, version = snapshot(store_url)
    assert version == SCHEMA_VERSION
    assert set(rows) == {
        ("nm:jane|doe|acme.co.uk", "partial"),
        ("nm:jane|doe|acme.co.uk", "full"),
        ("nm:ann|lee|beta.com", "partial"),
        ("nm:carl|moe|delta.com", "partial"),
        ("nm:dina|fox|echo.io", "partial"),
        ("nm:bob|ray|acme holdings ltd.", "partial"),
        ("nm:eve|ng|www.acme.co.uk", "partial"),
        ("li:jane-doe", "partial"),
        ("nm:fay|oh|acme.co.uk", "partial"),
    }
    assert jane["nm:jane|doe|acme.co.uk"].task_id == "t-jane"
    assert rows[("nm:jane|doe|acme.co.uk", "full")]["result_task_id"] == "t-jane-full"
    assert ann["nm:ann|lee|beta.com"].task_id == "t-ann-new"  # the newest result won
    # In flight, and the older result kept beside it until the answer comes.
    assert carl.in_flight == {"nm:carl|moe|delta.com": ("wf-1", "t-carl")}
    assert rows[("nm:carl|moe|delta.com", "partial")]["result_task_id"] == "t-carl-old"
    assert dina.in_flight == {"nm:dina|fox|echo.io": ("wf-1", "t-dina")}
    # The workflow still owes both answers, under the keys a rerun looks for, task ids intact.
    assert owed == {"nm:carl|moe|delta.com": "t-carl", "nm:dina|fox|echo.io": "t-dina"}
    assert wf1 is not None and wf1.task_ids == ("t-carl", "t-dina", "t-kim")
    assert ledger == {
        "wf-1": ["nm:carl|moe|delta.com", "nm:dina|fox|echo.io", "li:kim"],
        "wf-2": ["li:kim", "nm:bob|ray|acme holdings ltd."],
    }
    # What needed no change is byte for byte what it was.
    old = {(row["contact_key"], row["enrichment_type"]): row for row in old_rows()}
    for kept in [("nm:bob|ray|acme holdings ltd.", "partial"), ("li:jane-doe", "partial")]:
        assert rows[kept]["result_task_id"] == old[kept]["result_task_id"]

    # A second open changes nothing.
    EnrichmentStore(store_url).close()
    assert snapshot(store_url) == (rows, ledger, SCHEMA_VERSION)


def many_old_rows(count: int) -> Iterator[dict[str, Any]]:
    for i in range(count):
        if i % 3 == 0:
            yield with_result(f"nm:p{i:06d}|q|eu.blog.c{i}.co.uk", f"t{i}", NOW)
        elif i % 3 == 1:
            yield in_flight(f"nm:p{i:06d}|q|a.b.c{i}.com", "wf-big", f"t{i}")
        else:
            yield with_result(f"nm:p{i:06d}|q|c{i}.co.uk", f"t{i}", NOW)


def test_a_migration_killed_half_way_finishes_on_the_next_open(store_url: str) -> None:
    count = 2 * CONTACT_BATCH_ROWS + 300  # three batches
    rows = list(many_old_rows(count))
    build_version_1_store(store_url, rows)
    # The database itself refuses the move of a row of the last batch: the first two are committed.
    last = upgraded_key(rows[-1]["contact_key"])
    assert last != rows[-1]["contact_key"]
    engine = raw_engine(store_url)
    with engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql(
                "CREATE TRIGGER crash BEFORE UPDATE ON cleanlist_contacts "
                f"WHEN NEW.contact_key = '{last}' BEGIN SELECT RAISE(ABORT, 'killed'); END"
            )
        else:
            conn.exec_driver_sql(
                "CREATE FUNCTION crash() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                f"IF NEW.contact_key = '{last}' THEN RAISE EXCEPTION 'killed'; END IF; RETURN NEW; END $$"
            )
            conn.exec_driver_sql(
                "CREATE TRIGGER crash BEFORE INSERT OR UPDATE ON cleanlist_contacts "
                "FOR EACH ROW EXECUTE FUNCTION crash()"
            )
    with pytest.raises(InputError, match="killed"):
        EnrichmentStore(store_url)
    half, _, version = snapshot(store_url)
    assert version == 1
    moved = len({key for key, _ in half} - {row["contact_key"] for row in rows})
    assert 0 < moved < count and len(half) == count  # part of the way, nothing lost
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "DROP TRIGGER crash" + ("" if conn.dialect.name == "sqlite" else " ON cleanlist_contacts")
        )
    engine.dispose()

    EnrichmentStore(store_url).close()

    final, _, version = snapshot(store_url)
    assert version == SCHEMA_VERSION
    expected = {(upgraded_key(row["contact_key"]), row["enrichment_type"]): row for row in rows}
    assert set(final) == set(expected)
    for key, row in expected.items():
        assert (final[key]["state"], final[key]["task_id"], final[key]["result_task_id"]) == (
            row["state"],
            row["task_id"],
            row["result_task_id"],
        )


def test_a_store_newer_than_this_cleanlist_is_refused_in_one_line(store_url: str) -> None:
    EnrichmentStore(store_url).close()
    engine = raw_engine(store_url)
    with engine.begin() as conn:
        conn.execute(sa.update(schema_info).values(version=SCHEMA_VERSION + 1))
    engine.dispose()
    with pytest.raises(InputError, match=f"schema version {SCHEMA_VERSION + 1}") as caught:
        EnrichmentStore(store_url)
    assert "\n" not in str(caught.value)


def test_a_new_store_starts_at_the_current_version(store_url: str) -> None:
    EnrichmentStore(store_url).close()
    assert snapshot(store_url) == ({}, {}, SCHEMA_VERSION)
    assert {table.name for table in metadata.sorted_tables} >= {"cleanlist_contacts"}


@pytest.mark.usefixtures("prefect_harness")
def test_a_contact_enriched_under_its_full_host_is_not_paid_for_again_after_the_upgrade(
    tmp_path: Path, make_sandbox: Any, api_env: Any, store_url: str
) -> None:
    sandbox = make_sandbox(rate_limit=None)
    api_env(sandbox)
    source = tmp_path / "crm.csv"
    with source.open("w", newline="", encoding="utf-8") as sheet:
        writer = csv.writer(sheet)
        writer.writerow(["Record ID", "First Name", "Last Name", "Company Website"])
        writer.writerow(["r1", "Jane", "Doe", "https://blog.acme.co.uk/about"])
    stored = old_key("Jane", "Doe", "https://blog.acme.co.uk/about")
    assert stored == "nm:jane|doe|blog.acme.co.uk"
    build_version_1_store(store_url, [with_result(stored, "t-jane", datetime.now(UTC) - timedelta(days=1))])

    state, summary = run_flow(source=str(source), output=str(tmp_path / "out.csv"), store=store_url)

    assert state.is_completed(), state.message
    assert sandbox.counters()["contacts_accepted"] == 0
    assert summary["submitted"] == 0 and summary["fresh_in_store"] == 1
    out = read_csv(tmp_path / "out.csv")
    assert out[["Record ID", "cleanlist_status", "cleanlist_email", "cleanlist_task_id"]].values.tolist() == [
        ["r1", "cached", "t-jane@example.com", "t-jane"]
    ]


def test_two_processes_opening_a_version_1_store_at_once_both_find_it_migrated(store_url: str) -> None:
    build_version_1_store(store_url, old_rows(), old_ledger())
    failures: list[BaseException] = []

    def open_store() -> None:
        try:
            EnrichmentStore(store_url).close()
        except BaseException as exc:  # reported by the assertion below, not lost in the thread
            failures.append(exc)

    openers = [threading.Thread(target=open_store) for _ in range(2)]
    for opener in openers:
        opener.start()
    for opener in openers:
        opener.join()

    assert failures == []
    rows, ledger, version = snapshot(store_url)
    assert version == SCHEMA_VERSION
    assert {key for key, _ in rows} == {upgraded_key(row["contact_key"]) for row in old_rows()}
    assert ledger["wf-1"] == ["nm:carl|moe|delta.com", "nm:dina|fox|echo.io", "li:kim"]


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_an_acceptance_journalled_before_the_upgrade_is_replayed_under_the_new_key(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    build_version_1_store(url, [])
    journal = AcceptanceJournal(store_url=url, directory=tmp_path / "journal")
    # A run of the old version was killed after the API accepted its request, before the store knew.
    entry = {
        "kind": "accepted",
        "request": "r1",
        "run": "old-run",
        "pid": _dead_pid(),
        "host": socket.gethostname(),
        "workflow": "wf-killed",
        "chunk": "0",
        "type": "partial",
        "keys": ["nm:jane|doe|blog.acme.co.uk"],
        "task_ids": ["t-jane"],
    }
    journal.path.write_text(json.dumps(entry) + "\n")

    with EnrichmentStore(url) as store:
        assert journal.replay(store).recorded == 1
        outcome = store.peek(["nm:jane|doe|acme.co.uk"], "partial", fresh_after=None)

    assert outcome.in_flight == {"nm:jane|doe|acme.co.uk": ("wf-killed", "t-jane")}


# --- version 2 → 3: folded spellings -------------------------------------------------------------------

ZWSP_JOSE = "nm:jo\u200bsé|garcía|acme"
WIDE_JOSE = "nm:ｊｏｓé|garcía|acme"
JOSE = "nm:josé|garcía|acme"


def build_version_2_store(
    url: str, rows: Sequence[Mapping[str, Any]], ledger: Sequence[Mapping[str, Any]] = ()
) -> None:
    build_version_1_store(url, rows, ledger)
    engine = raw_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.update(schema_info).where(schema_info.c.component == SCHEMA_COMPONENT).values(version=2)
        )
    engine.dispose()


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (ZWSP_JOSE, JOSE),
        (WIDE_JOSE, JOSE),
        ("nm:\ufeffjosé|garc\u200día|\u202eacme\u202c", JOSE),
        ("nm:ｊａｎｅ\\|ｑ|doe|acme.com", "nm:jane\\|q|doe|acme.com"),  # an escaped separator stays escaped
        ("li:jane\u200b-doe", "li:jane-doe"),
        (JOSE, JOSE),
        ("nm:jane|doe|blog.acme.co.uk", "nm:jane|doe|acme.co.uk"),  # version 1's step, composed
    ],
)
def test_a_folded_key_is_the_key_prepare_gives_today(old: str, new: str) -> None:
    assert upgraded_key(old) == new
    assert upgraded_key(new) == new


def test_opening_a_version_2_store_folds_keys_and_merges_spellings_of_one_contact(store_url: str) -> None:
    day = timedelta(days=1)
    build_version_2_store(
        store_url,
        [
            with_result(ZWSP_JOSE, "t-zwsp", NOW - 2 * day),
            with_result(WIDE_JOSE, "t-wide", NOW - day),  # the newest result wins
            with_result("nm:bob|ray|acme", "t-bob", NOW - day),
        ],
        [workflow_row("wf-9", [ZWSP_JOSE, "nm:bob|ray|acme"], ["t-zwsp", "t-bob"])],
    )

    EnrichmentStore(store_url).close()

    rows, ledger, version = snapshot(store_url)
    assert version == SCHEMA_VERSION
    assert {key for key, _ in rows} == {JOSE, "nm:bob|ray|acme"}
    assert rows[(JOSE, "partial")]["result_task_id"] == "t-wide"
    assert ledger == {"wf-9": [JOSE, "nm:bob|ray|acme"]}


@pytest.mark.usefixtures("prefect_harness")
def test_a_contact_stored_under_an_invisible_spelling_is_not_paid_for_again_after_the_upgrade(
    tmp_path: Path, make_sandbox: Any, api_env: Any
) -> None:
    sandbox = make_sandbox(rate_limit=None)
    api_env(sandbox)
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    source = tmp_path / "crm.csv"
    with source.open("w", newline="", encoding="utf-8") as sheet:
        writer = csv.writer(sheet)
        writer.writerow(["Record ID", "First Name", "Last Name", "Company"])
        writer.writerow(["r1", "José", "García", "Acme"])
    build_version_2_store(
        store_url, [with_result(ZWSP_JOSE, "t-jose", datetime.now(UTC) - timedelta(days=1))]
    )

    state, summary = run_flow(source=str(source), output=str(tmp_path / "out.csv"), store=store_url)

    assert state.is_completed(), state.message
    assert sandbox.counters()["contacts_accepted"] == 0
    assert summary["fresh_in_store"] == 1
    assert read_csv(tmp_path / "out.csv")["cleanlist_task_id"].tolist() == ["t-jose"]


def test_a_version_2_store_gains_the_runs_process_identity_and_keeps_its_runs(store_url: str) -> None:
    with EnrichmentStore(store_url) as store:
        store.start_run("old", {})
    engine = raw_engine(store_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE cleanlist_runs DROP COLUMN boot_id")
        conn.exec_driver_sql("ALTER TABLE cleanlist_runs DROP COLUMN proc_start")
        conn.exec_driver_sql("ALTER TABLE cleanlist_runs DROP COLUMN liveness_lock")
        conn.exec_driver_sql("ALTER TABLE cleanlist_rate_slots DROP COLUMN run_id")
        conn.execute(sa.update(schema_info).values(version=2))
    engine.dispose()

    with EnrichmentStore(store_url) as store:
        record = store.get_run("old")
        store.start_run("new", {})
        # The old row has no start time: judged by its pid (this live process), as before.
        assert store.alive_runs(["old", "new"]) == {"old", "new"}

    engine = raw_engine(store_url)
    with engine.connect() as conn:
        rows = {row.run_id: row for row in conn.execute(sa.select(runs))}
        version = conn.execute(sa.select(schema_info.c.version)).scalar_one()
        slot_columns = {column["name"] for column in sa.inspect(conn).get_columns("cleanlist_rate_slots")}
    engine.dispose()
    assert record is not None and version == SCHEMA_VERSION == 7
    assert "run_id" in slot_columns  # version 6: rate slots name the run that took them
    assert rows["old"].proc_start is None and rows["new"].proc_start is not None
    assert rows["old"].liveness_lock is None and rows["new"].liveness_lock is not None


# --- version 6 → 7: the runs' economics ---------------------------------------------------------------


def test_a_version_6_store_fills_its_runs_economics_from_their_stored_summaries(store_url: str) -> None:
    counts = {"status": "completed", "submitted": 400, "emails_found": 306, "phones_found": 2}
    with EnrichmentStore(store_url) as store:
        store.start_run("finished", {"source": "/data/crm.csv", "enrichment_type": "partial"})
        store.finish_run("finished", "completed", {**counts, "credits_spent": 326})
        store.start_run("garbled", {"source": 7})
        store.finish_run("garbled", "failed", {"submitted": "many", "credits_spent": True})
        store.start_run("open", {"source": "s3://bucket/leads.parquet", "enrichment_type": "full"})
    engine = raw_engine(store_url)
    with engine.begin() as conn:
        for name in (
            "source",
            "enrichment_type",
            "submitted",
            "emails_found",
            "phones_found",
            "credits_spent",
        ):
            conn.exec_driver_sql(f"ALTER TABLE cleanlist_runs DROP COLUMN {name}")
        conn.execute(sa.update(schema_info).values(version=6))
    engine.dispose()

    with EnrichmentStore(store_url) as store:
        finished = store.run_economics()

    engine = raw_engine(store_url)
    with engine.connect() as conn:
        rows = {row.run_id: row for row in conn.execute(sa.select(runs))}
        version = conn.execute(sa.select(schema_info.c.version)).scalar_one()
    engine.dispose()
    assert version == SCHEMA_VERSION == 7
    old = rows["finished"]
    assert (old.source, old.enrichment_type, old.submitted, old.emails_found, old.phones_found) == (
        "/data/crm.csv",
        "partial",
        400,
        306,
        2,
    )
    assert old.credits_spent == 326.0
    # Values of the wrong type are left out, not guessed; a run still open has its start's columns only.
    garbled = rows["garbled"]
    assert (garbled.source, garbled.submitted, garbled.credits_spent) == (None, None, None)
    assert (rows["open"].source, rows["open"].submitted) == ("s3://bucket/leads.parquet", None)
    assert [(run.run_id, run.found, run.credits_spent) for run in finished] == [
        ("finished", 308, 326.0),
        ("garbled", 0, 0.0),
    ]
