"""The variation matrix: the messy export through every reading of what the API's docs leave open.

For each variation the sandbox plays (CONTRACT.md, "Unpublished: the variations a client must survive"):
every input row is in the output or the rejects exactly once, no row is `missing`, every email the API
charged for reaches the output, no contact is charged twice, and a rerun over the same store sends
nothing again except what the API itself says it does not have (unknown tasks, failed workflows).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.flow_helpers import bulk_requests, messy_export, read_csv, run_flow

pytestmark = pytest.mark.usefixtures("prefect_harness")


@dataclass(frozen=True)
class Variation:
    sandbox: dict[str, Any]
    # The sandbox has no limit unless a variation gives one; the client's default (60 a minute) would
    # pace the rerun's task lookups behind the first run's (one store, one book): a minute's wait, at
    # random, in a three-second test.
    client_rate_limit: str | None = "1000/1"
    # What the first run may leave without a result: statuses beyond enriched/not_found/cached.
    leftovers: frozenset[str] = frozenset()
    run_options: dict[str, Any] = field(default_factory=dict)


MATRIX: dict[str, Variation] = {
    "documented": Variation({}),
    "results-shuffled": Variation({"results_order": "shuffled"}),
    "tasks-left-out-10%": Variation({"omit_task_rate": 0.1, "results_order": "shuffled"}),
    "tasks-unknown-5%": Variation({"unknown_task_rate": 0.05}, leftovers=frozenset({"unresolved"})),
    "no-task-ids": Variation({"bulk_task_ids": "absent", "results_order": "shuffled"}),
    "task-id-count-differs": Variation({"bulk_task_ids": "short"}),
    "final-word-failed": Variation(
        {"final_word": "failed", "final_word_rate": 0.5}, leftovers=frozenset({"error"})
    ),
    "final-word-cancelled": Variation(
        {"final_word": "cancelled", "final_word_rate": 0.5}, leftovers=frozenset({"error"})
    ),
    "final-word-unknown": Variation({"final_word": "finished", "final_word_rate": 1.0}),
    "error-envelope": Variation({"error_envelope": "error", "rate_limit": (4, 1.0)}, client_rate_limit="8/1"),
    "retry-after-ms": Variation({"retry_after_ms": True, "rate_limit": (4, 1.0)}, client_rate_limit="8/1"),
    "one-window-per-org": Variation(
        {"rate_scope": "organization", "rate_limit": (6, 1.0)}, client_rate_limit="6/1"
    ),
    "not-yet-visible": Variation({"workflow_visible_after": 0.6}),
}


def _emails_delivered(out: Any) -> int:
    """Distinct answered tasks with an email in the output (duplicate rows share their task)."""
    found = out[(out["cleanlist_email"] != "") & (out["cleanlist_task_id"] != "")]
    return int(found["cleanlist_task_id"].nunique())


@pytest.mark.parametrize("name", list(MATRIX))
def test_every_row_and_every_paid_result_survives_the_variation(
    name: str, tmp_path: Path, make_sandbox, api_env
) -> None:
    variation = MATRIX[name]
    sandbox = make_sandbox(**{"rate_limit": None, "seed": 5, **variation.sandbox})
    api_env(sandbox, rate_limit=variation.client_rate_limit)
    source = messy_export(tmp_path / "crm.csv", unique=560, duplicates=30, invalid=6, linkedin_only=40)
    store = f"sqlite:///{tmp_path / 'store.db'}"
    ids = Counter(read_csv(source)["Record ID"])

    state, summary = run_flow(
        source=str(source), output=str(tmp_path / "first.csv"), store=store, **variation.run_options
    )
    assert state.is_completed(), state.message
    out, rejects = read_csv(tmp_path / "first.csv"), read_csv(tmp_path / "first.rejects.csv")
    assert Counter(out["Record ID"]) + Counter(rejects["Record ID"]) == ids  # every row exactly once
    statuses = set(out["cleanlist_status"])
    assert statuses <= {"enriched", "not_found"} | variation.leftovers, statuses
    first = sandbox.counters()
    assert first["contacts_accepted"] == 560 and first["contacts_accepted_more_than_once"] == 0
    # Every credit charged (partial: one per email found) is an email in the output.
    assert _emails_delivered(out) == first["credits_charged"] == summary["credits_spent"]
    owed = out[out["cleanlist_status"].isin(["unresolved", "error"])]
    assert (owed["cleanlist_note"] != "").all()
    unresolved_rows = int((out["cleanlist_status"] == "unresolved").sum())
    assert (0 < summary["unresolved"] <= unresolved_rows) if unresolved_rows else summary["unresolved"] == 0

    # The rerun over the same store: asks first, sends again only what the API has no answer for.
    resend = set(owed["Record ID"])
    state, rerun = run_flow(source=str(source), output=str(tmp_path / "rerun.csv"), store=store)
    assert state.is_completed(), state.message
    again = read_csv(tmp_path / "rerun.csv")
    assert Counter(again["Record ID"]) + Counter(read_csv(tmp_path / "rerun.rejects.csv")["Record ID"]) == ids
    sent = sum(r["contacts"] for r in bulk_requests(sandbox.requests_log()) if r["status"] == 200)
    after = sandbox.counters()
    assert rerun["submitted"] == sent - first["contacts_accepted"]
    if not resend:
        assert sent == first["contacts_accepted"], "the rerun sent a bulk request"
        assert set(again["cleanlist_status"]) == {"cached"}
    else:
        # Only contacts of the owed rows went out again (duplicate rows share one contact).
        assert 0 < sent - first["contacts_accepted"] <= len(owed)
    # Whatever was charged over both runs reached the rerun's output, and nothing was charged twice.
    assert _emails_delivered(again) == after["credits_charged"]
    assert "missing" not in set(again["cleanlist_status"])


def test_a_lost_answer_after_sending_counts_as_an_ambiguous_submission(
    tmp_path: Path, make_sandbox, api_env
) -> None:
    from cleanlist.sandbox import FaultSpec

    # 502 and 504 come from a gateway after the body went out: the API may have taken the batch.
    # 503 is the API itself refusing: nothing was accepted.
    sandbox = make_sandbox(rate_limit=None, faults={"enrich-bulk": FaultSpec(sequence=(502, 503, 504))})
    api_env(sandbox)
    source = messy_export(tmp_path / "crm.csv", unique=200)
    state, summary = run_flow(
        source=str(source), output=str(tmp_path / "out.csv"), store=f"sqlite:///{tmp_path / 'store.db'}"
    )
    assert state.is_completed(), state.message
    assert summary["ambiguous_submissions"] == 2
    assert summary["retries"] == 3 and summary["submitted"] == 200
    assert set(read_csv(tmp_path / "out.csv")["cleanlist_status"]) <= {"enriched", "not_found"}


def test_a_left_out_task_whose_lookup_meets_a_503_still_reaches_the_output(
    tmp_path: Path, make_sandbox, api_env
) -> None:
    from cleanlist.sandbox import FaultSpec

    # Every task is left out of the workflow's results, so each contact is asked for by task id; a
    # share of those lookups is answered 503. The lookup is retried like any transient error: the run
    # says "completed" only with every paid result in its output (chaos seed 3154204: 4 paid, lost).
    sandbox = make_sandbox(
        rate_limit=None, seed=11, omit_task_rate=1.0, faults={"enrich-status": FaultSpec(rate=0.2)}
    )
    api_env(sandbox)
    source = messy_export(tmp_path / "crm.csv", unique=40)
    state, summary = run_flow(
        source=str(source),
        output=str(tmp_path / "out.csv"),
        store=f"sqlite:///{tmp_path / 'store.db'}",
        retry_delay_seconds=0.01,
    )
    assert state.is_completed(), state.message
    out = read_csv(tmp_path / "out.csv")
    assert set(out["cleanlist_status"]) <= {"enriched", "not_found"}, Counter(out["cleanlist_status"])
    assert summary["unresolved"] == 0
    assert _emails_delivered(out) == sandbox.counters()["credits_charged"] == summary["credits_spent"]
