"""The closed vocabularies of a run: where a contact stands, how a chunk ended, how a run ended, why a
row was rejected. Each is a `StrEnum`, so values read the same in the workspace, the store, logs and
summaries as the plain strings they replace.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ContactState(enum.StrEnum):
    """Where one unique contact of a run stands (the workspace keeps one per contact)."""

    NEW = "new"  # staged, not yet planned
    FRESH = "fresh"  # the store holds a result young enough
    IN_FLIGHT = "in_flight"  # an earlier run's workflow holds it: poll, never resubmit
    HELD = "held"  # another live run claimed it and has not submitted it yet
    PLANNED = "planned"  # in a chunk waiting to be submitted
    ACCEPTED = "accepted"  # the API accepted it in this run; its answer has not come yet
    RESULTED = "resulted"  # its answer arrived in this run (from this run's workflow or an earlier one's)
    UNRESOLVED = "unresolved"  # its workflow ended without its answer: paid, owed, asked again next run
    QUARANTINED = "quarantined"  # the API refused it (422): its rows go to rejects
    SKIPPED_BUDGET = "skipped_budget"  # --max-credits reached before its chunk
    NOT_SUBMITTED = "not_submitted"  # the run stopped (401/403/402 timeout, a stop request) before its chunk
    ERROR = "error"  # its chunk failed for good (400, retries exhausted)


class ChunkStatus(enum.StrEnum):
    """How one submit-chunk task ended."""

    ACCEPTED = "accepted"  # the API accepted what was left to send
    DEFERRED = "deferred"  # not sent: the gate is closed; the chunk waits for the pause to end
    NOTHING_TO_SEND = "nothing_to_send"  # every contact was fresh, in flight, held elsewhere or refused


class StopReason(enum.StrEnum):
    """Why the submit loop left chunks unsubmitted."""

    FAILED = "failed"  # 401/403 closed the gate for good
    BUDGET_REACHED = "budget_reached"  # --max-credits would be exceeded by the next chunk
    CREDITS_TIMEOUT = "credits_timeout"  # paused on 402 and never topped up in time
    STOPPED = "stopped"  # SIGTERM, SIGINT or a Prefect cancellation asked the run to stop


class RunStatus(enum.StrEnum):
    """How an enrich-contacts run ended (the summary's `status`)."""

    COMPLETED = "completed"
    # Some chunks failed for good (a rerun retries them), or contacts of workflows the API no longer knows
    # are unresolved (a rerun asks for them by task id): exit 1.
    COMPLETED_WITH_ERRORS = "completed_with_errors"
    BUDGET_REACHED = "budget_reached"
    CREDITS_EXHAUSTED = "credits_exhausted"
    # Rows the run could not settle are still pending: held by another live run, or accepted and not
    # answered yet. Exit 3; the cursor mark does not move; a rerun finishes them.
    INCOMPLETE = "incomplete"
    FAILED = "failed"
    # Stopped on request (SIGTERM, SIGINT, Prefect cancellation): what arrived was written, the rest is
    # reported and left for a rerun; exit 130.
    INTERRUPTED = "interrupted"
    DRY_RUN = "dry_run"

    @classmethod
    def after_submitting(  # noqa: PLR0911 - one answer per line of the order of precedence
        cls,
        *,
        fatal: bool,
        stop: StopReason | None,
        chunks_failed: int,
        unknown_to_api: int = 0,
        unsettled_rows: int = 0,
    ) -> RunStatus:
        """The final status once every chunk was settled or left over.

        `unknown_to_api`: contacts left unresolved because the API answered 404 for their workflow; such
        a run is not "completed", whatever else it reached. `unsettled_rows`: rows still pending at the
        end (held by another live run, or accepted without an answer yet): not "completed" either.
        """
        if fatal:
            return cls.FAILED
        if stop in (StopReason.STOPPED, StopReason.CREDITS_TIMEOUT):
            return cls.INTERRUPTED if stop is StopReason.STOPPED else cls.CREDITS_EXHAUSTED
        if unknown_to_api:
            return cls.COMPLETED_WITH_ERRORS
        if stop is StopReason.BUDGET_REACHED:
            return cls.BUDGET_REACHED
        if chunks_failed:
            return cls.COMPLETED_WITH_ERRORS
        if unsettled_rows:
            return cls.INCOMPLETE
        return cls.COMPLETED


class RejectCode(enum.StrEnum):
    """Why a row went to rejects; the rejects file's `reject_code` column, for filtering."""

    MISSING_FIELDS = "missing_fields"  # neither linkedin_url nor first + last + company
    FIELD_TOO_LONG = "field_too_long"  # a field longer than the API takes
    UNPARSABLE = "unparsable"  # the parser could not read the row (wrong field count, bad JSON)
    REFUSED_BY_API = "refused_by_api"  # the API answered 422 for this contact
    # The row's cursor value does not fit the cursor's kind (`n/a` in a numeric cursor): never a mark.
    BAD_CURSOR_VALUE = "bad_cursor_value"

    @property
    def label(self) -> str:
        return self.value.replace("_", " ")


@dataclass(frozen=True, slots=True)
class Reject:
    """A rejected row's code (what kind) and detail (the one-line reason shown beside it)."""

    code: RejectCode
    detail: str
