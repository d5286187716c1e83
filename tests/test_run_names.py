"""Runs are listed by what they enrich and when (`enrich crm.csv 2026-11-30`), never by a secret."""

from __future__ import annotations

from pathlib import Path

import pytest

from cleanlist_prefect.flows.run_names import source_label
from tests.flow_helpers import messy_export, run_flow


@pytest.mark.parametrize(
    ("source", "label"),
    [
        ("/data/crm/contacts.csv", "contacts.csv"),
        ("exports/crm.xlsx", "crm.xlsx"),
        ("postgresql://crm:Pa55word@db.internal:5432/crm", "crm"),
        ("sqlite:////var/lib/crm.db", "crm.db"),
        ("s3://bucket/in/contacts.parquet?X-Amz-Signature=deadbeef", "contacts.parquet"),
        ("memory://drop/contacts.jsonl", "contacts.jsonl"),
        ("block:sqlalchemy-connector/crm-db", "crm-db"),
        ("https://user:secret@files.example/", "files.example"),
        ("", "source"),
    ],
)
def test_a_source_is_labelled_by_its_last_segment_only(source: str, label: str) -> None:
    assert source_label(source) == label


@pytest.mark.usefixtures("prefect_harness")
def test_runs_are_named_after_their_source_and_date_on_the_server(
    tmp_path: Path, make_sandbox, api_env
) -> None:
    from prefect.client.orchestration import get_client

    api_env(make_sandbox(rate_limit=None, latency=0.0))
    source = messy_export(tmp_path / "crm.csv", unique=5)
    done, _ = run_flow(
        source=str(source), output=str(tmp_path / "out.csv"), store=f"sqlite:///{tmp_path / 's.db'}"
    )
    # A database source with a password in its URL: the run fails (nothing listens), its name shows no secret.
    failed, _ = run_flow(
        source="postgresql://crm:Pa55word@127.0.0.1:9/crm_prod",
        sql_query="select * from contacts",
        output=str(tmp_path / "db-out.csv"),
        store=f"sqlite:///{tmp_path / 's.db'}",
    )
    assert done.is_completed(), done.message
    assert failed.is_failed()

    with get_client(sync_client=True) as client:
        runs = [client.read_flow_run(state.state_details.flow_run_id) for state in (done, failed)]
    dates = [run.expected_start_time.strftime("%Y-%m-%d") for run in runs if run.expected_start_time]
    assert [run.name for run in runs] == [f"enrich crm.csv {dates[0]}", f"enrich crm_prod {dates[1]}"]
