"""Two runs started at once on one machine, with no Prefect server configured, each start a temporary
server on the same PREFECT_HOME: its database is migrated once, and neither prints a traceback.

Found by the fault-schedule harness (seeds 476606, 4568474: "two runs at once" on a temporary server):
the second server's migrations raced the first's and died with "duplicate column name: has_data".
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SCRIPT = """
import sys, time
from prefect.client.orchestration import get_client
from prefect.server.api.server import SubprocessASGIServer
from cleanlist_prefect.flows.temporary_server import OwnedTemporaryServer
go = float(sys.argv[1])
time.sleep(max(0.0, go - time.time()))  # both processes start their servers at the same moment
server = OwnedTemporaryServer.start_if_needed()
assert server is not None and server.pid is not None
with get_client(sync_client=True) as client:
    assert client.api_healthcheck() is None
server.stop()
print("served")
"""


def test_two_temporary_servers_started_at_once_on_one_home_both_start_cleanly(tmp_path: Path) -> None:
    import time

    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="240",
    )
    go = time.time() + 8  # after both interpreters have imported what they need
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT, str(go)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=300) for proc in procs]

    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-2000:]
        assert out.strip() == "served"
        assert "Traceback" not in err and "startup failed" not in err, err[-2000:]
