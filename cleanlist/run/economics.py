"""The economics across runs, as a person asks about them: what the enrichment cost, what it found, whether
the hit rate holds, how many contacts come due for refresh. Pure functions from the store's run records
(`cleanlist/store/economics.py`) to a table per run or per day, its totals and a sparkline; rendered as
terminal text (`cleanlist-enrich report`) and as markdown (the `cleanlist-economics` artifact).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, Literal

from cleanlist.errors import InputError
from cleanlist.run.report import count
from cleanlist.store.economics import RefreshDue, RunEconomics

Grouping = Literal["run", "day"]
ECONOMICS_KEY: Final = "cleanlist-economics"

_SPARKS: Final = "▁▂▃▄▅▆▇█"
_SINCE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([hdw])\s*$", re.IGNORECASE)
_UNIT_DAYS: Final = {"h": 1 / 24, "d": 1.0, "w": 7.0}


@dataclass(frozen=True)
class EconomicsRow:
    """One line of the table: a run, a day, or the totals."""

    label: str
    source: str
    runs: int
    submitted: int
    found: int
    credits: float

    @property
    def hit_rate(self) -> float | None:
        return self.found / self.submitted if self.submitted else None

    @property
    def cost_per_found(self) -> float | None:
        return self.credits / self.found if self.found else None


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`30d`, `12h`, `2w`, or a date (`2026-11-01`), as the aware UTC time it names."""
    now = now or datetime.now(UTC)
    match = _SINCE.match(text)
    if match:
        return now - timedelta(days=float(match[1]) * _UNIT_DAYS[match[2].lower()])
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InputError(f"--since {text!r} is not a span (30d, 12h, 2w) or a date (2026-11-01)") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _row(label: str, runs: Sequence[RunEconomics]) -> EconomicsRow:
    sources = {run.source.rsplit("/", 1)[-1] for run in runs}
    return EconomicsRow(
        label=label,
        source=sources.pop() if len(sources) == 1 else f"{len(sources)} sources",
        runs=len(runs),
        submitted=sum(run.submitted for run in runs),
        found=sum(run.found for run in runs),
        credits=sum(run.credits_spent for run in runs),
    )


def economics_rows(runs: Sequence[RunEconomics], by: Grouping) -> list[EconomicsRow]:
    """One row per run (oldest first) or per UTC day the runs started on."""
    if by == "run":
        return [_row(f"{run.started_at:%Y-%m-%d %H:%M} {run.run_id[:8]}", [run]) for run in runs]
    days: dict[str, list[RunEconomics]] = {}
    for run in runs:
        days.setdefault(f"{run.started_at:%Y-%m-%d}", []).append(run)
    return [_row(day, day_runs) for day, day_runs in days.items()]


def totals(runs: Sequence[RunEconomics]) -> EconomicsRow:
    return _row(f"total ({len(runs)} run{'' if len(runs) == 1 else 's'})", runs)


def sparkline(values: Sequence[float]) -> str:
    """`▁▃█▅`: each value's height between the smallest and the largest."""
    if not values:
        return ""
    low, high = min(values), max(values)
    if high == low:
        return _SPARKS[len(_SPARKS) // 2] * len(values)
    top = len(_SPARKS) - 1
    return "".join(_SPARKS[round((value - low) / (high - low) * top)] for value in values)


def _rate(value: float | None) -> str:
    return "–" if value is None else f"{int(100 * value + 0.5)} %"


def _money(value: float | None) -> str:
    return "–" if value is None else f"{value:,.2f}"


_HEADERS: Final = ("when", "source", "runs", "submitted", "found", "credits", "hit rate", "per found")


def _cells(row: EconomicsRow) -> tuple[str, ...]:
    return (
        row.label,
        row.source,
        count(row.runs),
        count(row.submitted),
        count(row.found),
        count(row.credits),
        _rate(row.hit_rate),
        _money(row.cost_per_found),
    )


def _scope(since: datetime | None, source: str | None, by: Grouping) -> str:
    when = f"since {since:%Y-%m-%d %H:%M} UTC" if since is not None else "all time"
    return f"{when}, {'source ' + source if source else 'all sources'}, by {by}"


def _refresh_line(due: RefreshDue | None) -> str | None:
    if due is None:
        return None
    return (
        f"due for refresh (results older than {due.refresh_days:g} d, whole store): "
        f"{count(due.due_now)} now, {count(due.due_soon)} more in the next {due.horizon_days} days"
    )


def _trend(rows: Sequence[EconomicsRow]) -> str | None:
    if len(rows) < 2:
        return None
    credits = sparkline([row.credits for row in rows])
    hits = sparkline([row.hit_rate or 0.0 for row in rows])
    return f"trend, oldest → newest: credits {credits}   hit rate {hits}"


def economics_text(
    runs: Sequence[RunEconomics],
    *,
    by: Grouping,
    since: datetime | None,
    source: str | None,
    due: RefreshDue | None,
) -> str:
    """The `cleanlist-enrich report` output: the table, its totals, a trend line, contacts coming due."""
    lines = [f"Economics {_scope(since, source, by)}"]
    if not runs:
        lines.append("no finished runs in this span")
    else:
        rows = economics_rows(runs, by)
        table = [_HEADERS, *(_cells(row) for row in rows), _cells(totals(runs))]
        widths = [max(len(cells[i]) for cells in table) for i in range(len(_HEADERS))]

        def line(cells: tuple[str, ...]) -> str:
            return "  ".join(
                cell.ljust(width) if i < 2 else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()

        lines += [line(table[0]), *(line(cells) for cells in table[1:-1])]
        lines += ["-" * len(line(table[0])), line(table[-1])]
        trend = _trend(rows)
        if trend:
            lines.append(trend)
    refresh = _refresh_line(due)
    if refresh:
        lines.append(refresh)
    return "\n".join(lines)


def economics_markdown(
    runs: Sequence[RunEconomics],
    *,
    by: Grouping,
    since: datetime | None,
    source: str | None,
    due: RefreshDue | None,
) -> str:
    """The `cleanlist-economics` artifact: the same table as markdown."""
    lines = [f"## Economics {_scope(since, source, by)}", ""]
    if not runs:
        lines.append("No finished runs in this span.")
    else:
        rows = economics_rows(runs, by)
        lines += ["| " + " | ".join(_HEADERS) + " |", "|" + "---|" * len(_HEADERS)]
        lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
        lines.append("| " + " | ".join(f"**{cell}**" for cell in _cells(totals(runs))) + " |")
        trend = _trend(rows)
        if trend:
            lines += ["", trend]
    refresh = _refresh_line(due)
    if refresh:
        lines += ["", refresh]
    return "\n".join(lines)
