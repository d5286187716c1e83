"""`cleanlist-enrich report`: what runs cost and found, per run or per day, read back from the store."""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from cleanlist.errors import InputError
from cleanlist.run.economics import economics_markdown, parse_since, sparkline
from cleanlist.store import EnrichmentStore
from cleanlist.store.schema import contacts, runs

REPO = Path(__file__).parent.parent


def build_30_runs(url: str) -> list[dict[str, float]]:
    """30 finished runs, one a day for the last 30 days, alternating two sources; their numbers."""
    now = datetime.now(UTC)
    made = []
    with EnrichmentStore(url) as store:
        for day in range(30):
            run_id = f"run-{day:02d}"
            source = "/exports/crm.csv" if day % 2 == 0 else "/exports/events.xlsx"
            submitted, emails = 100 + day, 60 + day // 2
            credits = float(emails)
            store.start_run(run_id, {"source": source, "enrichment_type": "partial"})
            store.finish_run(
                run_id,
                "completed",
                {"submitted": submitted, "emails_found": emails, "phones_found": 0, "credits_spent": credits},
            )
            made.append({"submitted": submitted, "found": emails, "credits": credits})
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.begin() as conn:
        for day in range(30):
            started = now - timedelta(days=29 - day, hours=1)
            conn.execute(sa.update(runs).where(runs.c.run_id == f"run-{day:02d}").values(started_at=started))
        # Results stored 40, 25 and 1 day(s) ago: with a 30-day refresh, due now, within 7 days, later.
        conn.execute(
            sa.insert(contacts),
            [
                {
                    "contact_key": f"li:{age}-{i}",
                    "enrichment_type": "partial",
                    "state": "done",
                    "enriched_at": now - timedelta(days=age),
                }
                for age, n in ((40, 3), (25, 2), (1, 4))
                for i in range(n)
            ],
        )
    engine.dispose()
    return made


def report(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cleanlist_prefect.deployments.cli", "report", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


def test_report_over_30_runs_prints_the_per_run_table_and_the_totals(store_url: str) -> None:
    made = build_30_runs(store_url)

    result = report("--store", store_url, "--since", "31d")

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    run_lines = [line for line in lines if re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d run-\d\d", line)]
    assert len(run_lines) == 30
    first = run_lines[0].split()
    assert first[2:4] == ["run-00", "crm.csv"] and first[4:8] == ["1", "100", "60", "60"]
    total = next(line for line in lines if line.startswith("total (30 runs)"))
    submitted = sum(int(m["submitted"]) for m in made)
    found = sum(int(m["found"]) for m in made)
    hit_rate = int(100 * found / submitted + 0.5)
    # total (30 runs) | source | runs | submitted | found | credits | hit rate | per found
    expected = [
        "2",
        "sources",
        "30",
        f"{submitted:,}",
        f"{found:,}",
        f"{found:,}",
        str(hit_rate),
        "%",
        "1.00",
    ]
    assert total.split()[3:] == expected
    assert any(line.startswith("trend, oldest → newest: credits ") for line in lines)
    assert lines[-1].endswith(": 3 now, 2 more in the next 7 days")


def test_report_by_day_for_one_source(store_url: str) -> None:
    build_30_runs(store_url)

    result = report("--store", store_url, "--since", "10d", "--source", "events.xlsx", "--by", "day")

    assert result.returncode == 0, result.stderr
    day_lines = [line for line in result.stdout.splitlines() if re.match(r"^\d{4}-\d\d-\d\d ", line)]
    # The last 10 days hold runs 20..29; events.xlsx ran on the odd ones.
    assert len(day_lines) == 5 and all(" events.xlsx " in line for line in day_lines)
    assert "total (5 runs)" in result.stdout


def test_the_report_command_loads_no_web_server_dataframe_or_suffix_list(tmp_path: Path) -> None:
    """`cleanlist-enrich report` must start fast (< 2 s over 1M contacts, benchmarks/economics.py): what the
    other commands need — FastAPI and uvicorn (the sandbox), httpx (the client), pandas (sources),
    tldextract (preparation), Prefect (runs) — stays unloaded."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    build_30_runs(url)
    heavy = ["fastapi", "starlette", "uvicorn", "httpx", "pandas", "numpy", "pyarrow", "tldextract"]
    heavy.append("prefect")
    probe = (
        "import sys\n"
        "from cleanlist_prefect.deployments.cli import main\n"
        f"code = main(['report', '--store', {url!r}, '--since', '31d'])\n"
        f"print('LOADED', sorted(m for m in {heavy!r} if m in sys.modules), code)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    assert "total (30 runs)" in result.stdout
    assert result.stdout.splitlines()[-1] == "LOADED [] 0"


def test_a_bad_span_is_one_clear_line(tmp_path: Path) -> None:
    result = report("--store", f"sqlite:///{tmp_path / 'store.db'}", "--since", "last tuesday")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "cleanlist-enrich: error: --since 'last tuesday' is not a span (30d, 12h, 2w) or a date (2026-11-01)"
    )
    with pytest.raises(InputError):
        parse_since("30 parsecs")


def test_the_economics_artifact_is_a_markdown_table_with_totals(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    build_30_runs(url)
    with EnrichmentStore(url) as store:
        text = economics_markdown(
            store.run_economics(), by="day", since=None, source=None, due=store.refresh_due(30)
        )
    rows = [line for line in text.splitlines() if line.startswith("| 20")]
    assert len(rows) == 30 and "| **total (30 runs)** |" in text


def test_a_sparkline_spans_the_lowest_to_the_highest() -> None:
    assert sparkline([1, 5, 9]) == "▁▅█"
    assert sparkline([2, 2]) == "▅▅" and sparkline([]) == ""
