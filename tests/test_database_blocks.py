"""Database source, table sink and store given as SqlAlchemyConnector blocks on a real PostgreSQL: the
run reads, writes and remembers there, and no password reaches the Prefect server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa

from tests.conftest import postgres_database
from tests.flow_helpers import messy_export, run_flow

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.postgres]

PASSWORD = "Pg-Pa55word-never-shown-7Qx"  # trust auth on the test server: sent nowhere, checked nowhere


def _engine(url: str) -> sa.Engine:
    return sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))


def _save_connector(name: str, url: str) -> None:
    from prefect_sqlalchemy import ConnectionComponents, SqlAlchemyConnector

    parsed = sa.engine.make_url(url)
    components = ConnectionComponents(
        driver="postgresql+psycopg",
        username=parsed.username,
        password=PASSWORD,
        host=parsed.host,
        port=parsed.port,
        database=parsed.database,
    )
    SqlAlchemyConnector(connection_info=components).save(name, overwrite=True, _sync=True)


@pytest.fixture
def crm_and_store() -> Iterator[tuple[str, str]]:
    with postgres_database() as crm, postgres_database() as store:
        yield crm, store


def test_source_sink_and_store_by_block_name_keep_the_password_off_the_server(
    tmp_path: Path, make_sandbox, api_env, crm_and_store: tuple[str, str]
) -> None:
    crm, store = crm_and_store
    api_env(make_sandbox(rate_limit=None, latency=0.0))
    contacts = pd.read_csv(messy_export(tmp_path / "crm.csv", unique=40, duplicates=3, invalid=2), dtype=str)
    engine = _engine(crm)
    contacts.to_sql("contacts", engine, index=False)
    _save_connector("crm-db", crm)
    _save_connector("enrichment-store", store)

    state, summary = run_flow(
        source="block:sqlalchemy-connector/crm-db",
        sql_query="SELECT * FROM contacts",
        output="block:sqlalchemy-connector/crm-db",
        table="enriched",
        store="block:sqlalchemy-connector/enrichment-store",
    )
    assert state.is_completed(), state.message
    assert summary["rows_read"] == 45 and summary["submitted"] == 40

    with engine.connect() as conn:
        enriched = conn.execute(sa.text('SELECT count(*) FROM "enriched"')).scalar_one()
        rejects = conn.execute(sa.text('SELECT count(*) FROM "enriched_rejects"')).scalar_one()
    engine.dispose()
    assert enriched == 40 and rejects == 2  # duplicates share their contact's row in the upserted table
    store_engine = _engine(store)
    with store_engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT count(*) FROM cleanlist_contacts")).scalar_one()
        params = conn.execute(sa.text("SELECT params FROM cleanlist_runs")).scalars().all()
    store_engine.dispose()
    assert stored == 40 and len(params) == 1
    assert PASSWORD not in params[0]

    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(state.state_details.flow_run_id)
        texts = [flow_run.model_dump_json()]
        texts += [run.model_dump_json() for run in client.read_flow_runs(limit=200)]
        texts += [run.model_dump_json() for run in client.read_task_runs(limit=200)]
        texts += [log.message for log in client.read_logs()]
        texts += [artifact.model_dump_json() for artifact in client.read_artifacts()]
    assert flow_run.parameters["store"] == "block:sqlalchemy-connector/enrichment-store"
    assert (
        flow_run.parameters["source"] == flow_run.parameters["output"] == "block:sqlalchemy-connector/crm-db"
    )
    for text in texts:
        assert PASSWORD not in text


def test_a_missing_connector_block_is_one_line(tmp_path: Path, make_sandbox, api_env) -> None:
    api_env(make_sandbox(rate_limit=None, latency=0.0))
    source = messy_export(tmp_path / "crm.csv", unique=3)
    state, _ = run_flow(
        source=str(source), output=str(tmp_path / "out.csv"), store="block:sqlalchemy-connector/nowhere"
    )
    assert state.is_failed()
    assert state.message == "--store: no SqlAlchemyConnector block named 'nowhere' " + (
        "(create it in the UI, Blocks → SQLAlchemy Connector, or with SqlAlchemyConnector(...).save(NAME))"
    )

    state, _ = run_flow(source=str(source), output=str(tmp_path / "out.csv"), store="block:s3-bucket/x")
    assert state.is_failed() and "block:sqlalchemy-connector/NAME" in state.message
    assert not (tmp_path / "out.csv").exists()
