"""enrich-contacts end to end against the sandbox over real HTTP, on a real (temporary) Prefect server."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest

from cleanlist.sandbox import FaultSpec
from tests.flow_helpers import bulk_requests, messy_export, read_csv, run_flow

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _task_result(sandbox, task_id: str) -> dict:
    response = httpx.get(
        f"{sandbox.public_url}/enrich/status",
        params={"task_id": task_id},
        headers={"Authorization": f"Bearer {sandbox.api_key}"},
    )
    response.raise_for_status()
    return response.json()


def test_messy_export_comes_out_whole_and_joined_row_by_row(tmp_path: Path, make_sandbox, api_env) -> None:
    sandbox = make_sandbox(rate_limit=None)
    api_env(sandbox)
    source = messy_export(tmp_path / "crm.csv", unique=600, duplicates=60, invalid=17, linkedin_only=40)
    state, summary = run_flow(
        source=str(source),
        output=str(tmp_path / "out" / "enriched.csv"),
        store=f"sqlite:///{tmp_path / 'store.db'}",
    )

    assert state.is_completed(), state.message
    out = read_csv(tmp_path / "out" / "enriched.csv")
    rejects = read_csv(tmp_path / "out" / "enriched.rejects.csv")
    ids = sorted(out["Record ID"].tolist() + rejects["Record ID"].tolist())
    assert ids == sorted(read_csv(source)["Record ID"].tolist())  # every row exactly once
    assert len(rejects) == 17 and rejects["reject_reason"].str.contains("missing fields").all()
    assert summary["rows_read"] == 677 and summary["duplicates"] == 60 and summary["submitted"] == 600

    counters = sandbox.counters()
    assert counters["contacts_accepted"] == 600
    assert counters["contacts_accepted_more_than_once"] == 0
    assert all(0 < r["contacts"] <= 250 for r in bulk_requests(sandbox.requests_log()) if r["status"] == 200)
    assert summary["credits_spent"] == pytest.approx(counters["credits_charged"])
    assert set(out["cleanlist_status"]) <= {"enriched", "not_found"}

    # The join, row by row: each row's email is what the API answered for the task id of that row.
    for _, row in out.sample(40, random_state=3).iterrows():
        result = _task_result(sandbox, row["cleanlist_task_id"])
        assert row["cleanlist_email"] == (result["primary_email"] or "")
        expected_name = row["First Name"].strip() or None
        if expected_name:
            assert result["prospect"]["first_name"].lower() == expected_name.lower()
    # Duplicates got their first row's result.
    by_name = out[out["First Name"] != ""].assign(name=lambda f: f["First Name"].str.strip().str.lower())
    assert (by_name.groupby("name")["cleanlist_task_id"].nunique() == 1).all()


def test_repeat_run_sends_no_bulk_request_and_writes_everything_from_the_store(
    tmp_path: Path, make_sandbox, api_env, store_url: str
) -> None:
    sandbox = make_sandbox(rate_limit=None)
    api_env(sandbox)
    source = messy_export(tmp_path / "crm.csv", unique=300, duplicates=20, invalid=3)
    first_state, _ = run_flow(source=str(source), output=str(tmp_path / "a.csv"), store=store_url)
    assert first_state.is_completed()
    bulk_before = len(bulk_requests(sandbox.requests_log()))

    state, second = run_flow(source=str(source), output=str(tmp_path / "b.csv"), store=store_url)

    assert state.is_completed()
    assert len(bulk_requests(sandbox.requests_log())) == bulk_before
    assert second["submitted"] == 0 and second["fresh_in_store"] == 300
    a, b = read_csv(tmp_path / "a.csv"), read_csv(tmp_path / "b.csv")
    assert a["cleanlist_email"].tolist() == b["cleanlist_email"].tolist()
    assert set(b["cleanlist_status"]) == {"cached"}

    # --refresh-days 0 forces re-enrichment.
    state, forced = run_flow(
        source=str(source), output=str(tmp_path / "c.csv"), store=store_url, refresh_days=0
    )
    assert state.is_completed() and forced["submitted"] == 300


def test_transient_errors_and_a_429_storm_complete_without_early_retries(
    tmp_path: Path, make_sandbox, api_env
) -> None:
    sandbox = make_sandbox(
        rate_limit=None,
        faults={
            "enrich-bulk": FaultSpec(sequence=(503, 500, 502, 429, 429, 503), retry_after=1),
            "enrich-status": FaultSpec(sequence=(500, 429), retry_after=1),
        },
    )
    api_env(sandbox)
    source = messy_export(tmp_path / "crm.csv", unique=1000)
    state, summary = run_flow(
        source=str(source), output=str(tmp_path / "out.csv"), store=f"sqlite:///{tmp_path / 's.db'}"
    )

    assert state.is_completed(), state.message
    assert summary["submitted"] == 1000
    assert sandbox.counters()["contacts_accepted_more_than_once"] == 0
    assert set(read_csv(tmp_path / "out.csv")["cleanlist_status"]) <= {"enriched", "not_found"}
    log = sandbox.requests_log()
    for endpoint in ("enrich-bulk", "enrich-status"):
        calls = [e for e in log if e["endpoint"] == endpoint]
        for i, entry in enumerate(calls):
            if entry["status"] == 429 and entry["retry_after"]:
                # Requests logged within 0.1 s were already on the wire when the 429 was answered
                # (up to 8 chunk tasks run at once); anything later must wait out Retry-After.
                early = [
                    c
                    for c in calls[i + 1 :]
                    if entry["t"] + 0.1 < c["t"] < entry["t"] + entry["retry_after"] - 0.05
                ]
                assert early == []


def test_a_429_and_a_503_are_retried_by_the_chunk_task_as_the_runs_policy_says(
    tmp_path: Path, make_sandbox, api_env
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    # One chunk: its first request meets a 429 with Retry-After, its second a 503. Both are retries of
    # the submit-chunk task (what the Prefect UI shows as "Retrying"), counted by Prefect's run count:
    # with --retries 2 the third run is the last one the run's policy allows for a 503, and it succeeds.
    sandbox = make_sandbox(
        rate_limit=None, faults={"enrich-bulk": FaultSpec(sequence=(429, 503), retry_after=1)}
    )
    api_env(sandbox)
    source = messy_export(tmp_path / "crm.csv", unique=100)
    state, summary = run_flow(
        source=str(source),
        output=str(tmp_path / "out.csv"),
        store=f"sqlite:///{tmp_path / 's.db'}",
        retries=2,
    )

    assert state.is_completed(), state.message
    assert [e["status"] for e in bulk_requests(sandbox.requests_log())] == [429, 503, 200]
    assert (summary["retries"], summary["rate_limited"], summary["chunks_failed"]) == (2, 1, 0)
    flow_runs = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        [chunk] = [t for t in client.read_task_runs(flow_run_filter=flow_runs) if t.name == "chunk-00000"]
    assert chunk.run_count == 3


def test_a_chunk_task_stops_retrying_when_the_runs_policy_says_so(
    tmp_path: Path, make_sandbox, api_env
) -> None:
    # --retries 1: a 503 on the second run is the end of the chunk, although Prefect's task would allow
    # more runs (a 429 with Retry-After may use a few beyond --retries): the run's policy decides.
    sandbox = make_sandbox(rate_limit=None, faults={"enrich-bulk": FaultSpec(sequence=(503, 503))})
    api_env(sandbox)
    source = messy_export(tmp_path / "crm.csv", unique=100)
    state, summary = run_flow(
        source=str(source),
        output=str(tmp_path / "out.csv"),
        store=f"sqlite:///{tmp_path / 's.db'}",
        retries=1,
    )

    assert not state.is_completed()
    assert [e["status"] for e in bulk_requests(sandbox.requests_log())] == [503, 503]
    assert (summary["chunks_failed"], summary["submitted"]) == (1, 0)
    assert set(read_csv(tmp_path / "out.csv")["cleanlist_status"]) == {"error"}


def test_a_429_holds_the_endpoint_for_every_task_not_only_the_one_that_got_it(
    tmp_path: Path, make_sandbox, api_env
) -> None:
    sandbox = make_sandbox(rate_limit=None, faults={"enrich-bulk": FaultSpec(sequence=(429,), retry_after=2)})
    api_env(sandbox)
    source = messy_export(tmp_path / "crm.csv", unique=2000)  # 8 chunks, 8 concurrent tasks
    state, _ = run_flow(
        source=str(source), output=str(tmp_path / "out.csv"), store=f"sqlite:///{tmp_path / 's.db'}"
    )

    assert state.is_completed()
    bulk = bulk_requests(sandbox.requests_log())
    refused = next(e for e in bulk if e["status"] == 429)
    # Not already on its way: a request whose slot was granted before the 429 was read still fsyncs its
    # journal intent before it reaches the server, which on a busy disk takes a few hundred ms.
    after = [e for e in bulk if e["t"] > refused["t"] + 0.5]
    assert after and min(e["t"] for e in after) >= refused["t"] + 2 - 0.05


def test_revoked_key_stops_all_submissions_and_a_rerun_resumes_without_paying_twice(
    tmp_path: Path, make_sandbox, api_env, store_url: str
) -> None:
    sandbox = make_sandbox(rate_limit=None, revoke_after_batches=2, latency=0.3)
    api_env(sandbox)
    source = messy_export(tmp_path / "crm.csv", unique=3000)  # 12 chunks
    started = time.monotonic()
    state, _summary = run_flow(
        source=str(source), output=str(tmp_path / "out.csv"), store=store_url, max_concurrent_chunks=4
    )

    assert state.is_failed() and "401" in state.message
    assert time.monotonic() - started < 60
    log = sandbox.requests_log()
    first_401 = next(i for i, e in enumerate(log) if e["status"] == 401)
    further = log[first_401 + 1 :]
    assert len([e for e in further if e["endpoint"] == "enrich-bulk"]) <= 8 and len(further) <= 16
    out = read_csv(tmp_path / "out.csv")
    assert len(out) == 3000  # every row is written, even the ones never submitted
    assert set(out["cleanlist_status"]) <= {"pending", "not_submitted", "enriched", "not_found"}
    accepted_before = sandbox.counters()["contacts_accepted"]
    assert accepted_before == 500

    sandbox.restore_key()
    state, rerun = run_flow(source=str(source), output=str(tmp_path / "out.csv"), store=store_url)

    assert state.is_completed(), state.message
    counters = sandbox.counters()
    assert counters["contacts_accepted"] == 3000
    assert counters["contacts_accepted_more_than_once"] == 0
    assert rerun["submitted"] == 2500 and rerun["resumed_in_flight"] + rerun["fresh_in_store"] == 500
    assert set(read_csv(tmp_path / "out.csv")["cleanlist_status"]) <= {"enriched", "not_found", "cached"}


def test_plan_without_api_access_fails_fast(tmp_path: Path, make_sandbox, monkeypatch) -> None:
    key = "clapi_" + "n" * 64
    sandbox = make_sandbox(rate_limit=None, no_api_access_keys=(key,))
    monkeypatch.setenv("CLEANLIST_API_KEY", key)
    monkeypatch.setenv("CLEANLIST_BASE_URL", sandbox.base_url)
    source = messy_export(tmp_path / "crm.csv", unique=2000)
    state, _summary = run_flow(
        source=str(source), output=str(tmp_path / "out.csv"), store=f"sqlite:///{tmp_path / 's.db'}"
    )

    assert state.is_failed() and "403" in state.message
    assert len(sandbox.requests_log()) <= 3
    assert not bulk_requests(sandbox.requests_log())


def test_out_of_credits_pauses_then_resumes_by_itself_when_credits_arrive(
    tmp_path: Path, make_sandbox, api_env
) -> None:
    sandbox = make_sandbox(rate_limit=None, credits=300.0, find_rate=0.9)
    api_env(sandbox)
    source = messy_export(tmp_path / "crm.csv", unique=1000)  # 4 chunks, worst case 1000 credits

    def top_up_later() -> None:
        time.sleep(4)
        sandbox.add_credits(5000)

    helper = threading.Thread(target=top_up_later)
    helper.start()
    state, summary = run_flow(
        source=str(source),
        output=str(tmp_path / "out.csv"),
        store=f"sqlite:///{tmp_path / 's.db'}",
        max_concurrent_chunks=1,
    )
    helper.join()

    assert state.is_completed(), state.message
    counters = sandbox.counters()
    assert counters["contacts_accepted"] == 1000 and counters["contacts_accepted_more_than_once"] == 0
    assert counters["requests"]["enrich-bulk"].get("402", 0) >= 1
    assert summary["credits_spent"] == pytest.approx(counters["credits_charged"])


def test_a_credit_pause_that_times_out_ends_the_run_with_its_summary(
    tmp_path: Path, make_sandbox, api_env
) -> None:
    """Prefect leaves a run whose pause timed out in Paused and then fails every later transition with
    "never resumed" and no data; the run's own summary (what it sent, what is in doubt) must survive it
    (chaos seed 614033 lost the doubt of a DataFrame rerun that way)."""
    sandbox = make_sandbox(rate_limit=None, credits=300.0, find_rate=0.9)
    api_env(sandbox)
    source = messy_export(tmp_path / "crm.csv", unique=1000)
    state, summary = run_flow(
        source=str(source),
        output=str(tmp_path / "out.csv"),
        store=f"sqlite:///{tmp_path / 's.db'}",
        max_concurrent_chunks=1,
        pause_timeout_seconds=2,
    )

    assert state.is_failed()
    assert "credits were not topped up" in (state.message or ""), state.message
    assert summary["status"] == "credits_exhausted"
    counters = sandbox.counters()
    assert summary["submitted"] == counters["contacts_accepted"] > 0
    assert summary["credits_spent"] == pytest.approx(counters["credits_charged"])
    out = read_csv(tmp_path / "out.csv")
    assert len(out) + summary["rejected"] == summary["rows_read"]


def test_server_side_422_quarantines_exactly_the_named_rows(tmp_path: Path, make_sandbox, api_env) -> None:
    sandbox = make_sandbox(
        rate_limit=None,
        refuse_contacts_containing=("co1.example", "co77.example", "co300.example", "co599.example"),
    )
    api_env(sandbox)
    source = messy_export(tmp_path / "crm.csv", unique=600)
    state, _summary = run_flow(
        source=str(source), output=str(tmp_path / "out.csv"), store=f"sqlite:///{tmp_path / 's.db'}"
    )

    assert state.is_completed(), state.message
    rejects = read_csv(tmp_path / "out.rejects.csv")
    assert sorted(rejects["Company Website"].str.extract(r"(co\d+)\.example")[0]) == [
        "co1",
        "co300",
        "co599",
        "co77",
    ]
    assert rejects["reject_reason"].str.startswith("refused by the API").all()
    assert len(read_csv(tmp_path / "out.csv")) == 596
    assert sandbox.counters()["contacts_accepted"] == 596


def test_budget_caps_what_the_server_may_charge(tmp_path: Path, make_sandbox, api_env) -> None:
    sandbox = make_sandbox(rate_limit=None, find_rate=1.0)
    api_env(sandbox)
    source = messy_export(tmp_path / "crm.csv", unique=3000)
    state, summary = run_flow(
        source=str(source),
        output=str(tmp_path / "out.csv"),
        store=f"sqlite:///{tmp_path / 's.db'}",
        max_credits=500,
    )

    assert state.is_completed()
    assert summary["status"] == "budget_reached"
    assert sandbox.counters()["credits_charged"] <= 500
    out = read_csv(tmp_path / "out.csv")
    assert len(out) == 3000 and (out["cleanlist_status"] == "skipped_budget").sum() >= 2500


def test_dry_run_submits_nothing_and_names_what_it_would_submit(
    tmp_path: Path, make_sandbox, api_env
) -> None:
    sandbox = make_sandbox(rate_limit=None)
    api_env(sandbox)
    source = messy_export(tmp_path / "crm.csv", unique=700, duplicates=30, invalid=5)
    state, report = run_flow(
        source=str(source),
        output=str(tmp_path / "out.csv"),
        store=f"sqlite:///{tmp_path / 's.db'}",
        dry_run=True,
    )

    assert state.is_completed()
    assert report["to_submit"] == 700 and report["chunks"] == 3 and report["rejected"] == 5
    assert report["worst_case_credits"] == 700 and report["balance"] == pytest.approx(10_000)
    endpoints = {e["endpoint"] for e in sandbox.requests_log()}
    assert endpoints <= {"validate-key", "credits-balance"}
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"Owner,Notes\nann,hello\n", "no column"),
    ],
)
def test_bad_sources_fail_with_one_clear_line(
    tmp_path: Path, make_sandbox, api_env, content, message
) -> None:
    api_env(make_sandbox(rate_limit=None))
    source = tmp_path / "bad.csv"
    source.write_bytes(content)
    state, _ = run_flow(
        source=str(source), output=str(tmp_path / "out.csv"), store=f"sqlite:///{tmp_path / 's.db'}"
    )
    assert state.is_failed()
    assert "\n" not in state.message and message in state.message.lower()


def test_awkward_but_readable_sources_lose_nothing(tmp_path: Path, make_sandbox, api_env) -> None:
    api_env(make_sandbox(rate_limit=None))
    source = tmp_path / "awkward.csv"
    big = "x" * 1_000_000
    text = (
        "First Name;Last Name;Company;Notes\n"
        "Zoë;Müller;Bäckerei GmbH;ok\n"
        'Ann;Lee;Acme;"multi\nline"\n'
        f"Bob;Big;Acme;{big}\n"
        f"Cy;Huge{big};Acme;long name\n"
        "Dee;Ragged;Acme;a;b;c\n"
        "Eve;Short\n"
    )
    source.write_bytes(text.encode("cp1252", errors="strict") if False else text.encode("latin-1", "replace"))
    state, summary = run_flow(
        source=str(source), output=str(tmp_path / "out.csv"), store=f"sqlite:///{tmp_path / 's.db'}"
    )
    assert state.is_completed(), state.message
    out = read_csv(tmp_path / "out.csv")
    rejects = read_csv(tmp_path / "out.rejects.csv")
    assert len(out) + len(rejects) == 6 == summary["rows_read"]
    assert "Müller" in out["Last Name"].tolist()
    assert rejects["reject_reason"].str.len().min() > 0


def test_header_only_source_writes_an_empty_output(tmp_path: Path, make_sandbox, api_env) -> None:
    sandbox = make_sandbox(rate_limit=None)
    api_env(sandbox)
    source = tmp_path / "empty.csv"
    source.write_text("First Name,Last Name,Company\n")
    state, summary = run_flow(
        source=str(source), output=str(tmp_path / "out.parquet"), store=f"sqlite:///{tmp_path / 's.db'}"
    )
    assert state.is_completed(), state.message
    assert summary["rows_read"] == 0
    assert list(pd.read_parquet(tmp_path / "out.parquet").columns)[:3] == [
        "First Name",
        "Last Name",
        "Company",
    ]
    assert not bulk_requests(sandbox.requests_log())


def test_database_sink_upserts_so_reruns_are_idempotent(
    tmp_path: Path, make_sandbox, api_env, store_url
) -> None:
    import sqlalchemy as sa

    sandbox = make_sandbox(rate_limit=None)
    api_env(sandbox)
    source = messy_export(tmp_path / "crm.csv", unique=400, duplicates=25, invalid=6)
    sink = store_url  # the same kind of database as the store, a different table
    for refresh_days in (30, 0):  # second run: forced re-enrichment, same table
        state, _summary = run_flow(
            source=str(source), output=sink, table="enriched", store=store_url, refresh_days=refresh_days
        )
        assert state.is_completed(), state.message

    engine = sa.create_engine(sink.replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text('SELECT "Record ID", cleanlist_contact_key, cleanlist_status FROM enriched')
        ).all()
        rejects = conn.execute(sa.text('SELECT "Record ID", reject_reason FROM enriched_rejects')).all()
    engine.dispose()
    assert len(rows) == 400  # one row per contact, however many runs and duplicate rows
    assert len({key for _, key, _ in rows}) == 400
    assert {status for _, _, status in rows} <= {"enriched", "not_found"}
    assert len(rejects) == 6 and all(reason for _, reason in rejects)


def test_the_api_key_never_appears_in_logs_artifacts_or_output(
    tmp_path: Path, make_sandbox, api_env, caplog, capfd
) -> None:
    import logging

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    key = "clapi_" + "SeCrEt" * 10 + "Zz09"
    sandbox = make_sandbox(api_key=key, rate_limit=None, revoke_after_batches=1)
    api_env(sandbox)
    caplog.set_level(logging.DEBUG)
    source = messy_export(tmp_path / "crm.csv", unique=600)
    state, summary = run_flow(
        source=str(source), output=str(tmp_path / "out.csv"), store=f"sqlite:///{tmp_path / 's.db'}"
    )
    assert state.is_failed() and "401" in state.message  # revoked after the first chunk

    captured = capfd.readouterr()
    texts = [caplog.text, captured.out, captured.err, state.message, str(summary)]
    with get_client(sync_client=True) as client:
        run_id = state.state_details.flow_run_id
        texts += [
            a.model_dump_json()
            for a in client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        ]
        texts += [log.message for log in client.read_logs()]
        texts.append(client.read_flow_run(run_id).model_dump_json())
    assert len(texts) > 6
    for text in texts:
        assert key not in text and key[6:30] not in text
    assert (tmp_path / "out.csv").read_text().count(key) == 0


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_output_to_an_fsspec_url_in_each_format(tmp_path: Path, make_sandbox, api_env, fmt: str) -> None:
    import fsspec

    api_env(make_sandbox(rate_limit=None))
    source = messy_export(tmp_path / "crm.csv", unique=120, invalid=3)
    target = f"memory://cleanlist-{fmt}/enriched.{fmt}"
    state, summary = run_flow(source=str(source), output=target, store=f"sqlite:///{tmp_path / 's.db'}")

    assert state.is_completed(), state.message
    with fsspec.open(target, "rb") as fh:
        out = pd.read_parquet(fh) if fmt == "parquet" else pd.read_json(fh, lines=True, dtype=False)
    with fsspec.open(f"memory://cleanlist-{fmt}/enriched.rejects.csv", "rb") as fh:
        rejects = pd.read_csv(fh, dtype=str)
    assert len(out) == 120 and len(rejects) == 3
    assert summary["output"] == target
    assert {"cleanlist_status", "cleanlist_email", "cleanlist_task_id"} <= set(out.columns)


@pytest.mark.parametrize(("rate_limit", "hinted"), [("2/1", True), ("100/1", False)])
def test_a_run_paced_by_the_client_side_limit_says_so(
    tmp_path: Path, make_sandbox, api_env, rate_limit: str, hinted: bool
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    api_env(make_sandbox(rate_limit=None))  # the API would take more than the client allows itself
    source = messy_export(tmp_path / "crm.csv", unique=1250)  # 5 chunks
    state, summary = run_flow(
        source=str(source),
        output=str(tmp_path / "out.csv"),
        store=f"sqlite:///{tmp_path / 's.db'}",
        rate_limit=rate_limit,
    )
    assert state.is_completed(), state.message
    assert summary["rate_limit"] == rate_limit and summary["rate_limited"] == 0
    APILogHandler().flush()
    run_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        logs = " ".join(log.message for log in client.read_logs(log_filter=run_filter))
    assert "plan:" in logs  # the run's own log lines are there
    assert ("paced the submissions" in logs) is hinted
