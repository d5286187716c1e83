"""The benchmark harness keeps working: the pipeline and the documented loop on 1,000 contacts.

No timing is asserted (the figures belong to benchmarks/README.md); only that every row is written and
that each measured figure is produced.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import run

# The session's Prefect server: each benchmark would otherwise start one of its own (15-20 s on a busy
# machine) for two or three runs.
pytestmark = pytest.mark.usefixtures("prefect_harness")


def _prefect_api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value())


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_benchmark_measures_the_pipeline_and_the_documented_loop(tmp_path: Path) -> None:
    results = tmp_path / "throughput.json"
    data = tmp_path / "data"
    argv = ["throughput", "--contacts", "1000", "--data-dir", str(data), "--output", str(results),
            "--prefect-api-url", _prefect_api_url()]  # fmt: skip
    assert run.main(argv) == 0

    report = json.loads(results.read_text())
    runs = report["throughput"]["runs"]
    pipeline, loop = runs["pipeline"], runs["documented loop"]
    assert pipeline["all_rows_written"] and pipeline["rows_out"] == 1000
    assert loop["rows_out"] == 1000
    for row in (pipeline, loop):
        assert row["contacts"] == 1000
        assert row["workflows"] == 4
        assert row["contacts_per_s"] > 0 and row["ceiling_ratio"] > 0
        assert row["status_calls_per_workflow"] >= 1
        assert row["share_429"] >= 0
        assert row["cpu_ms_per_chunk"] > 0 and row["peak_rss_mib"] > 0
    assert report["throughput"]["speedup_vs_documented_loop"] > 0
    assert "documented loop" in report["table"]


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_the_cli_against_the_independent_stand_in(tmp_path: Path) -> None:
    from benchmarks import independent

    results = tmp_path / "independent.json"
    argv = ["--contacts", "1000", "--data-dir", str(tmp_path / "data"), "--output", str(results),
            "--prefect-api-url", _prefect_api_url()]  # fmt: skip
    assert independent.main(argv) == 0
    runs = json.loads(results.read_text())["runs"]
    assert len(runs) == 2
    for row in runs:
        assert row["exit"] == 0 and row["rows_written"] == 1000
        assert row["accepted_twice"] == 0
        # The stand-in spells the email its own way; the run still reads it and reports what was charged.
        assert row["credits_charged"] > 0 and row["credits_spent_by_run"] == row["credits_charged"]
        assert row["status_calls_per_workflow"] >= 1 and row["share_429"] == 0
