"""A run killed with SIGKILL mid-way, then run again: the output is whole and nothing is paid twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.flow_helpers import messy_export, read_csv

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _command(source: Path, tmp_path: Path, store_url: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cleanlist_prefect.deployments.cli",
        "run",
        str(source),
        "--output",
        str(tmp_path / "out.csv"),
        "--store",
        store_url,
        "--json",
        "--max-concurrent-chunks",
        "2",
    ]


def _env(sandbox, rate_limit: str) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    return {
        **os.environ,
        "CLEANLIST_API_KEY": sandbox.api_key,
        "CLEANLIST_BASE_URL": sandbox.base_url,
        "CLEANLIST_RATE_LIMIT": rate_limit,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
    }


def test_kill_9_after_4_of_12_chunks_then_rerun_is_whole_and_pays_once(
    tmp_path: Path, make_sandbox, store_url: str
) -> None:
    sandbox = make_sandbox(rate_limit=None, latency=(0.5, 1.5))
    source = messy_export(tmp_path / "crm.csv", unique=3000, duplicates=100, invalid=10)  # 12 chunks
    cwd = Path(__file__).parent.parent
    # A slow client-side limit (1 bulk call per second) gives the kill a window in the middle.
    victim = subprocess.Popen(
        _command(source, tmp_path, store_url),
        env=_env(sandbox, "1/1"),
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while sandbox.counters()["bulk_accepted"] < 4:
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    accepted_at_kill = sandbox.counters()["contacts_accepted"]
    assert 1000 <= accepted_at_kill < 3000

    rerun = subprocess.run(
        _command(source, tmp_path, store_url),
        env=_env(sandbox, "600/1"),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    counters = sandbox.counters()
    assert counters["contacts_accepted_more_than_once"] <= 250  # at most the chunk cut mid-flight
    assert counters["contacts_accepted"] - counters["contacts_accepted_more_than_once"] == 3000
    out, rejects = read_csv(tmp_path / "out.csv"), read_csv(tmp_path / "out.rejects.csv")
    assert sorted(out["Record ID"].tolist() + rejects["Record ID"].tolist()) == sorted(
        read_csv(source)["Record ID"].tolist()
    )
    assert set(out["cleanlist_status"]) <= {
        "enriched",
        "not_found",
        "cached",
    }  # cached: fetched before the kill
    assert summary["resumed_in_flight"] + summary["fresh_in_store"] >= accepted_at_kill - 250
