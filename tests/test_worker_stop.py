"""A flow run under `prefect worker` ends when its worker is stopped (issue 19, "Tests that prove it").

A real `prefect server start`, the cleanlist pool deployed from prefect.yaml and one process worker
(`tests/test_deployments.py`'s stack), a sandbox that allows 2 bulk requests per 2 s and takes 40 s to
finish a workflow, so that without a stop the run would go on for about a minute. Once the API has
accepted the first bulk request (other chunks wait for a rate slot), SIGTERM goes to the worker only, as
Kubernetes or systemd stop it. Then: the flow run is in a final state within 30 s, every process the
worker started is gone, and a rerun with the CLI over the same store and journal completes with 0
requests in doubt and no contact accepted twice (the sandbox's count). Before the rerun the sandbox's
workflows are made fast (`SandboxServer.set_latency`): the 40 s were there only for the stop.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from cleanlist.sandbox import SandboxConfig, SandboxServer
from cleanlist_prefect.deployments.worker import WORKER_STOP_SECONDS
from tests.test_deployments import CLEANLIST_ENRICH, PrefectStack, start_stack, write_contacts

WORKER = "worker-1"

STOP_BOUND = 30.0  # seconds from SIGTERM to the flow run's final state (issue 19, item 7)
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")


@pytest.fixture
def worker_stack(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[PrefectStack]:
    root = tmp_path_factory.mktemp("worker-stop")
    # The worker's flow runs and the rerun share this HOME: the submission journal lives under it.
    monkeypatch.setenv("HOME", str(root / "home"))
    (root / "home").mkdir()
    config = SandboxConfig(credits=1_000_000.0, latency=40.0, rate_limit=(2, 2.0))
    with SandboxServer(config) as sandbox:
        stack = start_stack(root, sandbox, workers=0)
        try:
            # `cleanlist-enrich worker`: `prefect worker start` whose stop stops its flow runs first.
            stack.procs.start(
                WORKER,
                [CLEANLIST_ENRICH, "worker", "--pool", "cleanlist", "--name", WORKER, "--limit", "2"],
                stack.env,
                cwd=root,
            )
            stack.workers.append(WORKER)
            deadline = time.monotonic() + 120.0
            while WORKER not in {
                w["name"] for w in stack.api("POST", "/work_pools/cleanlist/workers/filter", {})
            }:
                assert stack.procs.alive(WORKER), f"the worker exited:\n{stack.diagnostics()}"
                assert time.monotonic() < deadline, f"the worker did not come online:\n{stack.diagnostics()}"
                time.sleep(0.5)
            yield stack
        finally:
            stack.procs.stop_all()


def _bulk(sandbox: SandboxServer, status: int | None = None) -> int:
    return sum(
        1
        for e in sandbox.requests_log()
        if e["endpoint"] == "enrich-bulk" and (status is None or e["status"] == status)
    )


# A worker's place: it starts the flow-run process in a session of its own, then ends without stopping it.
_WORKER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], start_new_session=True)
print(child.pid, flush=True)
time.sleep(0.5)
"""
_FLOW_RUN = """
import time
from cleanlist.run.stop import StopRequest, stop_when_orphaned
stop = StopRequest()
started = time.monotonic()
with stop_when_orphaned(stop, every=0.05):
    stopped = stop.wait(20)
print(f"{stop.reason} after {time.monotonic() - started:.1f} s", flush=True)
"""


def test_a_process_whose_starter_ends_requests_its_stop(tmp_path: Path) -> None:
    out = tmp_path / "flow-run.out"
    script = f"import sys; sys.stdout = open({str(out)!r}, 'w'); exec({_FLOW_RUN!r})"
    worker = subprocess.run([sys.executable, "-c", _WORKER, script], capture_output=True, text=True,
                            timeout=60, check=True)  # fmt: skip
    flow_run = psutil.Process(int(worker.stdout.split()[0]))
    flow_run.wait(timeout=30)
    said = out.read_text()
    assert said.startswith("its worker stopped after"), said
    assert float(said.split()[-2]) < 5.0


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_sigterm_to_the_worker_ends_its_flow_run_without_doubt_and_a_rerun_pays_nothing_twice(
    worker_stack: PrefectStack,
) -> None:
    stack = worker_stack
    sandbox = stack.sandbox
    source = stack.root / "contacts.csv"
    write_contacts(source, 2_000, tag="w")
    output = stack.root / "out" / "enriched.csv"
    params = {"source": str(source), "output": str(output), "initial_poll_seconds": 1}
    flow_run_id, _ = stack.deployment_run("enrich-contacts/adhoc", params, watch=False)

    deadline = time.monotonic() + 240
    while _bulk(sandbox, 200) < 1:
        run = stack.flow_run(flow_run_id)
        assert run["state"]["type"] not in FINAL, f"the run ended before the stop:\n{stack.diagnostics()}"
        assert time.monotonic() < deadline, f"no bulk request was accepted:\n{stack.diagnostics()}"
        time.sleep(0.1)
    worker = stack.procs.started[WORKER]
    worker_process = psutil.Process(worker.pid)
    started = worker_process.children(recursive=True)
    assert started, "the worker runs the flow in no child process"

    tree = {p.pid: (p.ppid(), " ".join(p.cmdline()[:6])) for p in started}
    sent = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    try:
        run = stack.wait_for_state(flow_run_id, *FINAL, timeout=STOP_BOUND)
    except AssertionError as exc:
        after = {pid: psutil.pid_exists(pid) and psutil.Process(pid).ppid() for pid in tree}
        raise AssertionError(f"worker {worker.pid}; before: {tree}; after (ppid): {after}\n{exc}") from None
    took = time.monotonic() - sent
    # The wrapper stops the worker once its flow runs are gone and gives Prefect's worker
    # WORKER_STOP_SECONDS to shut down (on a loaded 2-CPU runner it took more than 15 s once).
    _, alive = psutil.wait_procs([worker_process, *started], timeout=WORKER_STOP_SECONDS + 10)
    leftovers = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    gone = time.monotonic() - sent
    print(f"SIGTERM to the worker: flow run {run['state']['type']} after {took:.1f} s, worker gone after "
          f"{gone:.1f} s; bulk accepted before the rerun: {_bulk(sandbox, 200)}")  # fmt: skip
    assert took <= STOP_BOUND
    assert not leftovers, f"still running after the worker's stop: {[p.cmdline() for p in leftovers]}"

    # The stop is proved; the rerun need not wait out the 40 s that only made the run outlast the bound:
    # the workflows the stopped run left complete now, as if the API had been fast (nothing else changes).
    sandbox.set_latency(0.5)
    rerun = subprocess.run(
        [CLEANLIST_ENRICH, "run", str(source), "--output", str(output), "--initial-poll-seconds", "1",
         "--json"],
        cwd=stack.root, env={**stack.env}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["status"] == "completed", summary
    assert summary["ambiguous_submissions"] == 0, summary
    assert sandbox.counters()["contacts_accepted_more_than_once"] == 0
    assert Path(output).exists()
