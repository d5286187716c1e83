"""The run summary as data: what the flow writes as its table artifact is what the backfill reads back."""

from __future__ import annotations

import json

import pytest

from cleanlist.run.report import report_markdown
from cleanlist.run.summary import DryRunReport, RunSummary
from cleanlist.vocab import RunStatus


def _summary(**changes: object) -> RunSummary:
    base = RunSummary(
        status=RunStatus.COMPLETED_WITH_ERRORS,
        rows_read=1_000,
        rejected=12,
        submitted=950,
        emails_found=700,
        credits_spent=700.5,
        rate_limit="20/2",
        row_statuses={"enriched": 700, "not_found": 250, "error": 38},
        rejects_by_reason={"missing_fields": 10, "refused_by_api": 2},
        output="out.csv",
        rejects="out.rejects.csv",
        seconds=12.25,
    )
    return base.model_copy(update=changes)


def test_the_table_artifact_reads_back_as_the_same_summary() -> None:
    summary = _summary()
    rows = summary.table_rows()
    assert {"metric": "rows_read", "value": 1_000} in rows
    assert RunSummary.from_table(rows) == summary
    assert RunSummary.from_table(json.dumps(rows)) == summary  # as Prefect's API returns artifact data


def test_numbers_stay_numbers_whatever_they_look_like() -> None:
    # The old reader guessed int or float from a dot in the text; a whole number of credits came back int.
    summary = _summary(credits_spent=3.0, rate_limit="60/60")
    back = RunSummary.from_table(json.loads(json.dumps(summary.table_rows())))
    assert isinstance(back.credits_spent, float) and back.credits_spent == 3.0
    assert back.rate_limit == "60/60" and back.status is RunStatus.COMPLETED_WITH_ERRORS


def test_as_dict_is_what_the_cli_prints() -> None:
    data = _summary().as_dict()
    assert list(data)[:3] == ["status", "rows_read", "rejected"]
    assert data["status"] == "completed_with_errors" and data["row_statuses"]["error"] == 38
    json.dumps(data)


def test_markdown_report_names_rejects_by_code() -> None:
    text = report_markdown(_summary())
    assert text.startswith(
        "## 950 contacts → 700 emails (74 %) for 700.5 credits in 12 s — completed with errors"
    )
    assert "| rejected | 12 (10 missing fields, 2 refused by api) |" in text


def test_a_summary_with_a_wrong_type_is_refused() -> None:
    rows = _summary().table_rows()
    broken = [{**row, "value": "many"} if row["metric"] == "submitted" else row for row in rows]
    with pytest.raises(ValueError, match="submitted"):
        RunSummary.from_table(broken)


def test_dry_run_report_round_trips() -> None:
    report = DryRunReport(
        rows_read=10,
        rejected=1,
        duplicates=2,
        fresh_in_store=0,
        in_flight=0,
        to_submit=7,
        chunks=1,
        worst_case_credits=7.0,
        expected_credits=5.6,
        balance=100.0,
        key_valid=True,
        output="o.csv",
        rejects="o.rejects.csv",
    )
    assert DryRunReport.from_table(report.table_rows()) == report
    assert report.as_dict()["status"] == "dry_run"
