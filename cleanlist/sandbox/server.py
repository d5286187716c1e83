"""Run the sandbox: in a background thread for tests (`SandboxServer`), or in the foreground for the CLI."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

import httpx
import uvicorn
from fastapi import FastAPI

from cleanlist.sandbox.app import ADMIN_PREFIX, PUBLIC_PREFIX, create_app
from cleanlist.sandbox.config import Endpoint, FaultSpec, SandboxConfig
from cleanlist.sandbox.state import SandboxState


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind before serving, so port 0 yields a known free port and a busy port fails up front."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must be IPPROTO_TCP, not 0: asyncio only sets TCP_NODELAY on accepted sockets that say so,
    # and without it every keep-alive response waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        # Listening at once lets clients connect (and queue) before uvicorn has finished starting.
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def uvicorn_server(app: FastAPI) -> uvicorn.Server:
    """A quiet uvicorn server: warnings only, no access log, quick to shut down."""
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=2,
        log_config=None,  # uvicorn's own would close every log handler of the process (Prefect's too)
    )
    return uvicorn.Server(config)


def serve_forever(config: SandboxConfig, sock: socket.socket) -> None:
    """Serve on an already bound socket in this thread until interrupted (Ctrl-C)."""
    uvicorn_server(create_app(config)).run(sockets=[sock])


class SandboxServer:
    """A sandbox on 127.0.0.1:<free port>, served by uvicorn in a background thread."""

    def __init__(
        self,
        config: SandboxConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        startup_timeout: float = 10.0,
    ) -> None:
        self.config = config or SandboxConfig()
        self.state = SandboxState(self.config)
        self.app = create_app(state=self.state)
        self._host = host
        self._port = port
        self._startup_timeout = startup_timeout
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._bound_port: int | None = None
        self._admin: httpx.Client | None = None

    @property
    def base_url(self) -> str:
        """`http://host:port`; clients append /api/v1/public."""
        return f"http://{self._host}:{self.port}"

    @property
    def public_url(self) -> str:
        """`base_url` + /api/v1/public."""
        return self.base_url + PUBLIC_PREFIX

    @property
    def port(self) -> int:
        """The bound port (known once started)."""
        if self._bound_port is None:
            raise RuntimeError("the sandbox has not been started")
        return self._bound_port

    @property
    def api_key(self) -> str:
        """The main key of the sandbox's organization."""
        return self.config.api_key

    def start(self) -> Self:
        """Start serving and return once the server answers."""
        if self._thread is not None:
            raise RuntimeError("the sandbox is already running")
        self._socket = bind_socket(self._host, self._port)
        self._bound_port = int(self._socket.getsockname()[1])
        server = uvicorn_server(self.app)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [self._socket]}, name="cleanlist-sandbox", daemon=True
        )
        self._server, self._thread = server, thread
        thread.start()
        deadline = time.monotonic() + self._startup_timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the sandbox server did not start")
            time.sleep(0.01)
        self._admin = httpx.Client(
            base_url=self.base_url + ADMIN_PREFIX,
            timeout=10.0,
            headers={"Authorization": f"Bearer {self.api_key}"},
        )
        return self

    def stop(self) -> None:
        """Stop serving, cancel pending webhook deliveries and release the port."""
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10.0)
        if self._socket is not None:
            self._socket.close()
        self._server, self._thread, self._socket = None, None, None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- admin API over HTTP ----------------------------------------------------------------------

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        if self._admin is None:
            raise RuntimeError("the sandbox is not running")
        response = self._admin.request(method, path, json=body)
        response.raise_for_status()
        return response.json()

    def counters(self) -> dict[str, Any]:
        """`/_sandbox/counters`: requests by endpoint and status, contacts, duplicates, credits."""
        result: dict[str, Any] = self._call("GET", "/counters")
        return result

    def requests_log(self) -> list[dict[str, Any]]:
        """`/_sandbox/requests`: every public request, oldest first."""
        result: list[dict[str, Any]] = self._call("GET", "/requests")
        return result

    def add_credits(self, amount: float) -> float:
        """Top up; returns the new balance."""
        return float(self._call("POST", "/credits", {"add": amount})["credits"])

    def set_credits(self, amount: float) -> float:
        """Set the balance; returns it."""
        return float(self._call("POST", "/credits", {"set": amount})["credits"])

    def set_latency(self, seconds: float) -> int:
        """Test facility: new workflows take `seconds`; running ones complete within `seconds` from now.
        Returns how many running workflows were brought forward."""
        return int(self._call("POST", "/latency", {"seconds": seconds})["brought_forward"])

    def set_rate_limit(self, rate_limit: tuple[int, float] | None) -> None:
        """Test facility: replace the rate limit ((requests, window seconds), None: no limit)."""
        self._call("POST", "/rate-limit", {"rate_limit": list(rate_limit) if rate_limit else None})

    def revoke_key(self, api_key: str | None = None) -> None:
        """Revoke a key (the main one by default)."""
        self._call("POST", "/keys/revoke", {"api_key": api_key or self.api_key})

    def restore_key(self, api_key: str | None = None, rearm: bool = False) -> None:
        """Restore a revoked key (the main one by default).

        This disarms `revoke_after_batches` for the key, so a revoke → restore → rerun can finish;
        `rearm=True` arms it again instead, counting accepted batches from zero.
        """
        self._call("POST", "/keys/restore", {"api_key": api_key or self.api_key, "rearm": rearm})

    def refuse_contacts_containing(self, *substrings: str) -> None:
        """Replace the `refuse_contacts_containing` test facility's substrings (none: refuse nothing)."""
        self._call("POST", "/refuse-contacts", {"containing": list(substrings)})

    def set_faults(self, faults: Mapping[Endpoint, FaultSpec | Mapping[str, Any]]) -> None:
        """Replace the injected faults (FaultSpec objects or their JSON shape)."""
        body = {
            endpoint: spec.model_dump() if isinstance(spec, FaultSpec) else dict(spec)
            for endpoint, spec in faults.items()
        }
        self._call("POST", "/faults", body)

    def clear_faults(self) -> None:
        """Remove every injected fault."""
        self._call("DELETE", "/faults")

    def reset(self) -> None:
        """Clear counters and the request log."""
        self._call("POST", "/reset")

    def forget(self) -> int:
        """Drop every workflow (an API restarted without memory); returns how many were dropped."""
        return int(self._call("POST", "/forget")["forgotten"])
