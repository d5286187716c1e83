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

from benchmarks.procs import seed_prefect_home

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
    # The servers' own output is kept beside their database, owner-only, and holds no failed start either.
    server_log = home / "cleanlist-temporary-server.log"
    assert server_log.stat().st_mode & 0o077 == 0
    logged = server_log.read_text(encoding="utf-8", errors="replace")
    assert "Traceback" not in logged and "startup failed" not in logged, logged[-2000:]


DECOY = """
import http.server, random, sys, threading
import httpx
from prefect.server.api import server as prefect_server
from cleanlist_prefect.flows.temporary_server import OwnedTemporaryServer


class Decoy(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"decoy")

    def log_message(self, *args):
        pass


decoy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Decoy)
threading.Thread(target=decoy.serve_forever, daemon=True).start()
taken = decoy.server_address[1]
# The race, made certain: Prefect's check finds the port free, then another process's server has it.
prefect_server.random.choice = lambda _: taken
prefect_server.SubprocessASGIServer.is_port_available = staticmethod(lambda port: True)
server = OwnedTemporaryServer.start_if_needed()
assert server is not None
try:
    print(httpx.get(server._server.api_url + "/health").text)
finally:
    server.stop()
"""


def test_a_temporary_server_never_shares_its_port_with_another_process(tmp_path: Path) -> None:
    """Prefect chose a free port, then let the server bind it only after its start-up (migrations); a
    server of another process that took the port meanwhile answered this run's health check, and the run
    recorded itself on that other server (fault-schedule seed 5099608: two runs at once, each on a
    temporary server in its own PREFECT_HOME, "[Errno 98] address already in use" on stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="240",
    )
    env.update(seed_prefect_home(tmp_path / "prefect-home"))  # a machine that ran Prefect before
    done = subprocess.run(
        [sys.executable, "-c", DECOY], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "true", done.stdout  # Prefect's own health answer, not the decoy's
    assert "Traceback" not in done.stderr and "address already in use" not in done.stderr, done.stderr[-2000:]


WHERE_OUTPUT_GOES = """
import os
from cleanlist_prefect.flows.temporary_server import OwnedTemporaryServer, server_log
server = OwnedTemporaryServer.start_if_needed()
assert server is not None and server.pid is not None
try:
    print(os.readlink(f"/proc/{server.pid}/fd/1"), os.readlink(f"/proc/{server.pid}/fd/2"), server_log())
finally:
    server.stop()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_temporary_servers_output_goes_to_its_log_never_to_the_runs_terminal(tmp_path: Path) -> None:
    """The server logs its own troubles with tracebacks (on a busy machine: "database is locked" while it
    validates a state); they reached the user's terminal through the run's stderr (seed 3998015)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="240")  # fmt: skip
    env.update(seed_prefect_home(tmp_path / "prefect-home"))
    done = subprocess.run([sys.executable, "-c", WHERE_OUTPUT_GOES], env=env, capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    stdout, stderr, log = done.stdout.split()
    assert stdout == stderr == log == str(tmp_path / "prefect-home" / "cleanlist-temporary-server.log")

    # A start that does not finish in time says, in one line, where the server's output is.
    fresh = tmp_path / "fresh-home"
    env.update(PREFECT_HOME=str(fresh), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1")
    late = subprocess.run([sys.executable, "-c", WHERE_OUTPUT_GOES], env=env, capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip
    assert late.returncode != 0
    assert "the temporary Prefect server did not start within 1 s" in late.stderr
    assert str(fresh / "cleanlist-temporary-server.log") in late.stderr
