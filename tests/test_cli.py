"""The `cleanlist-enrich` command as a user runs it: a subprocess, its exit code, stdout and stderr."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.procs import seed_prefect_home
from tests.flow_helpers import messy_export, read_csv

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _cli(args: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    from prefect.settings import PREFECT_API_URL

    full_env = {**os.environ, **env, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    return subprocess.run(
        [sys.executable, "-m", "cleanlist_prefect.deployments.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=Path(__file__).parent.parent,
    )


def _no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert "NoneType: None" not in result.stderr + result.stdout  # Prefect's exc_info outside an exception


def test_json_summary_is_the_last_stdout_line(tmp_path: Path, make_sandbox) -> None:
    sandbox = make_sandbox(rate_limit=None)
    source = messy_export(tmp_path / "crm.csv", unique=300, duplicates=10, invalid=4)
    result = _cli(
        [
            "run",
            str(source),
            "--output",
            str(tmp_path / "out.csv"),
            "--store",
            f"sqlite:///{tmp_path / 's.db'}",
            "--rate-limit",
            "100/1",
            "--json",
        ],
        {"CLEANLIST_API_KEY": sandbox.api_key, "CLEANLIST_BASE_URL": sandbox.base_url},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    for field in (
        "status",
        "rows_read",
        "rejected",
        "duplicates",
        "submitted",
        "emails_found",
        "credits_spent",
        "output",
        "rejects",
    ):
        assert field in summary
    assert summary["rows_read"] == 314 and summary["rejected"] == 4 and summary["submitted"] == 300
    assert summary["rate_limit"] == "100/1"
    assert summary["credits_spent"] == pytest.approx(sandbox.counters()["credits_charged"])
    assert len(read_csv(tmp_path / "out.csv")) == 310
    _no_traceback(result)


def test_rejected_plan_exits_2_with_one_line(tmp_path: Path, make_sandbox) -> None:
    key = "clapi_" + "q" * 64
    sandbox = make_sandbox(rate_limit=None, no_api_access_keys=(key,))
    source = messy_export(tmp_path / "crm.csv", unique=50)
    result = _cli(
        ["run", str(source), "-o", str(tmp_path / "out.csv"), "--store", f"sqlite:///{tmp_path / 's.db'}"],
        {"CLEANLIST_API_KEY": key, "CLEANLIST_BASE_URL": sandbox.base_url},
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("cleanlist-enrich: error:")]
    assert len(errors) == 1 and "403" in errors[0]
    assert key not in result.stderr + result.stdout
    _no_traceback(result)


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["run", "{src}", "-o", "{tmp}/out.csv"], {"CLEANLIST_API_KEY": ""}, "cleanlist_api_key is empty"),
        (["run", "{tmp}/missing.csv", "-o", "{tmp}/out.csv"], {}, "not found"),
        (["run", "{src}", "-o", "{tmp}/out.xml"], {}, "must end in"),
        (["run", "{tmp}/data.docx", "-o", "{tmp}/out.csv"], {}, "docx"),
        (["run", "{tmp}/nomap.csv", "-o", "{tmp}/out.csv"], {}, "no columns to build contacts from"),
        (["run", "{src}", "-o", "{tmp}/out.csv", "--rate-limit", "fast"], {}, "rate limit 'fast'"),
        (["run", "{src}", "-o", "{tmp}/out.csv"], {"CLEANLIST_BASE_URL": "{api}/v2"}, "does not serve"),
    ],
)
def test_bad_invocations_give_one_clear_line(tmp_path: Path, make_sandbox, args, env, expected) -> None:
    sandbox = make_sandbox(rate_limit=None)
    source = messy_export(tmp_path / "crm.csv", unique=5)
    (tmp_path / "data.docx").write_bytes(b"PK\x03\x04")
    (tmp_path / "nomap.csv").write_text("foo,bar\n1,2\n")  # fails inside the flow, in a task
    args = [a.format(src=source, tmp=tmp_path) for a in args]
    base_env = {
        "CLEANLIST_API_KEY": sandbox.api_key,
        "CLEANLIST_BASE_URL": sandbox.base_url,
        "CLEANLIST_STORE_URL": f"sqlite:///{tmp_path / 's.db'}",
    }
    env = {name: value.format(api=sandbox.base_url) for name, value in env.items()}
    result = _cli(args, {**base_env, **env})
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("cleanlist-enrich: error:")]
    assert len(errors) == 1 and expected in errors[0].lower(), result.stderr[-1500:]
    _no_traceback(result)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "{tmp}/missing.csv", "-o", "{tmp}/out.csv"], "not found"),
        (["run", "{src}", "-o", "{src}"], "is the source"),
        (["run", "{src}", "-o", "{tmp}/out.csv", "--max-credits", "-5"], "max_credits"),
        (["run", "{src}", "-o", "{tmp}/out.csv", "--sheet", "Leads"], "--sheet"),
    ],
)
def test_bad_input_is_refused_before_prefect_is_needed(tmp_path: Path, args, expected) -> None:
    # An unreachable Prefect API: had the run reached Prefect, the error would be about it.
    source = messy_export(tmp_path / "crm.csv", unique=5)
    before = source.read_bytes()
    env = {
        **os.environ,
        "PREFECT_API_URL": "http://127.0.0.1:9/api",
        "CLEANLIST_API_KEY": "clapi_" + "x" * 64,
    }
    result = subprocess.run(
        [sys.executable, "-m", "cleanlist_prefect.deployments.cli",
         *[a.format(src=source, tmp=tmp_path) for a in args]],
        capture_output=True, text=True, env=env, timeout=120, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and expected in result.stderr, result.stderr[-1500:]
    assert source.read_bytes() == before
    _no_traceback(result)


def test_the_demo_enriches_the_sample_export_and_pays_once(tmp_path: Path) -> None:
    """The README's first command, minus the install: every sample row lands in the output or rejects."""
    args = ["demo", "--output-dir", str(tmp_path / "out"), "--json"]
    first = _cli(args, {"CLEANLIST_API_KEY": ""})
    assert first.returncode == 0, first.stderr[-2000:]
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary["status"] == "completed"
    assert summary["rows_read"] == 300
    out, rejects = (
        read_csv(tmp_path / "out" / "enriched.csv"),
        read_csv(tmp_path / "out" / "enriched.rejects.csv"),
    )
    assert len(out) + len(rejects) == summary["rows_read"] == summary["rejected"] + len(out)
    assert summary["submitted"] == summary["unique_contacts"] > 0
    assert summary["emails_found"] > 0 and summary["credits_spent"] == summary["emails_found"]
    assert summary["workflows"] <= summary["status_calls"] <= 2 * summary["workflows"]
    _no_traceback(first)
    # Contacts' personal data is for the owner only.
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o700
    for name in ("enriched.csv", "enriched.rejects.csv", "store.db"):
        assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) == 0o600, name

    again = _cli(args, {"CLEANLIST_API_KEY": ""})  # a new sandbox, the same store: nothing is sent
    assert again.returncode == 0, again.stderr[-2000:]
    rerun = json.loads(again.stdout.strip().splitlines()[-1])
    assert rerun["submitted"] == 0 and rerun["fresh_in_store"] == summary["unique_contacts"]
    assert len(read_csv(tmp_path / "out" / "enriched.csv")) == len(out)


def test_sigterm_stops_the_run_and_its_temporary_prefect_server(tmp_path: Path, make_sandbox) -> None:
    import signal

    import psutil

    sandbox = make_sandbox(rate_limit=None, latency=60.0)  # workflows stay in flight
    source = messy_export(tmp_path / "crm.csv", unique=300)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # Prefect starts its own server
    env.update(
        CLEANLIST_API_KEY=sandbox.api_key,
        CLEANLIST_BASE_URL=sandbox.base_url,
        CLEANLIST_STORE_URL=f"sqlite:///{tmp_path / 's.db'}",
        PREFECT_HOME=str(tmp_path / "prefect-home"),
    )
    # Migrated once per session: the test is about the stop.
    env.update(seed_prefect_home(tmp_path / "prefect-home"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "cleanlist_prefect.deployments.cli", "run", str(source),
         "-o", str(tmp_path / "out.csv")],
        cwd=Path(__file__).parent.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not any(e["endpoint"] == "enrich-bulk" for e in sandbox.requests_log()):
        assert proc.poll() is None and time.monotonic() < deadline, "the run never submitted"
        time.sleep(0.1)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children, "no temporary Prefect server was started"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "cleanlist-enrich: error: stopped" in stderr and "(0 request(s) in doubt)" in stderr
    _gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [p.cmdline() for p in alive]


def test_the_demos_end_of_run_output_fits_a_screen_and_starts_with_the_headline(tmp_path: Path) -> None:
    """What a person sees after the demo: the report, headline first, every number the run's own."""
    import sqlalchemy as sa
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from cleanlist.run.economics import ECONOMICS_KEY
    from cleanlist.run.report import headline, report_text
    from cleanlist.run.summary import RunSummary

    result = _cli(["demo", "--output-dir", str(tmp_path / "out")], {"CLEANLIST_API_KEY": ""})

    assert result.returncode == 0, result.stderr[-2000:]
    _no_traceback(result)
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'out' / 'store.db'}")
    with engine.connect() as conn:
        counts = conn.exec_driver_sql("SELECT counts FROM cleanlist_runs").scalar_one()
    engine.dispose()
    summary = RunSummary.model_validate(json.loads(counts))
    lines = result.stdout.splitlines()
    start = lines.index(headline(summary))
    end_of_run = lines[start:]
    assert len(end_of_run) <= 20, result.stdout
    # Every number in it is the summary's: the printed report is the report of the stored summary.
    assert "\n".join(end_of_run).startswith(report_text(summary))
    assert end_of_run[0].startswith(f"{summary.submitted} contacts → {summary.emails_found} emails")
    # The balance read as the run ended: the demo's sandbox starts every world at 5,000 credits.
    assert summary.balance_left == 5000 - summary.credits_spent
    assert "What needs you" not in result.stdout

    async def economics() -> list[str]:
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[ECONOMICS_KEY]))
            )
        return [str(artifact.data) for artifact in found]

    import asyncio

    published = asyncio.run(economics())
    assert any(f"| {summary.submitted} |" in text for text in published), published[-1:]


@pytest.mark.parametrize("command", ["report", "limits", "demo", "run", "sandbox", "receiver"])
def test_every_command_is_listed_whichever_command_runs(command: str) -> None:
    """`cleanlist-enrich report` skips building run's and sandbox's options; its help is the same."""
    from cleanlist_prefect.deployments.cli import build_parser

    assert build_parser(command).format_help() == build_parser().format_help()


def test_deliveries_that_fail_for_good_are_in_what_needs_you_at_the_end_of_the_run(
    tmp_path: Path, make_sandbox
) -> None:
    """Every delivery attempt answered 502 (`--webhook-fail-rate 1`, Cleanlist's retries compressed to
    nothing): the run completes by polling, and its printed report says why under "What needs you"."""
    from cleanlist.run.report import NEEDS_YOU_TITLE

    sandbox = make_sandbox(rate_limit=None, latency=0.2, webhook_fail_rate=1.0, webhook_backoff_scale=0.0)
    source = messy_export(tmp_path / "crm.csv", unique=300)
    result = _cli(
        ["run", str(source), "--output", str(tmp_path / "out.csv"),
         "--store", f"sqlite:///{tmp_path / 's.db'}", "--rate-limit", "100/1",
         "--webhook-listen", "127.0.0.1:0", "--webhook-retry-scale", "0",
         "--initial-poll-seconds", "1"],
        {"CLEANLIST_API_KEY": sandbox.api_key, "CLEANLIST_BASE_URL": sandbox.base_url},
    )  # fmt: skip

    assert result.returncode == 0, result.stderr[-2000:]
    _no_traceback(result)
    out = result.stdout
    assert NEEDS_YOU_TITLE in out, out
    needs_you = out[out.index(NEEDS_YOU_TITLE) :]
    # Two workflows, five 502s each, none reaching the run's receiver: both polled instead.
    assert "2 webhook deliveries failed (2 deliveries failed: 502 from http://127.0.0.1:" in needs_you, out
    assert "2 workflows were polled instead" in needs_you
    assert "fix the receiver the deliveries log names" in needs_you
    assert "/hooks/" not in out  # never the token
    assert len(read_csv(tmp_path / "out.csv")) == 300
    assert sum(sandbox.counters()["requests"].get("enrich-status", {}).values()) == 2
