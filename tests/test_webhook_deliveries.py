"""Issue 21: the deliveries log read and explained, over real HTTP to the sandbox and the run's receiver.

Failures are injected between the sandbox (playing Cleanlist's retries) and the run's receiver by a
small proxy — the user's proxy of the report's "502 from … — your proxy": it answers 502 for a seeded
share of deliveries and can be down (connection refused) for a while.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from cleanlist.models import WebhookDeliveries, WebhookDelivery
from cleanlist.sandbox import SandboxServer
from cleanlist.store import EnrichmentStore
from cleanlist.webhooks import register_run
from cleanlist.webhooks.failures import DeliveryLog, failure_kind, likely_cause, origin_of
from tests.conftest import postgres_database
from tests.flow_helpers import messy_export, run_flow
from tests.sandbox_helpers import WebhookReceiver, api, people
from tests.test_client import client_for
from tests.test_webhooks import _assert_every_row_right, _events, _status_calls, _wait_for

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class FaultyProxy:
    """Forwards POSTs to `target`; answers 502 for a seeded `bad_share` of them; `down()`/`up()` close and
    reopen its port (connection refused meanwhile)."""

    def __init__(self, target: str, *, bad_share: float, seed: int = 21) -> None:
        self.target = target.rstrip("/")
        self.bad_share = bad_share
        self.port = _free_port()
        self.forwarded = 0
        self.refused_502 = 0
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with proxy._lock:
                    bad = proxy._random.random() < proxy.bad_share
                    proxy.refused_502 += bad
                if bad:
                    status = 502
                else:
                    answer = httpx.post(
                        proxy.target + self.path,
                        content=body,
                        headers={"content-type": "application/json"},
                        timeout=15,
                    )
                    status = answer.status_code
                    with proxy._lock:
                        proxy.forwarded += 1
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def up(self) -> None:
        server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join(timeout=5)
        self._server = None


@contextmanager
def _proxy(target: str, *, bad_share: float) -> Iterator[FaultyProxy]:
    proxy = FaultyProxy(target, bad_share=bad_share)
    try:
        yield proxy
    finally:
        proxy.down()


def _deliveries_of(sandbox: SandboxServer) -> dict[str, list[str]]:
    """Workflow id → its attempts' statuses, read from the sandbox's own record (ground truth)."""
    world = sandbox.state
    with world._lock:
        return {w.workflow_id: [a.status for a in w.deliveries] for w in world._workflows.values()}


# -- the deliveries log's unpublished shapes -----------------------------------------------------------

SHAPES = {
    "documented": {},
    "rows under data": {"deliveries_list": "data"},
    "bare list": {"deliveries_list": "bare"},
    "renamed fields": {"deliveries_fields": "renamed"},
    "delivered flag, no status word": {"deliveries_fields": "flag", "deliveries_list": "data"},
    "newest first": {"deliveries_order": "newest_first", "deliveries_fields": "renamed"},
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_shape_of_the_deliveries_log_reads_alike(make_sandbox, shape: str) -> None:
    sandbox = make_sandbox(latency=0.0, rate_limit=None, webhook_backoff_scale=0.0, **SHAPES[shape])
    with WebhookReceiver([(502, 0.0), (200, 0.0)]).running() as receiver, client_for(sandbox) as client:
        submitted = client.enrich_bulk(people(2), webhook_url=receiver.url)
        _wait_for(lambda: len(client.webhook_deliveries(submitted.workflow_id).deliveries) == 2, timeout=5)
        log = client.webhook_deliveries(submitted.workflow_id)
        with api(sandbox) as plain:
            raw = plain.get("/webhooks/deliveries", params={"workflow_id": submitted.workflow_id}).json()
    rows = raw if isinstance(raw, list) else raw[SHAPES[shape].get("deliveries_list", "deliveries")]
    assert len(rows) == 2  # the variation is played: rows where the option says
    if SHAPES[shape].get("deliveries_fields") == "renamed":
        assert {"attempt_number", "state", "status_code", "error_message"} <= set(rows[0])
    assert [(d.attempt, d.status, d.response_code) for d in log.deliveries] == [
        (1, "failed", 502),
        (2, "delivered", 200),
    ]
    assert log.deliveries[0].error is not None and "502" in log.deliveries[0].error
    assert all(d.attempted_at for d in log.deliveries)
    assert log.delivered and log.failed_attempts == 1


def test_odd_rows_of_the_log_are_read_leniently() -> None:
    odd = WebhookDeliveries.parse(
        {
            "items": [
                {"try": "2", "outcome": "SUCCESS", "http_status": 204},
                {"attempt_no": 1, "code": 503, "error": {"code": "x", "message": "upstream down"}},
                {"attempt": 3, "result": "weird"},
            ]
        }
    )
    assert [(d.attempt, d.status, d.response_code) for d in odd.deliveries] == [
        (1, "failed", 503),
        (2, "delivered", 204),
        (3, "weird", None),
    ]
    assert odd.deliveries[0].error == "upstream down"
    assert WebhookDeliveries.parse({"deliveries": None}).deliveries == []
    assert WebhookDeliveries.parse({"workflow_id": "w"}).deliveries == []


def test_failure_kinds_name_code_and_origin_never_the_token() -> None:
    url = "https://hooks.example.com:8443/hooks/SECRET-TOKEN"
    origin = origin_of(url)
    assert origin == "https://hooks.example.com:8443"
    cases = {
        "502 from https://hooks.example.com:8443": WebhookDelivery.model_validate(
            {"status": "failed", "response_code": 502}
        ),
        "connection refused from https://hooks.example.com:8443": WebhookDelivery.model_validate(
            {"status": "failed", "error": "ConnectError: [Errno 111] Connection refused"}
        ),
        "TLS error from https://hooks.example.com:8443": WebhookDelivery.model_validate(
            {"status": "failed", "error": "certificate verify failed: certificate has expired"}
        ),
        "timeout from https://hooks.example.com:8443": WebhookDelivery.model_validate(
            {"status": "failed", "error": "Receiver did not answer within 10 s"}
        ),
    }
    assert {failure_kind(attempt, origin): attempt for attempt in cases.values()}.keys() == cases.keys()
    assert "proxy" in likely_cause("502 from x") and "certificate" in likely_cause("TLS error from x")
    assert "SECRET" not in "".join(cases)


def test_the_log_decides_between_waiting_for_a_retry_and_polling() -> None:
    def rows(*codes: int | None) -> WebhookDeliveries:
        return WebhookDeliveries.parse(
            [
                {"attempt": n, "status": "delivered" if code == 200 else "failed", "response_code": code}
                for n, code in enumerate(codes, 1)
            ]
        )

    log = DeliveryLog(None, "https://hooks.example.com/hooks/tok", retry_scale=0.5, settle=1.0)  # type: ignore[arg-type]
    assert log.judge(rows(), "w0", elapsed=0.0) is None  # nothing to go by: poll now
    assert log.judge(rows(), "w1", elapsed=3.0) == 3.0  # no attempt yet: as long again, then poll
    assert log.judge(rows(502, 200), "w2") == 1.0  # delivered: the inbox has it in a moment
    # Two failed: attempts 3, 4, 5 still come after 2 + 4 + 8 s (× 0.5), then the settle time.
    assert log.judge(rows(502, 502), "w3") == pytest.approx(7.0 + 1.0)
    assert log.judge(rows(502, 502, 503, 502, 502), "w4") is None  # failed for good: poll now
    for polled in ("w1", "w3", "w4"):
        log.polled(polled)
    assert (log.failed_for_good, log.never_sent, log.waited) == (2, 1, 2)
    assert log.counts() == {"502 from https://hooks.example.com": 3}
    assert log.lines()[0] == (
        "3 deliveries failed: 502 from https://hooks.example.com — your proxy or load balancer "
        "(the receiver behind it is down or slow)"
    )


# -- a run whose deliveries fail ----------------------------------------------------------------------


def test_failed_deliveries_are_explained_and_only_those_failed_for_good_are_polled(
    tmp_path: Path, make_sandbox, api_env
) -> None:
    # Workflows complete over 6 s; Cleanlist's retries take 0.5 + 1 + 2 + 4 s (backoff × 0.5). The proxy in
    # front of the run's receiver is down (refused) until two workflows have failed for good, then it
    # answers 502 for 30 % of deliveries.
    sandbox = make_sandbox(rate_limit=None, latency=(0.2, 6.0), webhook_backoff_scale=0.5, seed=7)
    api_env(sandbox)
    source = messy_export(tmp_path / "crm.csv", unique=2500)
    listen_port = _free_port()
    with _proxy(f"http://127.0.0.1:{listen_port}", bad_share=0.3) as proxy:

        def bring_up_after_two_failed_for_good() -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if sum(len(a) >= 5 for a in _deliveries_of(sandbox).values()) >= 2:
                    proxy.up()
                    return
                time.sleep(0.02)

        watcher = threading.Thread(target=bring_up_after_two_failed_for_good, daemon=True)
        watcher.start()
        state, summary = run_flow(
            source=str(source),
            output=str(tmp_path / "out.csv"),
            store=f"sqlite:///{tmp_path / 'store.db'}",
            webhook_listen=f"127.0.0.1:{listen_port}",
            webhook_url=proxy.url,
            webhook_grace_seconds=1.0,
            webhook_retry_scale=0.5,
            initial_poll_seconds=6.5,  # overdue once done: the log then shows each workflow's attempts
        )
        watcher.join(timeout=5)

    assert state.is_completed(), state.message
    _assert_every_row_right(sandbox, tmp_path / "out.csv", summary, 2500)
    truth = _deliveries_of(sandbox)
    failed_for_good = [w for w, attempts in truth.items() if "delivered" not in attempts]
    with_failures = [w for w, attempts in truth.items() if "failed" in attempts]
    print("attempts per workflow:", sorted(len(a) for a in truth.values()), "summary:", summary)
    assert len(truth) == summary["workflows"] == 10
    assert len(failed_for_good) >= 2 and proxy.refused_502 > 0
    # Status calls only for the workflows whose deliveries failed for good: one each.
    assert _status_calls(sandbox) == summary["status_calls"] == len(failed_for_good)
    assert summary["webhook_fallbacks"] == len(failed_for_good)
    assert summary["webhook_failed_for_good"] == len(failed_for_good)
    assert summary["webhook_deliveries"] == len(truth) - len(failed_for_good)
    # The report names each failure kind and its count (per workflow, by its last failed attempt).
    origin = proxy.url
    failures: dict[str, int] = summary["webhook_failures"]
    assert set(failures) <= {f"502 from {origin}", f"connection refused from {origin}"}
    assert failures.get(f"connection refused from {origin}", 0) >= 2
    assert sum(failures.values()) <= len(with_failures)
    # Once per workflow; twice for one whose first answer showed no attempt yet (not done then).
    assert len(truth) <= summary["deliveries_log_calls"] <= 2 * len(truth)
    lines = summary["webhook_failure_report"]
    assert any(line.endswith("your receiver was down or unreachable") for line in lines), lines
    assert all("/hooks/" not in line for line in lines)  # never the token
    events = _events(state.state_details.flow_run_id, "cleanlist.webhook.failed", expected=len(failures))
    assert {e.payload["kind"]: e.payload["count"] for e in events} == failures


@pytest.mark.postgres
def test_a_store_unavailable_for_seconds_loses_no_delivery_and_accepts_none_twice(
    tmp_path: Path, make_sandbox, api_env
) -> None:
    sandbox = make_sandbox(rate_limit=None, latency=0.5, webhook_backoff_scale=0.5)
    api_env(sandbox)
    source = messy_export(tmp_path / "crm.csv", unique=750)
    with postgres_database() as store_url:
        with EnrichmentStore(store_url):  # the schema, before the lock
            pass
        engine = sa.create_engine(store_url.replace("postgresql://", "postgresql+psycopg://"))
        locked = threading.Event()

        def hold_the_table_once_a_bulk_is_accepted(seconds: float) -> None:
            # Writes to the deliveries table wait (reads do not): the receiver's store cannot record.
            _wait_for(lambda: sandbox.state.counters()["bulk_accepted"] >= 1, timeout=120)
            with engine.begin() as conn:
                conn.execute(sa.text("LOCK TABLE cleanlist_webhook_deliveries IN EXCLUSIVE MODE"))
                locked.set()
                time.sleep(seconds)  # the outage's length, not a wait for something to happen

        holder = threading.Thread(target=hold_the_table_once_a_bulk_is_accepted, args=(7.0,), daemon=True)
        holder.start()
        state, summary = run_flow(
            source=str(source),
            output=str(tmp_path / "out.csv"),
            store=store_url,
            webhook_listen="127.0.0.1:0",
            webhook_grace_seconds=0.5,
            webhook_retry_scale=0.5,
            initial_poll_seconds=20.0,  # not overdue before Cleanlist's retry: no poll settles it first
        )
        holder.join(timeout=10)
        assert locked.is_set()
        with engine.connect() as conn:
            query = sa.text("SELECT workflow_id FROM cleanlist_webhook_deliveries")
            rows = conn.execute(query).scalars().all()
        engine.dispose()

    assert state.is_completed(), state.message
    _assert_every_row_right(sandbox, tmp_path / "out.csv", summary, 750)
    truth = _deliveries_of(sandbox)
    with sandbox.state._lock:
        detail = [
            (a.attempt, a.response_code, a.error, a.delivered_at)
            for w in sandbox.state._workflows.values()
            for a in w.deliveries
        ]
    print("attempts:", truth, detail, "summary:", summary)
    # The receiver answered 503 while the store could not record; Cleanlist's retry delivered again.
    assert any(attempts[0] == "failed" and "delivered" in attempts for attempts in truth.values())
    assert all(attempts[-1] == "delivered" for attempts in truth.values())
    assert sorted(rows) == sorted(truth) and len(set(rows)) == len(rows)  # each recorded once
    assert summary["webhook_deliveries"] == 3 and summary["status_calls"] == 0


# -- the receiver under hostile senders ---------------------------------------------------------------


def test_receiver_allow_list_tls_and_deep_bodies(tmp_path: Path) -> None:
    from cleanlist.errors import InputError
    from cleanlist.webhooks.server import ReceiverServer

    with EnrichmentStore(f"sqlite:///{tmp_path / 'store.db'}") as store:
        store.start_run("r", {})
        token = register_run(store, "r")
        nested = b'{"event": "enrichment.completed", "workflow_id": "w", "status": "completed", "x": ' + (
            b"[" * 100_000 + b"]" * 100_000 + b"}"
        )
        with ReceiverServer(store, "127.0.0.1", 0, allow=["10.0.0.0/8"]) as outside:
            refused = httpx.post(f"{outside.base_url}/hooks/{token}", content=b"{}").status_code
        with ReceiverServer(store, "127.0.0.1", 0, allow=["127.0.0.0/8, 10.0.0.0/8"]) as inside:
            deep = httpx.post(f"{inside.base_url}/hooks/{token}", content=nested, timeout=10).status_code
            health = httpx.get(f"{inside.base_url}/healthz").status_code
        with pytest.raises(InputError, match="not an address or CIDR"):
            ReceiverServer(store, "127.0.0.1", 0, allow=["10.0.0.300/8"]).start()
        with pytest.raises(InputError, match="TLS certificate"):
            missing = (str(tmp_path / "no.pem"), str(tmp_path / "no.key"))
            ReceiverServer(store, "127.0.0.1", 0, tls=missing).start()
    assert (refused, deep, health) == (403, 422, 200)


def test_garbage_at_the_size_limit_to_a_valid_token_is_read_refused_and_changes_nothing(
    tmp_path: Path,
) -> None:
    """The flood benchmark's valid-token bodies: read whole (the token is known), answered 4xx, and no
    row of the store changes, including for a workflow of the run that is waiting for its delivery."""
    from benchmarks.webhook_flood import BIG_BODY, garbage_at_the_limit
    from cleanlist.webhooks.app import MAX_DELIVERY_BYTES
    from cleanlist.webhooks.server import ReceiverServer

    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    with EnrichmentStore(store_url) as store:
        store.start_run("r", {})
        token = register_run(store, "r")
        store.record_accepted(
            "r", workflow_id="public_bulk_w", chunk_key="0", enrichment_type="partial",
            keys=["nm:a|b|c.example"], task_ids=["t0"], worst_case_credits=1.0,
        )  # fmt: skip
        engine = sa.create_engine(store_url)

        def snapshot() -> dict[str, list[tuple[Any, ...]]]:
            with engine.connect() as conn:
                names = sa.inspect(conn).get_table_names()
                return {n: [tuple(r) for r in conn.exec_driver_sql(f"SELECT * FROM {n}")] for n in names}

        before = snapshot()
        head = b'{"event": "enrichment.completed", "workflow_id": "public_bulk_w", "status": "completed", '
        bodies = {
            "garbage at the limit": garbage_at_the_limit(),
            "results of the wrong type, at the limit": head
            + b'"results": "'
            + b"x" * (BIG_BODY - len(head) - 14)
            + b'"}',
            "one byte past the limit": garbage_at_the_limit() + b" ",
            "not JSON": b"\xff" * 1000,
        }
        with ReceiverServer(store, "127.0.0.1", 0) as receiver:
            answers = {
                what: httpx.post(f"{receiver.base_url}/hooks/{token}", content=body, timeout=30).status_code
                for what, body in bodies.items()
            }
        after = snapshot()
        engine.dispose()
    assert len(bodies["garbage at the limit"]) == BIG_BODY == MAX_DELIVERY_BYTES
    assert len(bodies["results of the wrong type, at the limit"]) == BIG_BODY
    assert answers == {
        "garbage at the limit": 422,
        "results of the wrong type, at the limit": 422,
        "one byte past the limit": 413,
        "not JSON": 422,
    }
    assert after == before


def test_a_cap_on_connections_answers_503_beyond_it(tmp_path: Path) -> None:
    from cleanlist.webhooks.server import ReceiverServer

    with EnrichmentStore(f"sqlite:///{tmp_path / 'store.db'}") as store:
        store.start_run("r", {})
        token = register_run(store, "r")
        with ReceiverServer(store, "127.0.0.1", 0, max_connections=5) as receiver:
            idle = [socket.create_connection(("127.0.0.1", receiver.port)) for _ in range(5)]
            try:
                # Once the server has accepted them, a request beyond the cap is answered 503 at once.
                _wait_for(lambda: _post_status(receiver.base_url, token) == 503)
            finally:
                for sock in idle:
                    sock.close()
            _wait_for(lambda: _post_status(receiver.base_url, token) == 422)


def _post_status(base_url: str, token: str) -> int:
    return httpx.post(f"{base_url}/hooks/{token}", content=b"{}", timeout=10).status_code


def test_the_sandbox_plays_receiver_failures_without_reaching_it(make_sandbox) -> None:
    failing = make_sandbox(latency=0.0, rate_limit=None, webhook_backoff_scale=0.0, webhook_fail_rate=1.0)
    down = make_sandbox(latency=0.0, rate_limit=None, webhook_backoff_scale=0.0, webhook_down_seconds=60.0)
    with WebhookReceiver([]).running() as receiver:
        logs = []
        for sandbox in (failing, down):
            with client_for(sandbox) as client:
                submitted = client.enrich_bulk(people(1), webhook_url=receiver.url)
                _wait_for(
                    lambda c=client, w=submitted.workflow_id: len(c.webhook_deliveries(w).deliveries) == 5
                )
                logs.append(client.webhook_deliveries(submitted.workflow_id).deliveries)
    assert receiver.bodies == []  # neither reached the receiver
    assert {(d.status, d.response_code) for d in logs[0]} == {("failed", 502)}
    assert {d.status for d in logs[1]} == {"failed"} and all("refused" in (d.error or "") for d in logs[1])


def test_chaos_schedules_draw_the_receiver_failures_and_keep_earlier_draws() -> None:
    from benchmarks.chaos.schedule import draw

    schedules = [draw(seed, profile=profile) for seed in range(1, 400) for profile in ("ci", "long")]
    assert any("deliveries failed (502 for 30 %)" in s.faults for s in schedules)
    assert any("receiver down a while" in s.faults for s in schedules)
    assert all(s.webhooks for s in schedules if "receiver down a while" in s.faults)
