"""Prefect's temporary server, started by the process that runs a flow and tied to it.

When no Prefect server is configured, Prefect starts a temporary one (`SubprocessASGIServer`) and stops
it at exit; but a process ended by a signal (SIGTERM's default action, SIGKILL) runs no exit hook, and
that server ran on for good. `OwnedTemporaryServer` starts it first, with Prefect's own command, in its
own session (a Ctrl-C at the terminal reaches the run, not the server under it) and told by the kernel
(PR_SET_PDEATHSIG) to end when the thread that started it ends — a SIGKILL of the process included.
Prefect's clients find that instance (Prefect keeps one temporary server per port). Used by the CLI
(`deployments/local_run.py`) and by `enrich_dataframe` called outside a flow.

Its port is the kernel's: this process binds a socket to port 0 and hands it to the server (uvicorn's
`--fd`). Prefect picks a random free port and lets uvicorn bind it only after the app has started (seconds
of migrations); two runs started at once in different PREFECT_HOMEs could pick the same port, the second
server failed to bind with a traceback, and its run's health check was answered by the other run's
server, so the run recorded itself in the other PREFECT_HOME (fault-schedule seed 5099608).

Its output goes to `PREFECT_HOME/cleanlist-temporary-server.log` (owner-only), not to the run's terminal:
the server logs its own troubles with tracebacks (on a busy machine, "database is locked" while it
validates a state, which it then answers with a retry), and a user of the CLI gets one line per event,
never a traceback (fault-schedule seed 3998015). A server that does not start says where its output is.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _die_with_parent() -> None:
    """In the server's process, before it runs: Linux sends it SIGTERM when the thread that started it
    (this process's main thread) ends — a SIGKILL of this process included."""
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the server is stopped at exit, but not after SIGKILL
        return


@functools.cache
def _server_class() -> type[Any]:
    from prefect.server.api.server import SubprocessASGIServer

    class _Owned(SubprocessASGIServer):
        """Prefect's temporary server, started by this process and tied to it (see the module docstring).

        The command is Prefect 3.9's own (`SubprocessASGIServer._run_uvicorn_command`), plus the tie, with
        the socket bound here instead of `--host`/`--port`.
        """

        _socket: socket.socket | None = None

        def find_available_port(self) -> int:
            """A port nobody else can take: this socket holds it until the server listens on it."""
            if self._socket is not None:
                self._socket.close()
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))  # not listening: a health check before the server is up is refused
            self._socket = sock
            return int(sock.getsockname()[1])

        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            import prefect
            from prefect.settings import get_current_settings

            server_env = {
                "PREFECT_UI_ENABLED": "0",
                "PREFECT__SERVER_EPHEMERAL": "1",
                "PREFECT__SERVER_FINAL": "1",
            }
            app_dir = str(prefect.__module_path__.parent)
            if self._socket is None:  # Prefect binds a port of its choosing only through this class
                self.port = self.find_available_port()
            assert self._socket is not None
            fd = self._socket.fileno()
            log = os.open(server_log(), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "--app-dir",
                    app_dir,
                    "--factory",
                    "prefect.server.api.server:create_app",
                    "--fd",
                    str(fd),
                    "--log-level",
                    "error",
                    "--lifespan",
                    "on",
                ],
                env={
                    **os.environ,
                    **server_env,
                    **get_current_settings().to_environment_variables(exclude_unset=True),
                },
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
                # Its own session: a Ctrl-C at the terminal reaches the run (which stops in order and
                # still reports to this server), not the server under it.
                start_new_session=True,
                pass_fds=(fd,),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            os.close(log)  # the server holds its own copy
            self._socket.close()  # the server holds the port now
            self._socket = None
            return process

    return _Owned


def _prefect_home() -> Path:
    """PREFECT_HOME, made if missing."""
    from prefect.settings import get_current_settings

    home = Path(get_current_settings().home)
    home.mkdir(parents=True, exist_ok=True)
    return home


def server_log() -> Path:
    """Where the temporary servers of PREFECT_HOME write their output (appended, owner-only)."""
    return _prefect_home() / "cleanlist-temporary-server.log"


# A first start on a new PREFECT_HOME migrates its database, which on a small, busy machine takes longer
# than Prefect's default 20 s; a user who set PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS gets theirs.
STARTUP_SECONDS_UNLESS_SET = 120


def _startup_timeout() -> int:
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    if "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in os.environ:
        return int(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    return STARTUP_SECONDS_UNLESS_SET


@contextlib.contextmanager
def _one_start_at_a_time() -> Iterator[None]:
    """Hold PREFECT_HOME's start lock while a temporary server starts.

    Each temporary server migrates the database of PREFECT_HOME as it starts; two runs started at once on
    one machine (two shells, a cron job beside a person) ran the same migrations side by side, and the
    loser's server died with "duplicate column name" and a traceback on the user's terminal. Behind this
    lock the second start finds the database migrated. Not on Windows (no fcntl): there, as in Prefect.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    # Closing the file lets go of the lock.
    with open(_prefect_home() / ".cleanlist-server-start.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


class OwnedTemporaryServer:
    """The temporary Prefect server of a run in this process, when no Prefect server is configured."""

    def __init__(self, server: Any) -> None:
        self._server = server

    @classmethod
    def start_if_needed(cls) -> OwnedTemporaryServer | None:
        """Start it (before Prefect would, so Prefect uses this one) unless PREFECT_API_URL is set."""
        from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

        if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
            return None
        # Prefect keeps one temporary server per port; this instance is the one its clients will find.
        server = _server_class()()
        timeout = _startup_timeout()
        with _one_start_at_a_time():
            try:
                server.start(timeout=timeout)
            except Exception as exc:  # Prefect's "Timed out while attempting to connect ...", a bad answer
                raise RuntimeError(
                    f"the temporary Prefect server did not start within {timeout} s ({exc}); its output "
                    f"is in {server_log()}. Set PREFECT_API_URL to use a Prefect server of your own"
                ) from None
        return cls(server)

    @property
    def pid(self) -> int | None:
        process = self._server.server_process
        return int(process.pid) if process is not None else None

    def stop(self) -> None:
        self._server.stop()

    def kill(self) -> None:
        """At once (a second signal, the deadline): SIGKILL, no wait for a graceful end."""
        process = self._server.server_process
        if process is not None and process.poll() is None:
            process.kill()
