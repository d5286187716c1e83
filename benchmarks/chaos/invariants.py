"""The six invariants of issue 23, each a plain function over what a schedule observed.

Nothing here imports the product: the facts are files (output and rejects rows), the runs' exit codes,
stderr and `--json` summaries, what the API stand-in saw (the sandbox's counters, and the harness's own
proxy log of every bulk request: when it started, when its answer was handed back, what the API answered),
the store's ledger (workflows recorded), and the texts a secret could leak into. Each function returns
the violations it found as one-line messages (empty: the invariant holds), so each can be unit-tested on
synthetic facts and each can fail.

A new mechanism (a source kind, an API reading, a process event) adds its faults to the schedule
generator (`benchmarks/chaos/schedule.py`); the invariants below stay what the project promises.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# cleanlist_status values that say a row is settled: the API answered for it, or it was refused.
UNSETTLED_STATUSES = frozenset({"pending", "not_submitted", "skipped_budget", ""})
README = Path(__file__).resolve().parents[2] / "README.md"
# The README's "Exit codes:" paragraph is the one list: "0 success …, 2 when …, 3 when …, 130 when …, 1 for
# any other failure" (each code is a number followed by what it means).
_EXIT_CODES_PARAGRAPH = re.compile(r"^Exit codes:(?P<text>.*?)(?:\n\s*\n|\Z)", re.M | re.S)
_EXIT_CODE = re.compile(r"(?:^|[:,])\s*(?P<code>\d+)\s+(?:success|when|for)\b")


def documented_exit_codes(readme: str) -> frozenset[int]:
    """The exit codes the README's "Exit codes:" paragraph documents (an error if it has none)."""
    paragraph = _EXIT_CODES_PARAGRAPH.search(readme)
    codes = frozenset(int(m["code"]) for m in _EXIT_CODE.finditer(paragraph["text"] if paragraph else ""))
    if not codes:
        raise RuntimeError(f"{README}: no 'Exit codes:' paragraph to check exit codes against")
    return codes


DOCUMENTED_EXIT_CODES = documented_exit_codes(README.read_text(encoding="utf-8"))
# After SIGTERM a run may also end with SIGTERM's conventional code (128 + 15).
DOCUMENTED_SIGNAL_EXIT_CODES = DOCUMENTED_EXIT_CODES | {143}
SIGNAL_BOUND_SECONDS = 30.0
# A request whose handling at the API ended this close before a process died may have had its answer
# lost on the way back (the process was killed between the answer leaving and being read).
ANSWER_IN_TRANSIT_SECONDS = 1.0
# How long before a kill -9 a request's journalled intent may be and the body still not have reached the
# API: the intent is written right before the body goes on the wire (cleanlist/run/journal.py), and on a
# loaded machine the process may be descheduled in between. Older intents were sent (or were written
# too early: the overstated doubt of 5a78a01, seed 3596567) and get no allowance.
SEND_WINDOW_SECONDS = 1.0
CONTACTS_PER_REQUEST = 250
ROW_ID = "Record ID"
TRACEBACK = "Traceback (most recent call last)"


@dataclass(frozen=True)
class Violation:
    """One broken invariant in one schedule."""

    invariant: str
    message: str


@dataclass
class RunFacts:
    """One CLI run of a schedule, as the harness saw it from outside."""

    label: str
    exit_code: int | None
    """The process's exit code (negative: killed by that signal); None when it never ended in its bound."""
    summary: dict[str, Any] | None
    """The `--json` summary, when the run printed one."""
    stderr: str = ""
    signal: str | None = None
    """SIGTERM / SIGINT / SIGKILL sent by the schedule (None: none)."""
    signalled_at: float | None = None
    ended_at: float | None = None
    started_at: float = 0.0
    bound_seconds: float = 120.0
    leftover_processes: list[str] = field(default_factory=list)
    output_rows: list[dict[str, str]] | None = None
    reject_rows: list[dict[str, str]] | None = None
    library: bool = False
    cpu_seconds: float | None = None
    """User + system CPU of the run's process tree (what it costs a quiet machine)."""
    other_store: bool = False
    """A run of the same source on another store path (event `other_store`): its store pays for its own
    contacts by design, so its rows, payments and mark are its store's, not the schedule's store's."""
    workflows_recorded: int = 0
    """For a run on another store: the workflows in that store's ledger at the end."""
    intents_at_death: int = 0
    """For a run killed -9: its journal's unsettled intents written within the send window before the
    kill (requests whose body may not have left yet; see `SEND_WINDOW_SECONDS` in runner.py)."""
    """A user's program calling `enrich_dataframe` (not the CLI): it raises what ended the run, and a
    signal the program does not handle ends it the way Python does (-15, a KeyboardInterrupt trace)."""

    @property
    def status(self) -> str | None:
        return None if self.summary is None else str(self.summary.get("status"))

    @property
    def completed(self) -> bool:
        return self.status == "completed"


@dataclass(frozen=True)
class BulkRequest:
    """One POST /enrich/bulk as the API's front door (the harness's proxy) saw it."""

    started: float
    ended: float
    status: int | None
    """The API's answer; None when it never answered (the request did not reach it)."""


@dataclass
class ScheduleFacts:
    """Everything one schedule observed, once its runs are over."""

    seed: int
    input_rows: dict[str, str | None]
    """Row id → its cursor value as written to the source (None: the source has no cursor column)."""
    cursor_kind: str | None = None
    """'int' or 'timestamp' when the runs used a cursor."""
    runs: list[RunFacts] = field(default_factory=list)
    bulk_requests: list[BulkRequest] = field(default_factory=list)
    workflows_recorded: int = 0
    """Distinct workflows in the store's ledger at the end (each from an answer some run read)."""
    contacts_accepted_more_than_once: int = 0
    credits_charged: float = 0.0
    credits_never_asked: float = 0.0
    """Credits the API charged for workflows no client ever asked about (their answers were lost)."""
    email_credit: float = 1.0
    phone_credit: float = 0.0
    secrets: list[str] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)
    """Where a secret could leak: name → text (logs, outputs, files, Prefect records)."""
    source_refused: bool = False
    """The source was refused with one line before anything was sent (a legitimate end)."""

    @property
    def death_moments(self) -> list[float]:
        """When a run was signalled or ended killed (the moments an answer in transit could be lost)."""
        moments = [run.signalled_at for run in self.runs if run.signalled_at is not None]
        moments += [
            run.ended_at for run in self.runs if run.ended_at is not None and (run.exit_code or 0) < 0
        ]
        return moments


def _rows(run: RunFacts) -> list[dict[str, str]]:
    return [*(run.output_rows or []), *(run.reject_rows or [])]


def _status(row: dict[str, str]) -> str:
    if row.get("reject_code"):
        return "rejected"
    return (row.get("cleanlist_status") or "").strip()


def rows_accounted(facts: ScheduleFacts) -> list[str]:
    """1. Every input row is in output or rejects exactly once with a true status; never `pending` (or
    not submitted) in a run that says `completed`; once the reruns are over, every row is settled."""
    problems: list[str] = []
    settled: dict[str, str] = {}
    for run in facts.runs:
        if run.output_rows is None and run.reject_rows is None:
            continue
        rows = _rows(run)
        ids = [row.get(ROW_ID, "") for row in rows]
        repeated = {i for i in ids if ids.count(i) > 1}
        if repeated:
            problems.append(
                f"{run.label}: {len(repeated)} row(s) written more than once, e.g. {sorted(repeated)[0]}"
            )
        unknown = set(ids) - set(facts.input_rows)
        if unknown:
            problems.append(
                f"{run.label}: {len(unknown)} row(s) not in the source, e.g. {sorted(unknown)[0]}"
            )
        if not run.completed:
            continue
        skipped = int((run.summary or {}).get("skipped_by_cursor") or 0)
        if run.other_store:
            # Its own store starts empty: it must write every row (nothing is skipped by another's mark).
            skipped = 0
        if len(set(ids)) + skipped != len(facts.input_rows):
            problems.append(
                f"{run.label}: completed with {len(set(ids))} rows written + {skipped} skipped by the cursor "
                f"for {len(facts.input_rows)} input rows"
            )
        unsettled = [row for row in rows if _status(row) in UNSETTLED_STATUSES]
        if unsettled:
            words = sorted({_status(row) or "(empty)" for row in unsettled})
            problems.append(f"{run.label}: says completed with {len(unsettled)} row(s) {'/'.join(words)}")
        for row in rows:
            if _status(row) not in UNSETTLED_STATUSES and not run.other_store:
                settled[row.get(ROW_ID, "")] = _status(row)
    if facts.source_refused:
        return problems
    never = [row_id for row_id in facts.input_rows if row_id not in settled]
    if never:
        ended = facts.runs[-1].status if facts.runs else None  # the last run is on the schedule's store
        problems.append(
            f"after {len(facts.runs)} run(s) (last: {ended}) {len(never)} input row(s) never settled in a "
            f"completed run, e.g. {never[0]}"
        )
    return problems


def paid_at_most_in_doubt(facts: ScheduleFacts) -> list[str]:
    """2. Contacts the API accepted more than once ≤ the contacts the runs reported in doubt (≤ 250 × the
    requests); and the requests reported in doubt ≤ the bulk requests the API received whose answer may
    have been lost (accepted and never recorded, answered with anything but 429, or in transit when a
    process died)."""
    problems: list[str] = []
    summaries = [run.summary for run in facts.runs if run.summary is not None]
    doubt_requests = sum(int(s.get("ambiguous_submissions") or 0) for s in summaries)
    doubt_contacts = sum(int(s.get("ambiguous_contacts") or 0) for s in summaries)
    twice = facts.contacts_accepted_more_than_once
    # A run on another store pays again for what it sends, by design: each contact it submitted once.
    elsewhere = sum(int((run.summary or {}).get("submitted") or 0) for run in facts.runs if run.other_store)
    if twice > min(doubt_contacts, CONTACTS_PER_REQUEST * doubt_requests) + elsewhere:
        problems.append(
            f"the API accepted {twice} contact(s) more than once; the runs reported {doubt_requests} "
            f"request(s) ({doubt_contacts} contacts) in doubt"
            + (f", and a run on another store submitted {elsewhere}" if elsewhere else "")
        )
    deaths = facts.death_moments

    def in_transit(request: BulkRequest) -> bool:
        return any(
            request.started <= moment <= request.ended + ANSWER_IN_TRANSIT_SECONDS for moment in deaths
        )

    accepted = sum(1 for r in facts.bulk_requests if r.status == 200)
    other = sum(1 for r in facts.bulk_requests if r.status not in (200, 429, None))
    transit = sum(1 for r in facts.bulk_requests if r.status in (429, None) and in_transit(r))
    recorded = facts.workflows_recorded + sum(run.workflows_recorded for run in facts.runs if run.other_store)
    # A request killed between its journalled intent and its body reaching the API is rightly in doubt
    # (nobody can tell it never left); allowed only for intents written moments before a kill -9.
    unsent = sum(run.intents_at_death for run in facts.runs)
    could_be_lost = max(0, accepted - recorded) + other + transit + unsent
    if doubt_requests > could_be_lost:
        problems.append(
            f"the runs reported {doubt_requests} request(s) in doubt; at most {could_be_lost} bulk request(s) "
            f"reached the API with an answer that may have been lost ({accepted} accepted, "
            f"{recorded} recorded, {other} other non-429 answers, {transit} in transit at a death, "
            f"{unsent} killed within {SEND_WINDOW_SECONDS:g} s of their intent)"
        )
    return problems


def _credits_of(row: dict[str, str], facts: ScheduleFacts) -> float:
    email = facts.email_credit if (row.get("cleanlist_email") or "").strip() else 0.0
    phone = facts.phone_credit if (row.get("cleanlist_phones") or "").strip() else 0.0
    return email + phone


def paid_is_written(facts: ScheduleFacts) -> list[str]:
    """3. Every credit the API charged is a found item in some output row (by task id), except what the
    API charged again for contacts it accepted more than once, or charged for workflows nobody ever asked
    about (answers lost) up to the contacts the runs reported in doubt."""
    written: dict[str, float] = {}
    for run in facts.runs:
        for row in run.output_rows or []:
            task = (row.get("cleanlist_task_id") or "").strip()
            if task:
                written[task] = max(written.get(task, 0.0), _credits_of(row, facts))
    in_output = sum(written.values())
    per_contact = facts.email_credit + facts.phone_credit
    repeats = facts.contacts_accepted_more_than_once * per_contact
    # A request whose answer was lost (reported in doubt) was paid for and nobody can read it: allowed up
    # to what the runs reported in doubt. Usually its contacts are sent again and count as repeats (the
    # same payment); when the resend is not charged (its workflow failed), they do not (seed 1998011).
    doubt_contacts = sum(int((run.summary or {}).get("ambiguous_contacts") or 0) for run in facts.runs)
    lost_answers = min(facts.credits_never_asked, doubt_contacts * per_contact)
    excused = max(repeats, lost_answers)
    missing = facts.credits_charged - in_output - excused
    if missing > 1e-6:
        return [
            f"the API charged {facts.credits_charged:g} credits; found items in output rows are worth "
            f"{in_output:g} (+ {excused:g} for contacts accepted more than once or answers lost in doubt): "
            f"{missing:g} paid and lost"
        ]
    return []


def _cursor_key(value: str | None, kind: str | None) -> float | None:
    """A cursor value in the column's own order; None when it is not a value of that kind."""
    if value is None:
        return None
    text = value.strip()
    try:
        if kind == "int":
            return float(int(text))
        if kind == "timestamp":
            moment = datetime.fromisoformat(text)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            return moment.timestamp()
    except ValueError:
        return None
    return None


def mark_never_passes_unsettled(facts: ScheduleFacts) -> list[str]:
    """4. When a completed run sets a cursor mark, every row at or below it is settled by then (rejects
    count as settled). A mark that is not a value of the column's kind passes every row."""
    if facts.cursor_kind is None:
        return []
    problems: list[str] = []
    for other_store in (False, True):  # each store keeps its own mark over the rows it settled
        runs = [run for run in facts.runs if run.other_store is other_store]
        problems += _marks_over_settled(facts, runs)
    return problems


def _marks_over_settled(facts: ScheduleFacts, runs: list[RunFacts]) -> list[str]:
    problems: list[str] = []
    settled: set[str] = set()
    # In the order the runs ended: of two runs at once, the one that ends second may skip (by the mark)
    # what the first settled, and its own mark then passes rows settled by the other.
    for run in sorted(runs, key=lambda r: float("inf") if r.ended_at is None else r.ended_at):
        if run.completed:
            settled |= {row.get(ROW_ID, "") for row in _rows(run) if _status(row) not in UNSETTLED_STATUSES}
        mark = (run.summary or {}).get("cursor_mark_new")
        if mark is None or not run.completed:
            continue
        limit = _cursor_key(str(mark), facts.cursor_kind)
        passed = [
            row_id
            for row_id, value in facts.input_rows.items()
            if limit is None or ((key := _cursor_key(value, facts.cursor_kind)) is not None and key <= limit)
        ]
        behind = [row_id for row_id in passed if row_id not in settled]
        if behind:
            problems.append(
                f"{run.label}: cursor mark {mark!r} passes {len(behind)} row(s) not settled, e.g. {behind[0]}"
            )
    return problems


def _escaped_forms(secret: str) -> set[str]:
    # The secret itself and the core of it without surrounding whitespace: a repr or JSON escape of a
    # trailing newline changes only the end, so the stripped text is what gives it away.
    return {form for form in (secret, secret.strip()) if len(form) >= 8}


def no_secret_anywhere(facts: ScheduleFacts) -> list[str]:
    """5. No API key or database password in any output, log line, Prefect record or file outside the
    store."""
    problems: list[str] = []
    for name, text in facts.texts.items():
        for secret in facts.secrets:
            if any(form in text for form in _escaped_forms(secret)):
                problems.append(f"a secret ({secret.strip()[:6]}…) appears in {name}")
                break
    return problems


def runs_end(facts: ScheduleFacts) -> list[str]:
    """6. Every run ends within its bound (30 s after SIGTERM/SIGINT), with a documented exit code, in
    one line (no traceback), leaving no process behind. A kill -9 is exempt from all but its bound."""
    problems: list[str] = []
    for run in facts.runs:
        if run.exit_code is None:
            problems.append(f"{run.label}: did not end within {run.bound_seconds:g} s")
            continue
        if run.signal == "SIGKILL":
            continue
        if run.signal in ("SIGTERM", "SIGINT"):
            assert run.signalled_at is not None and run.ended_at is not None
            took = run.ended_at - run.signalled_at
            if took > SIGNAL_BOUND_SECONDS:
                problems.append(f"{run.label}: ended {took:.0f} s after {run.signal} (bound 30 s)")
            if run.exit_code not in DOCUMENTED_SIGNAL_EXIT_CODES and not (
                run.library and run.exit_code in (-15, -2)
            ):
                problems.append(
                    f"{run.label}: exit code {run.exit_code} after {run.signal} is not documented"
                )
        elif run.exit_code not in DOCUMENTED_EXIT_CODES:
            problems.append(f"{run.label}: exit code {run.exit_code} is not documented")
        if TRACEBACK in run.stderr and not (run.library and run.signal is not None):
            problems.append(f"{run.label}: a traceback instead of one line: {last_line(run.stderr)!r}")
        if run.leftover_processes:
            problems.append(f"{run.label}: left {', '.join(run.leftover_processes)} running")
    return problems


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return re.sub(r"\s+", " ", lines[-1])[:160] if lines else ""


INVARIANTS: dict[str, Callable[[ScheduleFacts], list[str]]] = {
    "1 rows accounted": rows_accounted,
    "2 paid twice at most in doubt": paid_at_most_in_doubt,
    "3 nothing paid is lost": paid_is_written,
    "4 mark never passes unsettled": mark_never_passes_unsettled,
    "5 no secret anywhere": no_secret_anywhere,
    "6 every run ends": runs_end,
}


def check(facts: ScheduleFacts, only: Iterable[str] | None = None) -> list[Violation]:
    """Every invariant over one schedule's facts."""
    names: Sequence[str] = list(only) if only is not None else list(INVARIANTS)
    return [Violation(name, message) for name in names for message in INVARIANTS[name](facts)]
