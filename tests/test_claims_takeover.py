"""A rerun in a restarted container takes over a killed run's claims at once; a run that leaves rows
pending is never `completed`.

The real CLI in a subprocess against the sandbox over HTTP. A restarted container is a new PID namespace
(`unshare --pid --fork --mount-proc`): the CLI is PID 1 there, as the killed run was in its own, so the
killed run's pid is alive again and only its start time tells it apart.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cleanlist.run.journal import AcceptanceJournal
from cleanlist.store import EnrichmentStore
from tests.flow_helpers import read_csv

pytestmark = pytest.mark.usefixtures("prefect_harness")
ROOT = Path(__file__).parent.parent
CONTACTS = 2_000
SETTLED = {"enriched", "not_found", "cached"}
NEW_PID_NAMESPACE = ["unshare", "--pid", "--fork", "--mount-proc"]


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run([*NEW_PID_NAMESPACE, "true"], capture_output=True, check=False)
    return probe.returncode == 0


needs_pid_namespaces = pytest.mark.skipif(not _can_unshare(), reason="cannot create PID namespaces here")


def contact_list(path: Path, count: int = CONTACTS) -> Path:
    """A CRM export with a numeric cursor column `seq` (1…count), one contact per row."""
    with path.open("w", newline="", encoding="utf-8") as sheet:
        writer = csv.writer(sheet)
        writer.writerow(["seq", "First Name", "Last Name", "Company Website"])
        for i in range(1, count + 1):
            writer.writerow([i, f"Ann{i}", f"Lee{i}", f"co{i}.example"])
    return path


def _env(sandbox: Any) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    return {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "CLEANLIST_API_KEY": sandbox.api_key,
        "CLEANLIST_BASE_URL": sandbox.base_url,
        "CLEANLIST_RATE_LIMIT": "1000/1",
    }


def _args(source: Path, output: Path, store: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cleanlist_prefect.deployments.cli", "run", str(source),
            "--output", str(output), "--store", store, "--initial-poll-seconds", "1",
            "--max-concurrent-chunks", "2", "--json", *extra]  # fmt: skip


def _summary(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    lines = done.stdout.strip().splitlines()
    assert lines, done.stderr[-2000:]
    summary: dict[str, Any] = json.loads(lines[-1])
    return summary


def _wait_for_bulk_requests(sandbox: Any, proc: subprocess.Popen[bytes], count: int) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if sum(entry["endpoint"] == "enrich-bulk" for entry in sandbox.requests_log()) >= count:
            return
        assert proc.poll() is None, "the run ended before submitting"
        time.sleep(0.01)
    raise AssertionError(f"fewer than {count} bulk requests within the timeout")


def _journal_lines(store_url: str) -> list[str]:
    with EnrichmentStore(store_url) as store:
        path = AcceptanceJournal(store.url_display).path
    return path.read_text().splitlines() if path.exists() else []


@needs_pid_namespaces
def test_a_rerun_in_a_restarted_container_submits_what_the_killed_run_never_sent_and_moves_the_mark(
    tmp_path: Path, make_sandbox: Any, store_url: str
) -> None:
    sandbox = make_sandbox(rate_limit=None, latency=(0.3, 0.8), seed=3)
    source = contact_list(tmp_path / "crm.csv")
    out = tmp_path / "out.csv"
    args = _args(source, out, store_url, "--cursor", "seq")
    killed = subprocess.Popen(
        [*NEW_PID_NAMESPACE, *args], cwd=ROOT, env=_env(sandbox), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    _wait_for_bulk_requests(sandbox, killed, 2)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    sent_by_the_killed_run = sandbox.counters()["contacts_accepted"]
    assert sent_by_the_killed_run < CONTACTS
    assert _journal_lines(store_url), "the killed run left no journal to replay"

    # The restarted container: PID 1 again, in a new PID namespace, right away.
    rerun = subprocess.run(
        [*NEW_PID_NAMESPACE, *args], cwd=ROOT, env=_env(sandbox), capture_output=True, text=True, timeout=300
    )

    summary = _summary(rerun)
    assert (rerun.returncode, summary["status"]) == (0, "completed"), rerun.stderr[-2000:]
    assert summary["submitted"] >= CONTACTS - sent_by_the_killed_run
    written = read_csv(out)
    assert len(written) == CONTACTS
    assert set(written["cleanlist_status"]) <= SETTLED
    counters = sandbox.counters()
    assert counters["contacts_accepted_more_than_once"] <= summary["ambiguous_contacts"]
    assert _journal_lines(store_url) == []  # the killed run's lines were replayed, then dropped
    assert summary["cursor_mark_new"] == str(CONTACTS)

    # The mark moved only because every row was settled: the next run has nothing left to send.
    again = subprocess.run(
        _args(source, tmp_path / "again.csv", store_url, "--cursor", "seq"),
        cwd=ROOT, env=_env(sandbox), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert _summary(again)["skipped_by_cursor"] == CONTACTS
    assert sandbox.counters()["contacts_accepted"] == counters["contacts_accepted"]


def test_two_runs_of_one_source_at_once_never_report_completed_with_rows_pending(
    tmp_path: Path, make_sandbox: Any, store_url: str
) -> None:
    # Slow answers, one chunk at a time: the first run is still submitting when the second plans.
    sandbox = make_sandbox(rate_limit=None, latency=(1.0, 1.5), seed=5)
    source = contact_list(tmp_path / "crm.csv")
    outs = [tmp_path / "first.csv", tmp_path / "second.csv"]
    args = [_args(source, out, store_url, "--max-concurrent-chunks", "1") for out in outs]
    first = subprocess.Popen(
        args[0], cwd=ROOT, env=_env(sandbox), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for_bulk_requests(sandbox, first, 1)
    second = subprocess.run(args[1], cwd=ROOT, env=_env(sandbox), capture_output=True, text=True, timeout=300)
    stdout, stderr = first.communicate(timeout=300)
    runs = [subprocess.CompletedProcess(first.args, first.returncode, stdout, stderr), second]

    for done, out in zip(runs, outs, strict=True):
        summary = _summary(done)
        statuses = set(read_csv(out)["cleanlist_status"])
        if statuses <= SETTLED:
            assert (done.returncode, summary["status"]) == (0, "completed"), done.stderr[-2000:]
        else:
            # Rows another live run held: said in one line, exit 3, never "completed".
            assert (done.returncode, summary["status"]) == (3, "incomplete")
            assert summary["unsettled_rows"] == summary["row_statuses"].get("pending", 0) > 0
            assert "run incomplete" in done.stderr and "held by another live run" in done.stderr
            assert "Traceback" not in done.stderr
    # Whether they overlapped enough to leave rows pending depends on timing; the rule holds either way.
    assert sandbox.counters()["contacts_accepted_more_than_once"] == 0

    # A rerun afterwards settles everything, paying for nothing twice.
    rerun = subprocess.run(
        _args(source, tmp_path / "rerun.csv", store_url), cwd=ROOT, env=_env(sandbox), capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert set(read_csv(tmp_path / "rerun.csv")["cleanlist_status"]) <= SETTLED
    assert sandbox.counters()["contacts_accepted_more_than_once"] == 0


# A live run in its own process that has claimed contacts and not submitted them (yet).
HOLDING_RUN = """
import sys, threading, time
from cleanlist.store import EnrichmentStore
url, keys = sys.argv[1], sys.argv[2].split(",")
store = EnrichmentStore(url)
store.start_run("holder", {})

def beat():
    while True:
        store.heartbeat("holder")
        time.sleep(1)

threading.Thread(target=beat, daemon=True).start()
print(len(store.claim("holder", keys, "partial", None).claimed), flush=True)
sys.stdin.read()
"""


def test_a_run_whose_rows_a_live_run_holds_ends_incomplete_with_exit_3_and_keeps_the_mark(
    tmp_path: Path, make_sandbox: Any, store_url: str
) -> None:
    from cleanlist.prepare import contact_key, normalize_contact

    sandbox = make_sandbox(rate_limit=None)
    source = contact_list(tmp_path / "crm.csv", count=300)
    held = [
        contact_key(
            normalize_contact(
                {"first_name": f"Ann{i}", "last_name": f"Lee{i}", "company_domain": f"co{i}.example"}
            )
        )
        for i in range(1, 11)
    ]
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDING_RUN, store_url, ",".join(held)], cwd=ROOT, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "10"
        done = subprocess.run(
            _args(source, tmp_path / "out.csv", store_url, "--cursor", "seq"), cwd=ROOT, env=_env(sandbox),
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        holder.kill()
        holder.wait(timeout=10)

    summary = _summary(done)
    assert (done.returncode, summary["status"]) == (3, "incomplete"), done.stderr[-2000:]
    assert (summary["unsettled_rows"], summary["held_by_other_runs"]) == (10, 10)
    assert summary["row_statuses"]["pending"] == 10
    assert summary["cursor_mark_new"] is None  # the mark did not move
    assert "run incomplete: 10 row(s) are still pending (10 contact(s) held by another live" in done.stderr
    assert "Traceback" not in done.stderr
    assert sandbox.counters()["contacts_accepted"] == 290

    # The holder is gone (killed): the rerun takes its claims over at once and completes.
    rerun = subprocess.run(
        _args(source, tmp_path / "out.csv", store_url, "--cursor", "seq"), cwd=ROOT, env=_env(sandbox),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert (rerun.returncode, _summary(rerun)["status"]) == (0, "completed"), rerun.stderr[-2000:]
    assert _summary(rerun)["cursor_mark_new"] == "300"
    assert sandbox.counters()["contacts_accepted"] == 300
    assert sandbox.counters()["contacts_accepted_more_than_once"] == 0
