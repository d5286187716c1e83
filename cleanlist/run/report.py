"""The run report a person reads in ten seconds: a pure function from a `RunSummary` to its text.

Told in the order a person asks: what came of it (the headline), where the rows went (the funnel),
what needs them (only when something does, each item with the one thing to do), what it cost, how fast
it went. `report_markdown` is the Prefect artifact, `report_text` the CLI's end-of-run output; both say
the same numbers, all read from the summary (nothing is counted here).
"""

from __future__ import annotations

from dataclasses import dataclass

from cleanlist.constants import PRICING
from cleanlist.run.summary import RunSummary
from cleanlist.vocab import RunStatus

NEEDS_YOU_TITLE = "What needs you"


@dataclass(frozen=True)
class Attention:
    """One item of "what needs you": what happened, and the one thing to do about it."""

    what: str
    remedy: str


@dataclass(frozen=True)
class RunReport:
    headline: str
    funnel: list[tuple[str, str]]  # (step, count with its detail)
    needs_you: list[Attention]
    cost: str
    pace: str


def count(value: float) -> str:
    """`1,234`, `700.5`: thousands separated, no trailing zeros."""
    text = f"{value:,.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def duration(seconds: float) -> str:
    """`12 s`, `1 min 12 s`, `2 h 5 min` (rounded to the second)."""
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def share(part: float, whole: float) -> str:
    # Half up, as people round (306 of 400 is 77 %), not to even.
    return f"{int(100 * part / whole + 0.5)} %" if whole > 0 else "–"


def _found(summary: RunSummary) -> str:
    parts = [f"{count(summary.emails_found)} emails ({share(summary.emails_found, summary.submitted)})"]
    if summary.phones_found:
        parts.append(
            f"{count(summary.phones_found)} phones ({share(summary.phones_found, summary.submitted)})"
        )
    return ", ".join(parts)


def headline(summary: RunSummary) -> str:
    """`400 contacts → 306 emails (77 %) for 306 credits in 1 min 12 s — completed`."""
    status = summary.status.value.replace("_", " ")
    return (
        f"{count(summary.submitted)} contacts → {_found(summary)} for {count(summary.credits_spent)} "
        f"credits in {duration(summary.seconds)} — {status}"
    )


def funnel(summary: RunSummary) -> list[tuple[str, str]]:
    ranked = sorted(summary.rejects_by_reason.items(), key=lambda kv: (-kv[1], kv[0]))
    reasons = ", ".join(f"{count(n)} {code.replace('_', ' ')}" for code, n in ranked)
    steps = [
        ("rows read", count(summary.rows_read)),
        ("rejected", count(summary.rejected) + (f" ({reasons})" if reasons else "")),
        ("duplicates", count(summary.duplicates)),
        ("fresh in store", count(summary.fresh_in_store) + " (not sent, not charged)"),
        ("submitted", count(summary.submitted)),
        ("found", _found(summary)),
    ]
    if summary.resumed_in_flight:
        steps.insert(4, ("resumed from earlier runs", count(summary.resumed_in_flight)))
    return steps


def in_doubt_credits(summary: RunSummary) -> float | None:
    """The most the requests in doubt can cost if the API charged them twice (None: type unknown)."""
    pricing = PRICING.get(summary.enrichment_type)
    return None if pricing is None else summary.ambiguous_contacts * pricing.worst_case_per_contact


def needs_you(summary: RunSummary) -> list[Attention]:
    """What a person must act on, each with its one remedy; empty for a clean run."""
    items: list[Attention] = []
    if summary.unresolved:
        items.append(
            Attention(
                f"{count(summary.unresolved)} contacts unresolved (paid for, answer still owed)",
                "rerun the same command: it asks for them by task id, without paying again",
            )
        )
    if summary.ambiguous_submissions:
        worst = in_doubt_credits(summary)
        cost = f"up to {count(worst)} credits" if worst is not None else "their worst case"
        items.append(
            Attention(
                f"{count(summary.ambiguous_submissions)} request(s) in doubt: "
                f"{count(summary.ambiguous_contacts)} contacts whose answer was lost after sending "
                f"may be charged twice ({cost})",
                "they were resent (nothing lost); check your Cleanlist usage for a double charge "
                "and ask for it back",
            )
        )
    if summary.chunks_failed:
        items.append(
            Attention(
                f"{count(summary.chunks_failed)} chunk(s) failed for good; their rows are marked 'error'",
                "rerun the same command: failed chunks are retried, nothing found is paid again",
            )
        )
    if summary.quarantined:
        items.append(
            Attention(
                f"{count(summary.quarantined)} rows refused by the API (quarantined)",
                f"fix them in the rejects file `{summary.rejects}` and run it as a source",
            )
        )
    if summary.unsettled_rows:
        items.append(
            Attention(
                f"{count(summary.unsettled_rows)} rows still pending "
                f"({count(summary.held_by_other_runs)} held by another run, "
                f"{count(summary.awaiting_answers)} awaiting answers)",
                "rerun once the other run has finished: it collects them without paying again",
            )
        )
    if summary.status is RunStatus.INTERRUPTED:
        items.append(
            Attention("the run was stopped before it finished", "rerun the same command to finish it")
        )
    if summary.status is RunStatus.BUDGET_REACHED:
        items.append(
            Attention(
                f"the credit cap of {count(summary.credit_cap or 0)} was reached "
                "before every contact was sent",
                "raise --max-credits and rerun: contacts already found are not paid again",
            )
        )
    if summary.pauses or summary.status is RunStatus.CREDITS_EXHAUSTED:
        ended = "and was not topped up in time" if summary.status is RunStatus.CREDITS_EXHAUSTED else ""
        items.append(
            Attention(
                f"the run paused {summary.pauses} time(s) for credits {ended}".rstrip(),
                "top up the Cleanlist balance before the next run"
                + (" and rerun" if summary.status is RunStatus.CREDITS_EXHAUSTED else ""),
            )
        )
    if summary.learned_limits:
        items.append(
            Attention(
                f"the API allowed fewer requests than configured ({summary.rate_limit}): "
                f"paced by {summary.learned_limits}",
                "set --rate-limit to the learned limit, or ask Cleanlist to raise yours",
            )
        )
    # The deliveries log's verdict (cleanlist/webhooks/failures.py): kind → deliveries that failed.
    failed_deliveries = sum(summary.webhook_failures.values())
    if failed_deliveries:
        reasons = "; ".join(summary.webhook_failure_report) or ", ".join(
            f"{count(n)} {kind}" for kind, n in summary.webhook_failures.items()
        )
        items.append(
            Attention(
                f"{count(failed_deliveries)} webhook deliveries failed ({reasons}); "
                f"{count(summary.webhook_failed_for_good)} workflows were polled instead",
                "fix the receiver the deliveries log names (reachable over HTTPS from the internet, "
                "answering 2xx once stored)",
            )
        )
    return items


def cost(summary: RunSummary) -> str:
    parts = [f"{count(summary.credits_spent)} credits"]
    if summary.emails_found:
        parts.append(f"{summary.credits_spent / summary.emails_found:,.2f} per email found")
    if summary.phones_found:
        parts.append(f"{summary.credits_spent / summary.phones_found:,.2f} per phone found")
    if summary.credit_cap is not None:
        parts.append(
            f"cap {count(summary.credit_cap)} ({share(summary.credits_spent, summary.credit_cap)} used)"
        )
    if summary.balance_left is not None:
        parts.append(f"balance left {count(summary.balance_left)}")
    return "; ".join(parts)


def _ceiling(rate_limit: str) -> str:
    requests, slash, seconds = rate_limit.removesuffix("s").partition("/")
    if not slash:
        return rate_limit or "unknown"
    if requests == "auto":
        return f"learned from the API (window {seconds} s)"
    return f"{requests} requests / {seconds} s"


def _per_second(limit: str) -> float | None:
    """Requests a second of `N/SECONDS` or `N/SECONDSs` (None: `auto`, or not a limit)."""
    requests, slash, seconds = limit.removesuffix("s").partition("/")
    try:
        value = int(requests) / float(seconds)
    except (ValueError, ZeroDivisionError):
        return None
    return value if slash and value > 0 else None


def pace(summary: RunSummary) -> str:
    """Contacts a second against the ceiling in force: the bulk endpoint's limit (the learned one when
    the run learned one) times the contacts a bulk request carried on average."""
    rate = summary.submitted / summary.seconds if summary.seconds > 0 else 0.0
    text = f"{rate:,.1f} contacts/s"
    learned = summary.rate_limits_learned.get("enrich-bulk")
    limit = learned or summary.rate_limit
    per_second = _per_second(limit)
    if per_second is not None and summary.workflows:
        per_request = summary.submitted / summary.workflows
        text += (
            f" against a ceiling of {per_second * per_request:,.1f} contacts/s "
            f"(bulk {_ceiling(limit)}{', learned' if learned else ''}, {per_request:,.0f} contacts each)"
        )
    else:
        text += f"; rate ceiling {_ceiling(summary.rate_limit)} per endpoint"
    return text


def run_report(summary: RunSummary) -> RunReport:
    return RunReport(headline(summary), funnel(summary), needs_you(summary), cost(summary), pace(summary))


def report_text(summary: RunSummary) -> str:
    """The CLI's end-of-run output: the headline first, one screen at most."""
    report = run_report(summary)
    lines = [report.headline, ""]
    width = max(len(step) for step, _ in report.funnel)
    lines += [f"  {step:<{width}}  {value}" for step, value in report.funnel]
    if report.needs_you:
        lines += ["", f"{NEEDS_YOU_TITLE}:"]
        lines += [f"  ! {item.what}\n    → {item.remedy}" for item in report.needs_you]
    lines += ["", f"Cost: {report.cost}", f"Pace: {report.pace}"]
    if summary.output:
        lines.append(f"Output: {summary.output} (rejects: {summary.rejects})")
    return "\n".join(lines)


def report_markdown(summary: RunSummary) -> str:
    """The Prefect markdown artifact."""
    report = run_report(summary)
    lines = [f"## {report.headline}", "", "| funnel | |", "|---|---|"]
    lines += [f"| {step} | {value} |" for step, value in report.funnel]
    if report.needs_you:
        lines += ["", f"### {NEEDS_YOU_TITLE}", ""]
        lines += [f"- **{item.what}** — {item.remedy}" for item in report.needs_you]
    lines += ["", f"**Cost:** {report.cost}", "", f"**Pace:** {report.pace}"]
    if summary.output:
        lines += ["", f"Output: `{summary.output}` — rejects: `{summary.rejects}`"]
    if summary.cursor_mark_new is not None or summary.cursor_mark_used is not None:
        lines += [
            "",
            f"Incremental: read past `{summary.cursor_mark_used or '(every row)'}`; "
            f"{count(summary.skipped_by_cursor)} rows handled by earlier runs were left out; "
            f"mark now `{summary.cursor_mark_new}`",
        ]
    return "\n".join(lines)
