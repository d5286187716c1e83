"""The run report a person reads in ten seconds: headline first, "what needs you" only when something does."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from cleanlist.run.report import NEEDS_YOU_TITLE, headline, needs_you, report_markdown, report_text
from cleanlist.run.summary import RunSummary
from cleanlist.vocab import RunStatus


def clean_run(**changes: object) -> RunSummary:
    base = RunSummary(
        status=RunStatus.COMPLETED,
        rows_read=430,
        rejected=25,
        duplicates=5,
        unique_contacts=400,
        submitted=400,
        emails_found=306,
        credits_spent=306.0,
        chunks=2,
        workflows=2,
        rate_limit="60/60",
        rejects_by_reason={"missing_fields": 20, "invalid_linkedin_url": 5},
        output="out.csv",
        rejects="out.rejects.csv",
        seconds=72.4,
        enrichment_type="partial",
        credit_cap=1000.0,
    )
    return base.model_copy(update=changes)


def troubled_run() -> RunSummary:
    """Unresolved rows, one request in doubt and a learned limit below the configured one."""
    return clean_run(
        status=RunStatus.COMPLETED_WITH_ERRORS,
        unresolved=7,
        ambiguous_submissions=1,
        ambiguous_contacts=250,
        learned_limits="enrich-bulk 4/3s (learned)",
        rate_limits_learned={"enrich-bulk": "4/3s"},
    )


def test_the_headline_says_what_came_of_the_run_in_one_line() -> None:
    assert (
        headline(clean_run()) == "400 contacts → 306 emails (77 %) for 306 credits in 1 min 12 s — completed"
    )
    assert headline(clean_run(phones_found=40, credits_spent=706.0, seconds=5)) == (
        "400 contacts → 306 emails (77 %), 40 phones (10 %) for 706 credits in 5 s — completed"
    )


def test_a_clean_run_shows_nothing_under_what_needs_you() -> None:
    summary = clean_run()
    assert needs_you(summary) == []
    assert NEEDS_YOU_TITLE not in report_text(summary)
    assert NEEDS_YOU_TITLE not in report_markdown(summary)


def test_unresolved_rows_a_request_in_doubt_and_a_learned_limit_each_come_with_their_remedy() -> None:
    summary = troubled_run()
    items = needs_you(summary)
    assert [item.what.split(" ", 2)[:2] for item in items] == [
        ["7", "contacts"],
        ["1", "request(s)"],
        ["the", "API"],
    ]
    unresolved, in_doubt, learned = items
    assert "unresolved" in unresolved.what and "rerun the same command" in unresolved.remedy
    # What the request in doubt can cost: its 250 contacts at the partial type's worst case of 1 credit.
    assert "250 contacts" in in_doubt.what and "up to 250 credits" in in_doubt.what
    assert "double charge" in in_doubt.remedy
    assert "enrich-bulk 4/3s" in learned.what and "--rate-limit" in learned.remedy
    for text in (report_text(summary), report_markdown(summary)):
        section = text[text.index(NEEDS_YOU_TITLE) :]
        for item in items:
            assert item.what in section and item.remedy in section


def test_webhook_delivery_failures_are_in_what_needs_you_with_the_logs_words() -> None:
    summary = clean_run(
        webhook_failures={"502 from https://hooks.example.com": 3, "connection refused from https://h": 1},
        webhook_failed_for_good=2,
        webhook_failure_report=[
            "3 deliveries failed: 502 from https://hooks.example.com — your proxy",
            "1 delivery failed: connection refused from https://h — your receiver was down",
        ],
    )
    (item,) = needs_you(summary)
    assert item.what.startswith("4 webhook deliveries failed (3 deliveries failed: 502 from https://hooks")
    assert "2 workflows were polled instead" in item.what
    assert "receiver" in item.remedy
    # The summary reads it back from the table artifact like its other maps.
    back = RunSummary.from_table(summary.table_rows())
    assert back.webhook_failures == summary.webhook_failures
    assert back.webhook_failure_report == summary.webhook_failure_report


def test_the_terminal_report_fits_a_screen_and_every_number_is_the_summarys() -> None:
    summary = troubled_run()
    text = report_text(summary)
    lines = text.splitlines()
    assert lines[0] == headline(summary) and len(lines) <= 20
    funnel = dict(
        re.findall(r"^  (rows read|rejected|duplicates|fresh in store|submitted)\s+(\d[\d,]*)", text, re.M)
    )
    assert funnel == {
        "rows read": str(summary.rows_read),
        "rejected": str(summary.rejected),
        "duplicates": str(summary.duplicates),
        "fresh in store": str(summary.fresh_in_store),
        "submitted": str(summary.submitted),
    }
    assert "20 missing fields, 5 invalid linkedin url" in text
    assert "Cost: 306 credits; 1.00 per email found; cap 1,000 (31 % used)" in text
    assert (
        "Pace: 5.5 contacts/s against a ceiling of 266.7 contacts/s "
        "(bulk 4 requests / 3 s, learned, 200 contacts each)" in text
    )


@pytest.mark.usefixtures("prefect_harness")
def test_a_real_run_with_unresolved_rows_a_request_in_doubt_and_a_learned_limit_reports_all_three(
    tmp_path: Path, make_sandbox: Any, api_env: Any
) -> None:
    """Over HTTP against the sandbox: 5 % of tasks unknown for good (unresolved), one bulk answer lost to a
    gateway's 502 (in doubt), and a bulk limit of 2 a second learned by an earlier run (paced by it)."""
    from pydantic import SecretStr

    from cleanlist.client import organization_of
    from cleanlist.sandbox import FaultSpec
    from cleanlist.settings import RateLimit
    from cleanlist.store import EnrichmentStore
    from tests.flow_helpers import messy_export, run_flow

    sandbox = make_sandbox(
        rate_limit=None, seed=5, unknown_task_rate=0.05, faults={"enrich-bulk": FaultSpec(sequence=(502,))}
    )
    api_env(sandbox, rate_limit="20/1")
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    with EnrichmentStore(store_url) as store:
        book = store.rate_book(organization_of(sandbox.base_url, SecretStr(sandbox.api_key)))
        book.learn("enrich-bulk", RateLimit(2, 1.0))
    source = messy_export(tmp_path / "crm.csv", unique=1200)

    state, data = run_flow(source=str(source), output=str(tmp_path / "out.csv"), store=store_url)

    summary = RunSummary.model_validate(data)
    assert summary.unresolved > 0 and summary.ambiguous_submissions == 1 and summary.learned_limits, data
    text = report_text(summary)
    assert text.splitlines()[0] == headline(summary)
    section = text[text.index(NEEDS_YOU_TITLE) :]
    items = needs_you(summary)
    assert [item.what for item in items][:1] == [
        f"{summary.unresolved} contacts unresolved (paid for, answer still owed)"
    ]
    assert any("in doubt" in item.what for item in items)
    assert any("paced by enrich-bulk" in item.what for item in items)
    for item in items:
        assert f"! {item.what}\n    → {item.remedy}" in section
    # Tasks the API no longer knows leave their contacts unresolved in a run that still completes.
    assert state.is_completed(), state.message


@pytest.mark.usefixtures("prefect_harness")
def test_a_run_reads_the_balance_left_once_at_its_end_and_the_report_shows_it(
    tmp_path: Path, make_sandbox: Any, api_env: Any
) -> None:
    """Over HTTP against the sandbox: one `GET /credits/balance` as the run ends, after every charge."""
    from cleanlist.run.report import cost, count

    sandbox = make_sandbox(rate_limit=None, seed=3, credits=5000.0)
    state, data = _run_300_contacts(tmp_path, sandbox, api_env)

    assert state.is_completed(), state.message
    summary = RunSummary.model_validate(data)
    assert summary.credits_spent > 0
    assert summary.balance_left == 5000.0 - summary.credits_spent
    balance_calls = [entry for entry in sandbox.requests_log() if entry["endpoint"] == "credits-balance"]
    assert len(balance_calls) == 1
    assert cost(summary).endswith(f"; balance left {count(summary.balance_left)}")
    assert f"balance left {count(summary.balance_left)}" in report_text(summary)


def _run_300_contacts(tmp_path: Path, sandbox: Any, api_env: Any) -> tuple[Any, dict[str, Any]]:
    """enrich-contacts over 300 contacts against `sandbox`: (final state, summary)."""
    from tests.flow_helpers import messy_export, run_flow

    api_env(sandbox)
    source = messy_export(tmp_path / "crm.csv", unique=300)
    return run_flow(
        source=str(source), output=str(tmp_path / "out.csv"), store=f"sqlite:///{tmp_path / 'store.db'}"
    )


@pytest.mark.usefixtures("prefect_harness")
def test_a_failed_balance_read_leaves_it_unknown_and_the_run_completes(
    tmp_path: Path, make_sandbox: Any, api_env: Any
) -> None:
    from cleanlist.sandbox import FaultSpec

    sandbox = make_sandbox(
        rate_limit=None, seed=3, faults={"credits-balance": FaultSpec(sequence=(503, 503, 503))}
    )
    state, data = _run_300_contacts(tmp_path, sandbox, api_env)

    assert state.is_completed(), state.message
    summary = RunSummary.model_validate(data)
    assert summary.balance_left is None and summary.credits_spent > 0
    # Asked once, not retried: the report does without it.
    assert [e["endpoint"] for e in sandbox.requests_log()].count("credits-balance") == 1
    assert "balance left" not in report_text(summary)
