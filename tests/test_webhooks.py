"""Webhooks end to end: the sandbox POSTs deliveries over HTTP to the receiver, which writes them to a real
store; runs pick them up instead of polling, and fall back to polling when a delivery never comes."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from cleanlist.sandbox import SandboxServer
from cleanlist.store import EnrichmentStore
from cleanlist.store.schema import contacts, webhook_deliveries
from cleanlist.webhooks import hook_url, register_run
from cleanlist.webhooks.server import ReceiverServer
from tests.conftest import postgres_database
from tests.flow_helpers import messy_export, read_csv, run_flow

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _task_result(sandbox: SandboxServer, task_id: str) -> dict[str, Any]:
    """What the sandbox answers for a task, read from its state (not over HTTP: that has a rate limit)."""
    world = sandbox.state
    workflow, index = world.find_task(world.authenticate(f"Bearer {sandbox.api_key}"), task_id)
    return world.task_view(workflow, index)


def _assert_every_row_right(
    sandbox: SandboxServer, out_path: Path, summary: dict[str, Any], unique: int
) -> None:
    out = read_csv(out_path)
    assert len(out) == unique
    assert set(out["cleanlist_status"]) <= {"enriched", "not_found"}
    for _, row in out.iterrows():
        assert row["cleanlist_email"] == (
            _task_result(sandbox, row["cleanlist_task_id"])["primary_email"] or ""
        )
    counters = sandbox.counters()
    assert counters["contacts_accepted"] == unique
    assert counters["contacts_accepted_more_than_once"] == 0
    assert summary["credits_spent"] == pytest.approx(counters["credits_charged"])


def _status_calls(sandbox: SandboxServer) -> int:
    return sum(sandbox.counters()["requests"].get("enrich-status", {}).values())


def test_deliveries_replace_polling_and_every_row_is_right(tmp_path: Path, make_sandbox, api_env) -> None:
    sandbox = make_sandbox(rate_limit=None, latency=0.2)
    api_env(sandbox)
    source = messy_export(tmp_path / "crm.csv", unique=600)
    state, summary = run_flow(
        source=str(source),
        output=str(tmp_path / "out.csv"),
        store=f"sqlite:///{tmp_path / 'store.db'}",
        webhook_listen="127.0.0.1:0",
        webhook_grace_seconds=5.0,
    )

    assert state.is_completed(), state.message
    assert summary["workflows"] == 3
    assert summary["webhook_deliveries"] == 3 and summary["status_calls_saved"] == 3
    assert summary["webhook_fallbacks"] == 0 and summary["status_calls"] == 0
    status_calls_before_checks = _status_calls(sandbox)
    assert status_calls_before_checks == 0
    _assert_every_row_right(sandbox, tmp_path / "out.csv", summary, 600)
    # One `cleanlist.webhook.received` event per delivery picked up, about the flow run.
    events = _events(state.state_details.flow_run_id, "cleanlist.webhook.", expected=3)
    assert sorted(e.payload["results"] for e in events) == [100, 250, 250]
    assert len({e.payload["workflow_id"] for e in events}) == 3


def _events(flow_run_id: Any, prefix: str, expected: int) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    def ours() -> EventFilter:  # its time window ends when it is made
        return EventFilter(
            resource=EventResourceFilter(id=[f"prefect.flow-run.{flow_run_id}"]),
            event=EventNameFilter(prefix=[prefix]),
        )

    with get_client(sync_client=True) as client:
        _wait_for(lambda: len(client.read_events(filter=ours(), limit=50).events) >= expected, timeout=20)
        events: list[Any] = client.read_events(filter=ours(), limit=50).events
    return events


def test_truncated_deliveries_fetch_the_rest_and_every_row_is_right(
    tmp_path: Path, make_sandbox, api_env
) -> None:
    sandbox = make_sandbox(rate_limit=None, latency=0.2, webhook_results_limit=100)
    api_env(sandbox)
    source = messy_export(tmp_path / "crm.csv", unique=600)
    state, summary = run_flow(
        source=str(source),
        output=str(tmp_path / "out.csv"),
        store=f"sqlite:///{tmp_path / 'store.db'}",
        webhook_listen="127.0.0.1:0",
        webhook_grace_seconds=5.0,
    )

    assert state.is_completed(), state.message
    assert summary["webhook_deliveries"] == 3 and summary["webhook_fallbacks"] == 0
    # Chunks of 250, 250 and 100: one status call for each of the two truncated deliveries (the results
    # past the first 100), none for the last.
    assert summary["status_calls"] == 2 and summary["status_calls_saved"] == 1
    assert summary["task_lookups"] == 0 and summary["unresolved"] == 0
    _assert_every_row_right(sandbox, tmp_path / "out.csv", summary, 600)


def test_a_receiver_that_hears_nothing_completes_by_polling(tmp_path: Path, make_sandbox, api_env) -> None:
    sandbox = make_sandbox(rate_limit=None, latency=0.2, webhook_drop_rate=1.0)
    api_env(sandbox)
    source = messy_export(tmp_path / "crm.csv", unique=600)
    state, summary = run_flow(
        source=str(source),
        output=str(tmp_path / "out.csv"),
        store=f"sqlite:///{tmp_path / 'store.db'}",
        webhook_listen="127.0.0.1:0",
        webhook_grace_seconds=0.2,
    )

    assert state.is_completed(), state.message
    assert summary["webhook_deliveries"] == 0 and summary["status_calls_saved"] == 0
    assert summary["webhook_fallbacks"] == 3 and summary["status_calls"] >= 3
    _assert_every_row_right(sandbox, tmp_path / "out.csv", summary, 600)


def _post(url: str, body: bytes | dict[str, Any]) -> int:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        url, content=content, headers={"Content-Type": "application/json"}, timeout=10
    ).status_code


def _rows(store_url: str) -> list[tuple[Any, ...]]:
    import sqlalchemy as sa

    engine = sa.create_engine(store_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as conn:
        found = [tuple(row) for row in conn.execute(sa.select(contacts).order_by(contacts.c.contact_key))]
        found += [tuple(row) for row in conn.execute(sa.select(webhook_deliveries).order_by("workflow_id"))]
    engine.dispose()
    return found


@pytest.mark.postgres
def test_forged_deliveries_to_a_shared_receiver_change_no_row(tmp_path: Path, make_sandbox, api_env) -> None:
    sandbox = make_sandbox(rate_limit=None, latency=0.2)
    api_env(sandbox)
    source = messy_export(tmp_path / "crm.csv", unique=300)
    with postgres_database() as store_url, EnrichmentStore(store_url) as store:
        receiver = ReceiverServer(store, "127.0.0.1", 0).start()
        try:
            state, summary = run_flow(
                source=str(source),
                output=str(tmp_path / "out.csv"),
                store=store_url,
                webhook_url=receiver.base_url,  # a long-lived receiver shared through the store
                webhook_grace_seconds=5.0,
            )
            assert state.is_completed(), state.message
            assert summary["webhook_deliveries"] == 2 and summary["status_calls"] == 0
            _assert_every_row_right(sandbox, tmp_path / "out.csv", summary, 300)

            workflow_id = next(iter(sandbox.state._workflows_by_id))  # the test fake's own record
            real_url = sandbox.state._workflows_by_id[workflow_id].webhook_url
            assert real_url is not None and real_url.startswith(receiver.base_url + "/hooks/")
            real = sandbox.state.webhook_payload(sandbox.state._workflows_by_id[workflow_id])
            # Another run on the same store, with a ledger entry whose delivery has not come yet.
            store.start_run("other-run", {})
            other_url = hook_url(receiver.base_url, register_run(store, "other-run"))
            store.record_accepted(
                "other-run",
                workflow_id="public_bulk_other",
                chunk_key="0",
                enrichment_type="partial",
                keys=["nm:a|b|c.example"],
                task_ids=["task-owned"],
                worst_case_credits=1.0,
            )
            before = _rows(store_url)

            answers = {
                "guessed path": _post(f"{receiver.base_url}/hooks/guessed-token", real),
                "unknown workflow id": _post(real_url, {**real, "workflow_id": "public_bulk_unknown"}),
                "wrong token (another run's)": _post(other_url, real),
                "duplicated real delivery": _post(real_url, real),
                "not a payload": _post(real_url, b"{not json"),
                "oversized body": _post(real_url, b"x" * (5 * 2**20)),
                "no token": _post(f"{receiver.base_url}/hooks/", real),
            }
            after_forgeries = _rows(store_url)
            foreign = {
                **real,
                "workflow_id": "public_bulk_other",
                "results": [{**real["results"][0], "task_id": "task-owned"}]
                + [{**r, "task_id": f"foreign-{i}"} for i, r in enumerate(real["results"][1:4])],
                "results_truncated": 0,
            }
            answers["foreign task ids (3 of 4)"] = _post(other_url, foreign)
            kept = json.loads(store.delivered(["public_bulk_other"])["public_bulk_other"])
        finally:
            receiver.stop()

    print("forged deliveries:", answers)
    assert answers == {
        "guessed path": 404,
        "unknown workflow id": 404,
        "wrong token (another run's)": 404,
        "duplicated real delivery": 200,  # idempotent: the API must not retry it, nothing changes
        "not a payload": 422,
        "oversized body": 413,
        "no token": 404,
        "foreign task ids (3 of 4)": 200,
    }
    assert after_forgeries == before
    assert [r["task_id"] for r in kept["results"]] == ["task-owned"]


def test_receiver_command_serves_until_stopped(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    process = subprocess.Popen(
        [sys.executable, "-m", "cleanlist_prefect.deployments.cli",
         "receiver", "--port", "0", "--store", store_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("receiving webhooks on http://127.0.0.1:"), line
        base = line.split()[3].removesuffix("/hooks/<token>")
        assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200
        assert _post(f"{base}/hooks/{'x' * 43}", {"workflow_id": "w", "status": "completed"}) == 404
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
    assert "Traceback" not in stderr


def _wait_for(condition: Any, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_sandbox_drops_truncates_and_delays_deliveries_on_request(make_sandbox) -> None:
    from datetime import datetime

    from tests.sandbox_helpers import WebhookReceiver, api, bulk, people

    sandbox = make_sandbox(rate_limit=None, latency=0.05, webhook_drop_rate=0.5, webhook_results_limit=100)
    delayed = make_sandbox(rate_limit=None, latency=0.05, webhook_delay=0.4)
    receiver = WebhookReceiver([])
    with receiver.running(), api(sandbox) as client, api(delayed) as late_client:
        ids = [
            bulk(client, people(150, tag=f"w{n}"), webhook_url=receiver.url).json()["workflow_id"]
            for n in range(8)
        ]
        dropped = {wid for wid in ids if sandbox.state.webhook_dropped(sandbox.state._workflows_by_id[wid])}
        assert 0 < len(dropped) < len(ids)  # seeded: the same share on every run
        _wait_for(lambda: len(receiver.bodies) == len(ids) - len(dropped))
        late_id = bulk(late_client, people(3), webhook_url=receiver.url).json()["workflow_id"]
        _wait_for(lambda: any(body["workflow_id"] == late_id for body in receiver.bodies))
        # The sandbox logs a delivery once the receiver's answer is back, a moment after the body arrived.
        late: dict[str, Any] = {}

        def logged() -> bool:
            late.update(late_client.get("/webhooks/deliveries", params={"workflow_id": late_id}).json())
            return bool(late["deliveries"])

        _wait_for(logged)
        late_status = late_client.get("/enrich/status", params={"workflow_id": late_id}).json()

    delivered = {body["workflow_id"]: body for body in receiver.bodies if body["workflow_id"] != late_id}
    assert set(delivered) == set(ids) - dropped
    assert all(len(b["results"]) == 100 and b["results_truncated"] == 50 for b in delivered.values())
    assert all(b["results_limit"] == 100 for b in delivered.values())
    first = datetime.fromisoformat(late["deliveries"][0]["delivered_at"])
    assert (first - datetime.fromisoformat(late_status["completed_at"])).total_seconds() >= 0.4


@pytest.mark.postgres
def test_receiver_killed_mid_run_the_run_completes_by_polling(tmp_path: Path, make_sandbox, api_env) -> None:
    import threading

    sandbox = make_sandbox(rate_limit=(2, 1.0), latency=0.2)
    api_env(sandbox, rate_limit="2/1")
    source = messy_export(tmp_path / "crm.csv", unique=1500)
    with postgres_database() as store_url, EnrichmentStore(store_url) as store:
        receiver = ReceiverServer(store, "127.0.0.1", 0).start()
        killed = threading.Event()

        def kill_after_first_delivery() -> None:
            import sqlalchemy as sa

            engine = sa.create_engine(store_url.replace("postgresql://", "postgresql+psycopg://"))
            count = sa.select(sa.func.count()).select_from(webhook_deliveries)
            with engine.connect() as conn:
                _wait_for(lambda: conn.execute(count).scalar_one() > 0, timeout=60)
            engine.dispose()
            receiver.stop()
            killed.set()

        watcher = threading.Thread(target=kill_after_first_delivery, daemon=True)
        watcher.start()
        try:
            state, summary = run_flow(
                source=str(source),
                output=str(tmp_path / "out.csv"),
                store=store_url,
                webhook_url=receiver.base_url,
                webhook_grace_seconds=1.0,
            )
        finally:
            watcher.join(timeout=60)
            receiver.stop()

    assert killed.is_set()
    assert state.is_completed(), state.message
    assert summary["workflows"] == 6
    assert 1 <= summary["webhook_deliveries"] < 6
    assert summary["webhook_deliveries"] + summary["webhook_fallbacks"] >= 6
    _assert_every_row_right(sandbox, tmp_path / "out.csv", summary, 1500)


def test_a_rerun_takes_a_delivery_a_shared_receiver_kept_for_a_dead_run(
    tmp_path: Path, make_sandbox, api_env
) -> None:
    import csv

    from cleanlist.prepare import prepare_row
    from tests.sandbox_helpers import api, bulk, people

    sandbox = make_sandbox(rate_limit=None, latency=0.1, webhook_backoff_scale=0.05)
    api_env(sandbox)
    contacts = people(40, tag="dead")
    source = tmp_path / "people.csv"
    with source.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["first_name", "last_name", "company_domain"])
        writer.writeheader()
        writer.writerows(contacts)
    keys = [prepare_row(contact).key for contact in contacts]
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    with EnrichmentStore(store_url) as store:
        receiver = ReceiverServer(store, "127.0.0.1", 0).start()
        try:
            # A run that submitted, was told its workflow, and died before any result came.
            store.start_run("dead-run", {})
            url = hook_url(receiver.base_url, register_run(store, "dead-run"))
            with api(sandbox) as client:
                accepted = bulk(client, contacts, webhook_url=url).json()
            store.record_accepted(
                "dead-run",
                workflow_id=accepted["workflow_id"],
                chunk_key="0",
                enrichment_type="partial",
                keys=[key for key in keys if key],
                task_ids=accepted["task_ids"],
                worst_case_credits=40.0,
            )
            store.finish_run("dead-run", "crashed", {})
            _wait_for(lambda: bool(store.delivered([accepted["workflow_id"]])))
        finally:
            receiver.stop()
    status_calls_before = _status_calls(sandbox)

    state, summary = run_flow(
        source=str(source), output=str(tmp_path / "out.csv"), store=store_url, webhook_listen="127.0.0.1:0"
    )

    assert state.is_completed(), state.message
    assert summary["resumed_in_flight"] == 40 and summary["submitted"] == 0
    assert summary["webhook_deliveries"] == 1 and summary["status_calls"] == 0
    assert _status_calls(sandbox) == status_calls_before  # the delivery answered for the dead run
    out = read_csv(tmp_path / "out.csv")
    assert len(out) == 40
    for _, row in out.iterrows():
        assert row["cleanlist_email"] == (
            _task_result(sandbox, row["cleanlist_task_id"])["primary_email"] or ""
        )
    assert sandbox.counters()["contacts_accepted_more_than_once"] == 0


@pytest.mark.parametrize("value", ["8088", "host:", ":8088", "host:99999", "host:port"])
def test_a_bad_webhook_listen_is_one_line(value: str) -> None:
    from cleanlist.errors import InputError
    from cleanlist.run.options import EnrichOptions

    with pytest.raises(InputError) as caught:
        EnrichOptions.from_parameters({"source": "in.csv", "output": "out.csv", "webhook_listen": value})
    assert "\n" not in str(caught.value) and "webhook_listen" in str(caught.value)
    assert "HOST:PORT" in str(caught.value)


def _closed_by_server(sock: socket.socket, within: float) -> tuple[bool, bytes]:
    """Whether the server closed `sock` within `within` seconds, and what it sent before closing."""
    sock.settimeout(within)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except TimeoutError:
        return False, received
    except ConnectionResetError:
        pass
    return True, received


def test_half_sent_requests_are_closed_and_the_receiver_keeps_serving(tmp_path: Path) -> None:
    with EnrichmentStore(f"sqlite:///{tmp_path / 'store.db'}") as store:
        store.start_run("r", {})
        token = register_run(store, "r")  # a body is read only for a known token: it must be one
        receiver = ReceiverServer(store, "127.0.0.1", 0, header_timeout=0.5, body_timeout=0.5).start()
        try:
            address = ("127.0.0.1", receiver.port)
            half_heads = [socket.create_connection(address) for _ in range(200)]
            for n, sock in enumerate(half_heads):
                sock.sendall(b"POST /hooks/tok HTTP/1.1\r\nHost: x\r\n" if n % 2 else b"PO")
            silent = socket.create_connection(address)  # opened, never says a word
            half_body = socket.create_connection(address)
            head = f"POST /hooks/{token} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
            half_body.sendall(head.encode() + b'{"a"')
            trickle = socket.create_connection(address)  # a byte at a time never buys more time
            for byte in b"POST /hooks/tok HTTP/1.1\r\n":
                try:
                    trickle.sendall(bytes([byte]))
                except OSError:
                    break
                time.sleep(0.05)

            still_open = [s for s in [*half_heads, silent] if not _closed_by_server(s, within=10)[0]]
            body_closed, body_answer = _closed_by_server(half_body, within=10)
            assert len(still_open) == 0
            assert body_closed and body_answer.startswith(b"HTTP/1.1 408")
            assert _closed_by_server(trickle, within=10)[0]
            # A whole request is still answered, on a new connection and on a kept-alive one.
            with httpx.Client(base_url=receiver.base_url) as client:
                assert client.get("/healthz").status_code == 200
                time.sleep(0.2)
                assert client.get("/healthz").status_code == 200
        finally:
            for sock in [*half_heads, silent, half_body, trickle]:
                sock.close()
            receiver.stop()
