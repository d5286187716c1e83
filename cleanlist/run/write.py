"""The join of results to rows, and the one place that writes a run's rows: output and rejects.

Every input row is written exactly once: valid rows (duplicates included) to the output with the
`cleanlist_*` columns joined from the store by contact key, invalid and quarantined rows to rejects
with a reason. Where the rows go is a pair of `RowSink`s (`cleanlist/io/outputs.py::open_sinks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from cleanlist.io.sink import RowSink
from cleanlist.run.workspace import KEY, REJECT, REJECT_CODE, RunWorkspace
from cleanlist.store import EnrichmentStore, StoredResult
from cleanlist.vocab import ContactState, EnrichmentType, FinalWord, RejectCode

RESULT_COLUMNS = (
    "cleanlist_status",
    "cleanlist_email",
    "cleanlist_email_status",
    "cleanlist_other_emails",
    "cleanlist_phones",
    "cleanlist_workflow_id",
    "cleanlist_task_id",
    "cleanlist_enriched_at",
    "cleanlist_note",  # why a row has no result: the API's final word, an unresolved task, a failed chunk
)
REJECT_REASON = "reject_reason"
REJECT_CODE_COLUMN = "reject_code"
LIST_SEPARATOR = "; "

# cleanlist_status of a row whose contact has no stored result, by what happened to it in this run.
STATUS_FOR_STATE = {
    ContactState.ACCEPTED: "pending",
    ContactState.IN_FLIGHT: "pending",
    ContactState.UNRESOLVED: "unresolved",
    ContactState.HELD: "pending",
    ContactState.PLANNED: "not_submitted",
    ContactState.NEW: "not_submitted",
    ContactState.NOT_SUBMITTED: "not_submitted",
    ContactState.SKIPPED_BUDGET: "skipped_budget",
    ContactState.ERROR: "error",
}
# States whose stored result (if any) is not this run's answer: the row shows the state instead. (An
# old result of a contact sent again for a refresh is not its answer: the row says pending.)
UNANSWERED = frozenset(
    {
        ContactState.ACCEPTED,
        ContactState.UNRESOLVED,
        ContactState.PLANNED,
        ContactState.NEW,
        ContactState.NOT_SUBMITTED,
        ContactState.SKIPPED_BUDGET,
        ContactState.ERROR,
    }
)


@dataclass(frozen=True)
class WriteReport:
    output_rows: int
    rejected_rows: int
    statuses: dict[str, int]
    reject_reasons: dict[str, int]


def _join(value: Sequence[str]) -> str | None:
    return LIST_SEPARATOR.join(value) if value else None


def _result_columns(
    state: tuple[ContactState, str | None] | None, result: StoredResult | None
) -> tuple[object, ...]:
    state_name = state[0] if state else ContactState.NOT_SUBMITTED
    if result is not None and state_name not in UNANSWERED:
        if state_name is ContactState.FRESH:
            status = "cached"
        elif FinalWord.of(result.status) is FinalWord.COMPLETED:
            status = "enriched"
        elif FinalWord.of(result.status) is FinalWord.FAILED:
            status = "not_found"
        else:
            status = result.status.lower()
        return (
            status,
            result.primary_email,
            result.primary_email_status,
            _join(result.other_emails),
            _join(result.phones),
            result.workflow_id,
            result.task_id,
            result.enriched_at.isoformat() if result.enriched_at else None,
            None,
        )
    note = state[1] if state is not None else None
    return (
        STATUS_FOR_STATE.get(state_name, state_name.value),
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        note,
    )


def write_rows(
    workspace: RunWorkspace,
    store: EnrichmentStore,
    enrichment_type: EnrichmentType,
    output: RowSink,
    rejects: RowSink,
) -> WriteReport:
    """Join every staged row with its contact's outcome and write it to output or rejects."""
    statuses: dict[str, int] = {}
    reasons_seen: dict[str, int] = {}
    written = rejected = 0
    columns = list(workspace.columns)
    try:
        for part in workspace.parts():
            keys = [k for k in part[KEY].tolist() if isinstance(k, str)]
            states = workspace.states(keys)
            results = store.results(list(dict.fromkeys(keys)), enrichment_type, raw=False)
            rejects_of_part: list[tuple[str, str] | None] = []  # (code, detail) of each rejected row
            values: list[tuple[object, ...]] = []
            for key, detail, code in zip(
                part[KEY].tolist(), part[REJECT].tolist(), part[REJECT_CODE].tolist(), strict=True
            ):
                if not isinstance(key, str):
                    known = code if isinstance(code, str) else RejectCode.UNPARSABLE.value
                    rejects_of_part.append((known, detail if isinstance(detail, str) else "invalid row"))
                    values.append(())
                    continue
                state = states.get(key)
                if state is not None and state[0] is ContactState.QUARANTINED:
                    rejects_of_part.append(
                        (RejectCode.REFUSED_BY_API.value, state[1] or "refused by the API")
                    )
                    values.append(())
                    continue
                rejects_of_part.append(None)
                row = _result_columns(state, results.get(key))
                statuses[str(row[0])] = statuses.get(str(row[0]), 0) + 1
                values.append(row)
            reasons = [r[1] if r is not None else None for r in rejects_of_part]
            is_reject = pd.Series([r is not None for r in reasons], index=part.index)
            bad = part.loc[is_reject, columns].copy()
            bad[REJECT_CODE_COLUMN] = [r[0] for r in rejects_of_part if r is not None]
            bad[REJECT_REASON] = [r[1] for r in rejects_of_part if r is not None]
            good = part.loc[~is_reject, columns].copy()
            if output.wants_keys:
                good["cleanlist_contact_key"] = part.loc[~is_reject, KEY]
            kept = [v for v, r in zip(values, reasons, strict=True) if r is None]
            for i, name in enumerate(RESULT_COLUMNS):
                good[name] = pd.Series([v[i] for v in kept], index=good.index, dtype="object")
            output.write(good)
            rejects.write(bad)
            for code in bad[REJECT_CODE_COLUMN]:
                reasons_seen[code] = reasons_seen.get(code, 0) + 1
            written += len(good)
            rejected += len(bad)
        output.commit([*columns, *RESULT_COLUMNS])
        rejects.commit([*columns, REJECT_CODE_COLUMN, REJECT_REASON])
    except BaseException:
        output.abort()
        rejects.abort()
        raise
    return WriteReport(written, rejected, statuses, reasons_seen)
