"""The shared words of the project, defined once: where a contact stands (in a run's workspace and in the
store's ledger), how a chunk and a run ended, why a row was rejected, the API's final workflow words,
enrichment types, cursor kinds and marks, contact key kinds.

This is the bottom module: it imports nothing of `cleanlist`, and every layer may import it (see
docs/ARCHITECTURE.md, "Layers"). Each vocabulary is a `StrEnum`, so values read, compare and are stored
as the plain strings they replace (a stored value never changes).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datetime import datetime

    import pandas as pd


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


class LedgerState(enum.StrEnum):
    """Life of a contact row in the store: claimed (held by a run, not sent) → accepted (the API took it,
    money is spent) → done (a result is stored). A row being refreshed goes back to claimed but keeps
    its old result."""

    CLAIMED = "claimed"
    ACCEPTED = "accepted"
    DONE = "done"


class RunRecordState(enum.StrEnum):
    """A run's row in the store's `runs` table."""

    RUNNING = "running"


class FinalWord(enum.StrEnum):
    """The API's final words for a workflow (`status`), as the ledger spells them. The API may also say
    `canceled` (one l): `FinalWord.of` reads it as `cancelled`."""

    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @classmethod
    def of(cls, word: str) -> FinalWord | None:
        """The final word `word` names (any case, either spelling of cancelled), or None."""
        return _FINAL_SPELLINGS.get(word.lower())

    @property
    def answers_nothing(self) -> bool:
        """A workflow that ended so answers none of its tasks (failed lookups are free)."""
        return self is not FinalWord.COMPLETED


_FINAL_SPELLINGS: dict[str, FinalWord] = {
    **{word.value: word for word in FinalWord},
    "canceled": FinalWord.CANCELLED,
}


class WorkflowState(enum.StrEnum):
    """A workflow's state in the store's ledger. Open ones still owe results: a later run must poll
    them, never resubmit."""

    ACCEPTED = "accepted"
    TIMED_OUT = "timed_out"
    # Final on the API's side, but some tasks were never answered: their contacts stay in flight (paid
    # for) until a later run gets their answers by task id, or the API says it does not know them.
    UNRESOLVED = "unresolved"
    COMPLETED = FinalWord.COMPLETED.value
    FAILED = FinalWord.FAILED.value
    CANCELLED = FinalWord.CANCELLED.value
    NOT_FOUND = "not_found"

    @property
    def is_open(self) -> bool:
        return self in (WorkflowState.ACCEPTED, WorkflowState.TIMED_OUT, WorkflowState.UNRESOLVED)


OPEN_WORKFLOW_STATES: frozenset[WorkflowState] = frozenset(state for state in WorkflowState if state.is_open)
CLOSED_WORKFLOW_STATES: frozenset[WorkflowState] = frozenset(WorkflowState) - OPEN_WORKFLOW_STATES


class EnrichmentType(enum.StrEnum):
    """What the API looks up for each contact (`enrichment_type` of a bulk request, and of a stored
    result: a result is fresh only for the type it was obtained with)."""

    NONE = "none"
    PARTIAL = "partial"
    PHONE_ONLY = "phone_only"
    FULL = "full"
    PROSPECTING_ONLY = "prospecting_only"


class ContactKeyKind(enum.StrEnum):
    """The two kinds of contact key (dedup, store and join identity): `li:<slug>` or
    `nm:<first>|<last>|<org>`."""

    LINKEDIN = "li"
    NAME = "nm"

    @property
    def prefix(self) -> str:
        return self.value + ":"

    def key(self, body: str) -> str:
        return self.prefix + body


class CursorKind(enum.StrEnum):
    """The kind of an incremental read's cursor, kept with its mark (see `cleanlist/io/cursor.py`)."""

    NUMBER = "number"
    TIMESTAMP = "timestamp"
    TEXT = "text"

    @property
    def noun(self) -> str:
        return {"number": "a number", "timestamp": "an ISO 8601 timestamp", "text": "text"}[self.value]


@dataclass(frozen=True)
class Watermark:
    """A cursor value as the store keeps it: its kind and its canonical text (timestamps in UTC)."""

    kind: CursorKind
    text: str

    def value(self) -> int | float | pd.Timestamp | str:
        """The mark as a comparable value (timestamps: aware, UTC; an old mark without offset is UTC)."""
        import pandas as pd

        if self.kind is CursorKind.NUMBER:
            return int(self.text) if re.fullmatch(r"-?\d+", self.text) else float(self.text)
        if self.kind is CursorKind.TIMESTAMP:
            return _utc(pd.Timestamp(self.text))
        return self.text

    def sql_value(self, *, naive: bool = False) -> int | float | datetime | str:
        """The mark as a bound SQL parameter; `naive`: for a `timestamp without time zone` column (UTC)."""
        import pandas as pd

        value = self.value()
        if isinstance(value, pd.Timestamp):
            moment: datetime = value.to_pydatetime(warn=False)
            return moment.replace(tzinfo=None) if naive else moment
        return value

    @classmethod
    def of(cls, kind: CursorKind, value: Any) -> Watermark:
        import numpy as np
        import pandas as pd

        if kind is CursorKind.NUMBER:
            if isinstance(value, int | np.integer):
                return cls(kind, str(int(value)))
            number = float(value)
            return cls(kind, str(int(number)) if number.is_integer() else repr(number))
        if kind is CursorKind.TIMESTAMP:
            return cls(kind, _utc(pd.Timestamp(value)).isoformat())
        return cls(kind, str(value))


def _utc(moment: pd.Timestamp) -> pd.Timestamp:
    return moment.tz_localize("UTC") if moment.tzinfo is None else moment.tz_convert("UTC")
