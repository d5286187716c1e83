"""The sandbox, exercised over real HTTP with plain httpx, as a client of the real API would see it."""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cleanlist.sandbox import DEFAULT_SANDBOX_KEY, ENRICHMENT_TYPES, FaultSpec, SandboxConfig, SandboxServer
from cleanlist.sandbox.cli import add_sandbox_parser, config_from_args
from cleanlist.sandbox.contacts import ContactRecord
from tests.sandbox_helpers import (
    WebhookReceiver,
    api,
    bulk,
    people,
    wait_for_completion,
    window_with_room,
)

FIELD_RULE = (
    "Each contact must include linkedin_url OR first_name + last_name + (company_domain or company_name)."
)
OTHER_KEY = "clapi_" + "other000" * 8
NO_API_KEY = "clapi_" + "noaccess" * 8
EXTENSION_KEY = "clext_" + "browser0" * 8

StartSandbox = Callable[..., SandboxServer]


@pytest.fixture
def start_sandbox() -> Iterator[StartSandbox]:
    """Start sandboxes (instant completion, no rate limit unless overridden); stop them afterwards."""
    servers: list[SandboxServer] = []

    def start(**overrides: Any) -> SandboxServer:
        config = SandboxConfig(**{"latency": 0.0, "rate_limit": None, **overrides})
        servers.append(SandboxServer(config).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def sandbox(start_sandbox: StartSandbox) -> SandboxServer:
    """One default sandbox with a second key, a no-API key and a configured clext_ key."""
    return start_sandbox(extra_keys=(OTHER_KEY, EXTENSION_KEY), no_api_access_keys=(NO_API_KEY,))


# --- success shapes -------------------------------------------------------------------------------


def test_validate_key_names_user_and_organization(sandbox: SandboxServer) -> None:
    with api(sandbox) as client:
        body = client.get("/auth/validate-key").json()
    assert body["valid"] is True
    assert body["user_id"].startswith("user_")
    assert body["organization_id"].startswith("org_")


def test_balance_is_the_organizations_credits(start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox(credits=1234.5)
    with api(sandbox) as client:
        response = client.get("/credits/balance")
        organization_id = client.get("/auth/validate-key").json()["organization_id"]
    assert response.status_code == 200
    assert response.json() == {"organization_id": organization_id, "credits": 1234.5}


def test_bulk_returns_one_task_id_per_contact_in_order(sandbox: SandboxServer) -> None:
    with api(sandbox) as client:
        response = bulk(client, people(3))
        body = response.json()
        assert response.status_code == 200
        assert body["workflow_id"].startswith("public_bulk_")
        assert body["status"] == "processing"
        assert body["message"] == "Bulk enrichment started"
        assert body["total_contacts"] == 3
        assert len(set(body["task_ids"])) == 3
        completed = wait_for_completion(client, body["workflow_id"])
    assert [result["task_id"] for result in completed["results"]] == body["task_ids"]


def test_completed_workflow_reports_summary_and_results(sandbox: SandboxServer) -> None:
    with api(sandbox) as client:
        submitted = bulk(client, people(40), enrichment_type="full").json()
        body = wait_for_completion(client, submitted["workflow_id"])
    assert body["workflow_id"] == submitted["workflow_id"]
    assert body["enrichment_type"] == "full"
    assert body["total_contacts"] == 40
    assert body["completed_at"] is not None
    results = body["results"]
    summary = body["summary"]
    assert summary["total"] == 40
    assert summary["successful"] == sum(result["status"] == "completed" for result in results)
    assert summary["failed"] == 40 - summary["successful"]
    assert summary["emails_found"] == sum(result["primary_email"] is not None for result in results)
    assert summary["phones_found"] == sum(bool(result["personal_phone_numbers"]) for result in results)
    found = next(result for result in results if result["primary_email"])
    assert found["primary_email_status"] in ("reliable", "risky", "unknown")
    assert (
        found["prospect"]["full_name"]
        == f"{found['prospect']['first_name']} {found['prospect']['last_name']}"
    )
    assert found["primary_email"].endswith("@" + found["company"]["domain"])
    assert set(found) == {
        "task_id",
        "status",
        "primary_email",
        "primary_email_status",
        "other_emails",
        "personal_phone_numbers",
        "prospect",
        "company",
    }


def test_task_mode_returns_one_result_with_its_workflow(sandbox: SandboxServer) -> None:
    with api(sandbox) as client:
        submitted = bulk(client, people(3)).json()
        workflow = wait_for_completion(client, submitted["workflow_id"])
        task = client.get("/enrich/status", params={"task_id": submitted["task_ids"][1]}).json()
    assert task == {**workflow["results"][1], "workflow_id": submitted["workflow_id"]}


def test_linkedin_only_contact_gets_names_from_the_slug(start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox(find_rate=1.0)
    url = "https://www.linkedin.com/in/maria-lopez-7b2a91/"
    with api(sandbox) as client:
        submitted = bulk(client, [{"linkedin_url": url}]).json()
        result = wait_for_completion(client, submitted["workflow_id"])["results"][0]
    assert result["prospect"] == {
        "first_name": "Maria",
        "last_name": "Lopez",
        "full_name": "Maria Lopez",
        "linkedin_url": url,
    }
    assert result["primary_email"] == f"maria.lopez@{result['company']['domain']}"


def test_workflow_processes_for_its_latency_then_completes(start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox(latency=0.3)
    with api(sandbox) as client:
        submitted = bulk(client, people(2)).json()
        pending = client.get("/enrich/status", params={"workflow_id": submitted["workflow_id"]}).json()
        pending_task = client.get("/enrich/status", params={"task_id": submitted["task_ids"][0]}).json()
        time.sleep(0.35)
        done = client.get("/enrich/status", params={"workflow_id": submitted["workflow_id"]}).json()
    assert pending["status"] == "processing"
    assert pending["results"] == []
    assert pending["completed_at"] is None
    assert pending["summary"]["total"] == 2
    assert pending_task["status"] == "processing"
    assert pending_task["primary_email"] is None
    assert done["status"] == "completed"
    assert len(done["results"]) == 2


def test_latency_range_is_drawn_per_workflow_from_the_seed(start_sandbox: StartSandbox) -> None:
    def latencies(sandbox: SandboxServer) -> list[float]:
        key = sandbox.state.authenticate(f"Bearer {sandbox.api_key}")
        with api(sandbox) as client:
            ids = [bulk(client, people(1, tag=str(i))).json()["workflow_id"] for i in range(6)]
        workflows = [sandbox.state.find_workflow(key, workflow_id) for workflow_id in ids]
        return [workflow.ready_at - workflow.accepted_at for workflow in workflows]

    first = latencies(start_sandbox(latency=(5.0, 10.0), seed=7))
    assert all(5.0 <= latency <= 10.0 for latency in first)
    assert len(set(first)) == 6
    # ready_at - accepted_at on the monotonic clock: equal up to float rounding of the two instants.
    assert latencies(start_sandbox(latency=(5.0, 10.0), seed=7)) == pytest.approx(first, abs=1e-6)
    assert latencies(start_sandbox(latency=(5.0, 10.0), seed=8)) != first


# --- auth ---------------------------------------------------------------------------------------------

ENDPOINT_CALLS: list[tuple[str, str, dict[str, Any]]] = [
    ("GET", "/auth/validate-key", {}),
    ("GET", "/credits/balance", {}),
    ("POST", "/enrich/bulk", {"json": {"contacts": people(1)}}),
    ("GET", "/enrich/status", {"params": {"workflow_id": "public_bulk_x"}}),
    ("GET", "/webhooks/deliveries", {"params": {"workflow_id": "public_bulk_x"}}),
]


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="missing"),
        pytest.param({"Authorization": f"Basic {DEFAULT_SANDBOX_KEY}"}, id="basic"),
        pytest.param({"X-API-Key": DEFAULT_SANDBOX_KEY}, id="x-api-key"),
        pytest.param({"Authorization": DEFAULT_SANDBOX_KEY}, id="no-scheme"),
        pytest.param({"Authorization": "Bearer clapi_" + "wrong000" * 8}, id="unknown"),
        pytest.param({"Authorization": f"Bearer {EXTENSION_KEY}"}, id="clext"),
    ],
)
def test_requests_without_a_valid_bearer_key_are_401(sandbox: SandboxServer, headers: dict[str, str]) -> None:
    with httpx.Client(base_url=sandbox.public_url, headers=headers) as client:
        for method, path, kwargs in ENDPOINT_CALLS:
            response = client.request(method, path, **kwargs)
            assert (response.status_code, response.json()) == (401, {"detail": "Not authenticated"}), path
    assert sandbox.counters()["bulk_accepted"] == 0


def test_revoked_key_is_401_until_restored(sandbox: SandboxServer) -> None:
    sandbox.revoke_key()
    with api(sandbox) as client:
        assert client.get("/auth/validate-key").status_code == 401
        assert client.get("/credits/balance").json() == {"detail": "Not authenticated"}
        sandbox.restore_key()
        assert client.get("/auth/validate-key").status_code == 200


def test_plan_without_api_access_is_403_everywhere(sandbox: SandboxServer) -> None:
    with api(sandbox, NO_API_KEY) as client:
        for method, path, kwargs in ENDPOINT_CALLS:
            response = client.request(method, path, **kwargs)
            assert response.status_code == 403, path
            assert response.json() == {"detail": "Your plan does not include API access"}


def test_keys_of_one_organization_share_balance_and_workflows(sandbox: SandboxServer) -> None:
    with api(sandbox) as main, api(sandbox, OTHER_KEY) as other:
        assert (
            main.get("/auth/validate-key").json()["user_id"]
            != other.get("/auth/validate-key").json()["user_id"]
        )
        submitted = bulk(main, people(2)).json()
        status = other.get("/enrich/status", params={"workflow_id": submitted["workflow_id"]})
        assert status.status_code == 200
        assert main.get("/credits/balance").json() == other.get("/credits/balance").json()


# --- 400, 404, 422 ------------------------------------------------------------------------------------


def test_empty_and_oversized_batches_are_400(sandbox: SandboxServer) -> None:
    with api(sandbox) as client:
        empty = bulk(client, [])
        oversized = bulk(client, people(251))
        assert bulk(client, people(250)).status_code == 200
    assert (empty.status_code, empty.json()) == (400, {"detail": "At least one contact is required."})
    assert (oversized.status_code, oversized.json()) == (
        400,
        {"detail": "Bulk enrichment supports up to 250 contacts per request."},
    )


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({}, id="neither"),
        pytest.param({"workflow_id": "public_bulk_x", "task_id": "y"}, id="both"),
    ],
)
def test_status_needs_exactly_one_id(sandbox: SandboxServer, params: dict[str, str]) -> None:
    with api(sandbox) as client:
        response = client.get("/enrich/status", params=params)
    assert (response.status_code, response.json()) == (
        400,
        {"detail": "Provide exactly one of workflow_id or task_id."},
    )


def test_unknown_ids_are_404(sandbox: SandboxServer) -> None:
    with api(sandbox) as client:
        workflow = client.get("/enrich/status", params={"workflow_id": "public_bulk_nope"})
        task = client.get("/enrich/status", params={"task_id": "3f0e5a5e-8f35-4d2b-9a51-3f5c9f1d2a11"})
        garbage_task = client.get("/enrich/status", params={"task_id": "not-a-uuid"})
        deliveries = client.get("/webhooks/deliveries", params={"workflow_id": "public_bulk_nope"})
    assert (workflow.status_code, workflow.json()) == (404, {"detail": "Workflow not found"})
    assert (task.status_code, task.json()) == (404, {"detail": "Task not found"})
    assert (garbage_task.status_code, garbage_task.json()) == (404, {"detail": "Task not found"})
    assert (deliveries.status_code, deliveries.json()) == (404, {"detail": "Workflow not found"})


def test_each_bad_contact_gets_one_422_item_at_its_index(sandbox: SandboxServer) -> None:
    contacts: list[dict[str, Any]] = [
        *people(2),
        {"first_name": "John"},
        {"linkedin_url": "https://www.linkedin.com/in/ok"},
        {"first_name": "Ann", "last_name": "Lee", "company_domain": "   ", "title": "CFO"},
        {"linkedin_url": "", "first_name": "Ann", "last_name": "Lee", "company_name": "Acme"},
        {},
    ]
    with api(sandbox) as client:
        response = bulk(client, contacts)
    assert response.status_code == 422
    assert response.json() == {
        "detail": [
            {
                "type": "value_error",
                "loc": ["body", "contacts", index],
                "msg": FIELD_RULE,
                "input": contacts[index],
            }
            for index in (2, 4, 6)
        ]
    }
    assert sandbox.counters()["bulk_accepted"] == 0


def test_malformed_bodies_get_fastapis_422(sandbox: SandboxServer) -> None:
    with api(sandbox) as client:
        broken = client.post("/enrich/bulk", content=b"{bad", headers={"content-type": "application/json"})
        wrong_types = client.post("/enrich/bulk", json={"contacts": "x", "enrichment_type": "everything"})
        wrong_field = bulk(client, [{"first_name": 3, "last_name": "Lee", "company_name": "Acme"}])
    assert broken.status_code == 422
    assert broken.json()["detail"][0]["type"] == "json_invalid"
    assert broken.json()["detail"][0]["loc"] == ["body", 1]
    assert wrong_types.status_code == 422
    assert [(error["type"], error["loc"]) for error in wrong_types.json()["detail"]] == [
        ("literal_error", ["body", "enrichment_type"]),
        ("list_type", ["body", "contacts"]),
    ]
    assert wrong_field.json()["detail"] == [
        {
            "type": "string_type",
            "loc": ["body", "contacts", 0, "first_name"],
            "msg": "Input should be a valid string",
            "input": 3,
        }
    ]


def test_checks_run_in_the_documented_order(start_sandbox: StartSandbox) -> None:
    # auth → rate limit → injected fault → 400 → 422 → 402
    sandbox = start_sandbox(
        credits=0.0, rate_limit=(2, 30.0), faults={"enrich-bulk": FaultSpec(sequence=(503, 503))}
    )
    bad_contact = {"first_name": "John"}
    with api(sandbox) as client, httpx.Client(base_url=sandbox.public_url) as anonymous:
        window_with_room(sandbox.state.clock, 30.0, room=1.0)
        assert anonymous.post("/enrich/bulk", json={"contacts": []}).status_code == 401
        assert bulk(client, []).status_code == 503  # the fault wins over the 400
        assert bulk(client, [bad_contact]).status_code == 503
        assert bulk(client, [bad_contact]).status_code == 429  # the window is spent before the fault
    sandbox = start_sandbox(credits=0.0)
    with api(sandbox) as client:
        oversized_and_bad = bulk(client, [{"first_name": 3}, *people(250)])
        bad_and_unaffordable = bulk(client, [bad_contact, *people(3)])
        assert bulk(client, people(3)).status_code == 402
    assert oversized_and_bad.status_code == 400
    assert bad_and_unaffordable.status_code == 422


# --- credits ------------------------------------------------------------------------------------------


def test_balance_below_worst_case_is_402_and_not_charged(start_sandbox: StartSandbox) -> None:
    # Full costs at most 11 per contact: 3 contacts need 33 even if little will be found.
    sandbox = start_sandbox(credits=32.0, find_rate=0.0, phone_rate=0.0)
    with api(sandbox) as client:
        refused = bulk(client, people(3), enrichment_type="full")
        balance_after = client.get("/credits/balance").json()["credits"]
        sandbox.add_credits(1.0)
        accepted = bulk(client, people(3), enrichment_type="full")
    assert (refused.status_code, refused.json()) == (402, {"detail": "Insufficient credits"})
    assert balance_after == 32.0
    assert accepted.status_code == 200
    counters = sandbox.counters()
    assert counters["bulk_accepted"] == 1
    assert counters["credits_charged"] == 0.0  # nothing found, nothing charged
    assert counters["balance"] == 33.0


def test_none_enrichment_is_free_even_with_zero_credits(start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox(credits=0.0)
    with api(sandbox) as client:
        submitted = bulk(client, people(5), enrichment_type="none")
        body = wait_for_completion(client, submitted.json()["workflow_id"])
    assert submitted.status_code == 200
    assert {result["status"] for result in body["results"]} == {"completed"}
    assert all(
        result["primary_email"] is None and not result["personal_phone_numbers"] for result in body["results"]
    )


def _expected_cost(enrichment_type: str, results: list[dict[str, Any]]) -> float:
    emails = sum(result["primary_email"] is not None for result in results)
    phones = sum(bool(result["personal_phone_numbers"]) for result in results)
    discovered = sum(result["status"] == "completed" for result in results)
    return {
        "none": 0.0,
        "partial": emails * 1.0,
        "phone_only": phones * 10.0,
        "full": emails * 1.0 + phones * 10.0,
        "prospecting_only": discovered * 1.0,
    }[enrichment_type]


@pytest.mark.parametrize("enrichment_type", ENRICHMENT_TYPES)
def test_charge_is_the_price_of_what_was_found(start_sandbox: StartSandbox, enrichment_type: str) -> None:
    sandbox = start_sandbox(credits=5000.0, find_rate=0.5, phone_rate=0.5)
    with api(sandbox) as client:
        submitted = bulk(client, people(120), enrichment_type=enrichment_type).json()
        results = wait_for_completion(client, submitted["workflow_id"])["results"]
        balance = client.get("/credits/balance").json()["credits"]
    expected = _expected_cost(enrichment_type, results)
    assert sandbox.counters()["credits_charged"] == expected
    assert balance == 5000.0 - expected
    failed = [result for result in results if result["status"] == "failed"]
    if enrichment_type != "none":
        assert failed and expected > 0, "with 120 contacts at 50% both outcomes occur"
    for result in failed:
        assert result["primary_email"] is None
        assert result["personal_phone_numbers"] == []
    if enrichment_type in ("phone_only", "prospecting_only", "none"):
        assert all(result["primary_email"] is None for result in results)
    if enrichment_type in ("partial", "prospecting_only", "none"):
        assert all(result["personal_phone_numbers"] == [] for result in results)


def test_results_are_the_same_in_every_sandbox(start_sandbox: StartSandbox) -> None:
    contacts = [*people(30), {"linkedin_url": "https://www.linkedin.com/in/sam-park"}]

    def findings(sandbox: SandboxServer) -> list[dict[str, Any]]:
        with api(sandbox) as client:
            submitted = bulk(client, contacts, enrichment_type="full").json()
            results = wait_for_completion(client, submitted["workflow_id"])["results"]
        return [{key: value for key, value in result.items() if key != "task_id"} for result in results]

    first = findings(start_sandbox(seed=1))
    second = findings(start_sandbox(seed=99))
    assert first == second
    # Reordering and case do not change a contact's answer.
    upper = {**contacts[3], "first_name": contacts[3]["first_name"].upper()}
    sandbox = start_sandbox()
    with api(sandbox) as client:
        submitted = bulk(client, [upper], enrichment_type="full").json()
        again = wait_for_completion(client, submitted["workflow_id"])["results"][0]
    assert again["primary_email"] == first[3]["primary_email"]
    assert again["personal_phone_numbers"] == first[3]["personal_phone_numbers"]


# --- rate limit ---------------------------------------------------------------------------------------


def test_fixed_window_allows_n_then_429_until_it_resets(start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox(rate_limit=(5, 2.0))
    clock = sandbox.state.clock
    with api(sandbox) as client:
        resets_at = window_with_room(clock, 2.0)
        statuses = [client.get("/credits/balance").status_code for _ in range(5)]
        before = clock()
        refused = client.get("/credits/balance")
        after = clock()
        refused_again = client.get("/credits/balance")
        # Other endpoints have their own windows, validate-key included: nothing is exempt.
        other_endpoint = client.get("/enrich/status", params={"workflow_id": "public_bulk_x"})
        validations = [client.get("/auth/validate-key").status_code for _ in range(8)]
        retry_after = int(refused.headers["Retry-After"])
        time.sleep(retry_after)
        after_reset = client.get("/credits/balance")
    assert statuses == [200] * 5
    assert (refused.status_code, refused.json()) == (429, {"detail": "Rate limit exceeded"})
    # Whole seconds until the window resets, rounded up, so waiting that long always lands after it.
    assert math.ceil(resets_at - after) <= retry_after <= math.ceil(resets_at - before)
    assert retry_after >= 1
    assert refused_again.status_code == 429
    assert other_endpoint.status_code == 404
    assert validations == [200] * 5 + [429] * 3
    assert after_reset.status_code == 200
    log = [entry for entry in sandbox.requests_log() if entry["endpoint"] == "credits-balance"]
    assert [entry["status"] for entry in log] == [200] * 5 + [429, 429, 200]
    assert log[5]["retry_after"] == retry_after


def test_retry_after_is_at_least_one_second(start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox(rate_limit=(1, 0.2))
    with api(sandbox) as client:
        window_with_room(sandbox.state.clock, 0.2, room=0.1)
        client.get("/credits/balance")
        refused = client.get("/credits/balance")
    assert (refused.status_code, refused.headers["Retry-After"]) == (429, "1")


def test_rate_limit_is_per_organization_not_per_key(start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox(rate_limit=(3, 2.0), extra_keys=(OTHER_KEY,))
    with api(sandbox) as main, api(sandbox, OTHER_KEY) as other:
        window_with_room(sandbox.state.clock, 2.0)
        statuses = [client.get("/credits/balance").status_code for client in (main, other, main, other)]
    assert statuses == [200, 200, 200, 429]


def test_rate_limit_comes_after_auth(start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox(rate_limit=(1, 30.0))
    with api(sandbox) as client, api(sandbox, "clapi_" + "unknown0" * 8) as stranger:
        assert client.get("/credits/balance").status_code == 200
        assert stranger.get("/credits/balance").status_code == 401
        assert client.get("/credits/balance").status_code == 429


# --- webhooks -----------------------------------------------------------------------------------------


def test_webhook_is_retried_until_delivered_and_every_attempt_recorded(start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox(webhook_backoff_scale=0.01, webhook_timeout=0.2, latency=0.1)
    receiver = WebhookReceiver([(500, 0.0), (200, 0.5), (200, 0.0)])  # 2nd answers too late
    with receiver.running(), api(sandbox) as client:
        submitted = bulk(client, people(3), webhook_url=receiver.url).json()
        deadline = time.monotonic() + 5
        while len(receiver.bodies) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.05)
        deliveries = client.get(
            "/webhooks/deliveries", params={"workflow_id": submitted["workflow_id"]}
        ).json()
        status = client.get("/enrich/status", params={"workflow_id": submitted["workflow_id"]}).json()
    assert deliveries["workflow_id"] == submitted["workflow_id"]
    rows = deliveries["deliveries"]
    assert [(row["attempt"], row["status"], row["response_code"]) for row in rows] == [
        (1, "failed", 500),
        (2, "failed", None),
        (3, "delivered", 200),
    ]
    assert rows[0]["error"] and rows[1]["error"] and rows[2]["error"] is None
    assert all(row["delivered_at"] for row in rows)
    payload = receiver.bodies[-1]
    assert payload == receiver.bodies[0]
    assert payload["event"] == "enrichment.completed"
    assert payload["status"] == "completed"
    assert payload["results"] == status["results"]
    assert payload["summary"] == status["summary"]
    assert payload["completed_at"] == status["completed_at"]
    assert payload["results_limit"] == 250
    assert payload["results_truncated"] == 0
    assert (
        payload["results_endpoint"] == f"/api/v1/public/enrich/status?workflow_id={submitted['workflow_id']}"
    )
    assert payload["lead_list_id"]


def test_webhook_gives_up_after_five_attempts(start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox(webhook_backoff_scale=0.01)
    receiver = WebhookReceiver([(503, 0.0)] * 10)
    with receiver.running(), api(sandbox) as client:
        submitted = bulk(client, people(1), webhook_url=receiver.url).json()
        time.sleep(0.6)  # 0.01 + 0.02 + 0.04 + 0.08 s of backoff, plus the POSTs
        rows = client.get("/webhooks/deliveries", params={"workflow_id": submitted["workflow_id"]}).json()
    assert [row["attempt"] for row in rows["deliveries"]] == [1, 2, 3, 4, 5]
    assert {row["status"] for row in rows["deliveries"]} == {"failed"}
    assert len(receiver.bodies) == 5


def test_workflow_without_webhook_has_no_deliveries(sandbox: SandboxServer) -> None:
    with api(sandbox) as client:
        submitted = bulk(client, people(1)).json()
        rows = client.get("/webhooks/deliveries", params={"workflow_id": submitted["workflow_id"]})
    assert rows.json() == {"workflow_id": submitted["workflow_id"], "deliveries": []}


# --- faults -------------------------------------------------------------------------------------------


def test_scripted_faults_answer_the_next_requests_in_order(start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox(faults={"enrich-bulk": FaultSpec(sequence=(503, 503, 500, 429), retry_after=3)})
    with api(sandbox) as client:
        responses = [bulk(client, people(2)) for _ in range(5)]
    assert [response.status_code for response in responses] == [503, 503, 500, 429, 200]
    assert responses[3].headers["Retry-After"] == "3"
    assert responses[3].json() == {"detail": "Rate limit exceeded"}
    assert "Retry-After" not in responses[0].headers
    counters = sandbox.counters()
    assert counters["requests"]["enrich-bulk"] == {"503": 2, "500": 1, "429": 1, "200": 1}
    assert counters["bulk_accepted"] == 1
    assert counters["contacts_accepted"] == 2


def test_random_faults_hit_a_seeded_share(start_sandbox: StartSandbox) -> None:
    def statuses(sandbox: SandboxServer) -> list[int]:
        with api(sandbox) as client:
            return [client.get("/credits/balance").status_code for _ in range(60)]

    spec = {"credits-balance": FaultSpec(rate=0.3, status=502)}
    first = statuses(start_sandbox(faults=spec, seed=5))
    second = statuses(start_sandbox(faults=spec, seed=5))
    assert first == second
    assert set(first) == {200, 502}
    assert 8 <= first.count(502) <= 30


def test_faulted_bulk_is_not_accepted_or_charged(start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox(find_rate=1.0, faults={"enrich-bulk": FaultSpec(rate=1.0, status=500)})
    with api(sandbox) as client:
        assert bulk(client, people(10)).status_code == 500
    counters = sandbox.counters()
    assert (counters["bulk_accepted"], counters["contacts_accepted"], counters["credits_charged"]) == (
        0,
        0,
        0.0,
    )
    sandbox.clear_faults()
    with api(sandbox) as client:
        assert bulk(client, people(10)).status_code == 200


def test_faults_can_be_replaced_at_runtime(sandbox: SandboxServer) -> None:
    sandbox.set_faults(
        {
            "enrich-status": {"sequence": [429], "retry_after": None},
            "credits-balance": FaultSpec(sequence=(504,)),
        }
    )
    with api(sandbox) as client:
        limited = client.get("/enrich/status", params={"workflow_id": "x"})
        assert "Retry-After" not in limited.headers
        assert limited.status_code == 429
        assert client.get("/credits/balance").status_code == 504
        assert client.get("/credits/balance").status_code == 200
    bad = httpx.post(
        sandbox.base_url + "/_sandbox/faults", headers=_admin(sandbox), json={"enrich-bulk": {"status": 418}}
    )
    assert bad.status_code == 422


def test_key_is_revoked_after_n_accepted_batches(start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox(revoke_after_batches=2)
    with api(sandbox) as client:
        assert bulk(client, []).status_code == 400  # refused batches do not count
        assert [bulk(client, people(1, tag=str(i))).status_code for i in range(2)] == [200, 200]
        assert bulk(client, people(1)).json() == {"detail": "Not authenticated"}
        assert client.get("/credits/balance").status_code == 401
    assert sandbox.state.is_revoked(sandbox.api_key)


def test_restoring_a_key_disarms_its_revocation(start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox(revoke_after_batches=1)
    with api(sandbox) as client:
        assert bulk(client, people(1, tag="a")).status_code == 200
        assert bulk(client, people(1, tag="b")).status_code == 401
        sandbox.restore_key()
        assert [bulk(client, people(1, tag=f"c{i}")).status_code for i in range(3)] == [200, 200, 200]
        sandbox.revoke_key()
        assert client.get("/credits/balance").status_code == 401  # an explicit revoke still works
        sandbox.restore_key(rearm=True)  # today's behaviour on request: count again from zero
        assert [bulk(client, people(1, tag=f"d{i}")).status_code for i in range(2)] == [200, 401]
    restore = httpx.post(
        sandbox.base_url + "/_sandbox/keys/restore",
        headers=_admin(sandbox),
        json={"api_key": sandbox.api_key, "rearm": False},
    )
    assert restore.json() == {"api_key": sandbox.api_key, "revoked": False}
    with api(sandbox) as client:
        assert [bulk(client, people(1, tag=f"e{i}")).status_code for i in range(2)] == [200, 200]


def test_contacts_with_a_refused_substring_get_the_field_rule_422(start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox(refuse_contacts_containing=("co7.example", "Mallory"))
    contacts: list[dict[str, Any]] = [
        *people(2),
        {"first_name": "Ann", "last_name": "Lee", "company_domain": "co7.example"},
        {"first_name": "John"},  # breaks the field rule as well: still one item
        {"linkedin_url": "https://www.linkedin.com/in/x", "note": "Mallory was here"},
        {"first_name": "Ann", "last_name": "Lee", "company_domain": "co77.example"},
        {"first_name": "Ann", "last_name": "Lee", "company_domain": "co7.examples", "x": 7},
    ]
    with api(sandbox) as client:
        response = bulk(client, contacts)
        assert response.status_code == 422
        assert response.json() == {
            "detail": [
                {
                    "type": "value_error",
                    "loc": ["body", "contacts", index],
                    "msg": FIELD_RULE,
                    "input": contacts[index],
                }
                for index in (2, 3, 4, 6)
            ]
        }
        assert bulk(client, [contacts[i] for i in (0, 1, 5)]).status_code == 200
        sandbox.refuse_contacts_containing("Lee")
        assert httpx.get(sandbox.base_url + "/_sandbox/refuse-contacts", headers=_admin(sandbox)).json() == {
            "containing": ["Lee"]
        }
        assert len(bulk(client, people(3, tag="z")).json()["detail"]) == 3
        sandbox.refuse_contacts_containing()
        assert bulk(client, people(3, tag="z")).status_code == 200
    empty = httpx.post(
        sandbox.base_url + "/_sandbox/refuse-contacts", headers=_admin(sandbox), json={"containing": [""]}
    )
    assert empty.status_code == 422
    assert sandbox.counters()["contacts_accepted"] == 6


# --- counters, log, admin -----------------------------------------------------------------------------


def test_counters_count_contacts_accepted_in_more_than_one_batch(sandbox: SandboxServer) -> None:
    linkedin = {"linkedin_url": "https://www.linkedin.com/in/Repeat-Me"}
    with api(sandbox) as client:
        bulk(client, [*people(3), linkedin, linkedin])  # repeats inside one batch are not counted
        bulk(client, [*people(2), {"linkedin_url": "HTTPS://WWW.LINKEDIN.COM/IN/REPEAT-ME"}])
        bulk(client, people(2))
        bulk(client, people(1, tag="fresh"))
    counters = sandbox.counters()
    assert counters["contacts_accepted"] == 5 + 3 + 2 + 1
    assert counters["contacts_accepted_more_than_once"] == 3  # people 0 and 1, and the LinkedIn contact
    assert counters["bulk_accepted"] == 4
    sandbox.reset()
    counters = sandbox.counters()
    assert counters["contacts_accepted"] == counters["contacts_accepted_more_than_once"] == 0
    assert sandbox.requests_log() == []


def test_request_log_records_every_answer(start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox(rate_limit=(2, 30.0))
    with api(sandbox) as client:
        bulk(client, people(4))
        bulk(client, people(251))
        bulk(client, people(7))
    log = sandbox.requests_log()
    assert [
        (entry["endpoint"], entry["status"], entry["contacts"], entry["retry_after"]) for entry in log
    ] == [
        ("enrich-bulk", 200, 4, None),
        ("enrich-bulk", 400, 251, None),
        ("enrich-bulk", 429, 7, log[2]["retry_after"]),
    ]
    assert 1 <= log[2]["retry_after"] <= 30
    assert log[0]["t"] <= log[1]["t"] <= log[2]["t"]


def test_admin_sets_and_adds_credits(sandbox: SandboxServer) -> None:
    assert sandbox.set_credits(5.5) == 5.5
    assert sandbox.add_credits(2) == 7.5
    assert (
        httpx.post(sandbox.base_url + "/_sandbox/credits", headers=_admin(sandbox), json={}).status_code
        == 400
    )
    assert (
        httpx.post(
            sandbox.base_url + "/_sandbox/keys/revoke", headers=_admin(sandbox), json={"api_key": "nope"}
        ).status_code
        == 404
    )
    with api(sandbox) as client:
        assert client.get("/credits/balance").json()["credits"] == 7.5


def test_admin_latency_brings_running_workflows_forward_and_times_new_ones(
    start_sandbox: StartSandbox,
) -> None:
    sandbox = start_sandbox(latency=60.0)
    with api(sandbox) as client:
        slow = bulk(client, people(2, "slow")).json()["workflow_id"]
        assert client.get("/enrich/status", params={"workflow_id": slow}).json()["status"] != "completed"
        assert sandbox.set_latency(0.0) == 1
        assert wait_for_completion(client, slow, timeout=2.0)["status"] == "completed"
        fast = bulk(client, people(2, "fast")).json()["workflow_id"]
        assert wait_for_completion(client, fast, timeout=2.0)["status"] == "completed"
        assert sandbox.set_latency(30.0) == 0  # nothing runs longer than 30 s from now: none moved
        late = bulk(client, people(2, "late")).json()["workflow_id"]
        assert client.get("/enrich/status", params={"workflow_id": late}).json()["status"] != "completed"


def test_admin_replaces_the_rate_limit(start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox(rate_limit=(1, 60.0))
    with api(sandbox) as client:
        assert client.get("/credits/balance").status_code == 200
        assert client.get("/credits/balance").status_code == 429
        sandbox.set_rate_limit(None)
        assert [client.get("/credits/balance").status_code for _ in range(5)] == [200] * 5
        sandbox.set_rate_limit((2, 60.0))
        assert [client.get("/credits/balance").status_code for _ in range(3)] == [200, 200, 429]
    refused = httpx.post(
        sandbox.base_url + "/_sandbox/rate-limit", headers=_admin(sandbox), json={"rate_limit": [0, 1.0]}
    )
    assert refused.status_code == 422


def test_an_accepted_contact_costs_a_few_hundred_bytes(start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox(credits=1e9)
    state = sandbox.state
    key = state.authenticate(f"Bearer {sandbox.api_key}")
    batches = [
        [ContactRecord(f"https://www.linkedin.com/in/person-{b}-{i}", "", "", "", "") for i in range(250)]
        for b in range(120)
    ]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for records in batches:
        state.accept_bulk(key, "partial", None, records)
    per_contact = (tracemalloc.get_traced_memory()[0] - before) / 30_000
    tracemalloc.stop()
    # About 320 bytes today: a million accepted contacts stay near 350 MB, well under 1 GB.
    assert per_contact < 500, f"{per_contact:.0f} bytes per accepted contact"


# --- CLI ----------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cleanlist-enrich")
    add_sandbox_parser(parser.add_subparsers(dest="command"))
    return parser


def test_cli_options_build_the_config() -> None:
    args = _parser().parse_args(
        [
            "sandbox",
            "--rate-limit", "20/2",
            "--latency", "0.5-1.5",
            "--credits", "99.5",
            "--find-rate", "0.5",
            "--no-api-access-key", NO_API_KEY,
            "--revoke-after-batches", "3",
            "--refuse-contacts-containing", "co1.example",
            "--refuse-contacts-containing", "Mallory",
            "--fault", "enrich-bulk=seq:503,503,500,429",
            "--fault", "enrich-bulk=rate:0.1:502",
            "--fault", "enrich-bulk=retry-after:4",
        ]
    )  # fmt: skip
    config = config_from_args(args)
    assert (args.host, args.port, config.api_key) == ("127.0.0.1", 8787, DEFAULT_SANDBOX_KEY)
    assert config.rate_limit == (20, 2.0)
    assert config.latency == (0.5, 1.5)
    assert config.credits == 99.5
    assert config.no_api_access_keys == (NO_API_KEY,)
    assert config.revoke_after_batches == 3
    assert config.refuse_contacts_containing == ("co1.example", "Mallory")
    assert config.faults["enrich-bulk"] == FaultSpec(
        rate=0.1, status=502, sequence=(503, 503, 500, 429), retry_after=4
    )


@pytest.mark.parametrize(
    "option",
    [
        ["--rate-limit", "60"],
        ["--rate-limit", "0/60"],
        ["--latency", "2-1"],
        ["--latency", "fast"],
        ["--find-rate", "1.5"],
        ["--api-key", "clext_abc"],
        ["--fault", "enrich-bulk=rate:2"],
        ["--fault", "bogus=seq:503"],
        ["--fault", "enrich-bulk=seq:418"],
        ["--revoke-after-batches", "0"],
        ["--refuse-contacts-containing", ""],
    ],
)
def test_cli_rejects_bad_values_in_one_line(option: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        _parser().parse_args(["sandbox", *option])
    assert exited.value.code == 2
    error_lines = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("cleanlist-enrich")
    ]
    assert len(error_lines) == 1 and "error:" in error_lines[0]


def test_cli_serves_until_interrupted(tmp_path: Path) -> None:
    script = (
        "import argparse, sys\n"
        "from cleanlist.sandbox.cli import add_sandbox_parser\n"
        "parser = argparse.ArgumentParser(prog='cleanlist-enrich')\n"
        "add_sandbox_parser(parser.add_subparsers())\n"
        "args = parser.parse_args(sys.argv[1:])\n"
        "sys.exit(args.func(args))\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script, "sandbox", "--port", "0", "--latency", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        base_url = line.split("serving at ", 1)[1].split()[0]
        headers = {"Authorization": f"Bearer {DEFAULT_SANDBOX_KEY}"}
        response = httpx.get(base_url + "/api/v1/public/auth/validate-key", headers=headers, timeout=10)
        assert response.json()["valid"] is True
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
        assert "Traceback" not in (process.stderr.read() if process.stderr else "")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_the_sandbox_key_can_come_from_the_environment_not_the_command_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import argparse

    key = "clapi_" + "e" * 64
    monkeypatch.setenv("CLEANLIST_SANDBOX_API_KEY", key)
    parser = argparse.ArgumentParser()
    add_sandbox_parser(parser.add_subparsers())
    assert config_from_args(parser.parse_args(["sandbox"])).api_key == key


def _admin(sandbox: SandboxServer) -> dict[str, str]:
    """The sandbox's admin API answers only its main key."""
    return {"Authorization": f"Bearer {sandbox.api_key}"}


def test_the_admin_api_answers_only_the_sandboxs_main_key(start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox(extra_keys=("clapi_" + "o" * 64,))
    url = sandbox.base_url + "/_sandbox/credits"
    assert httpx.post(url, json={"add": 1_000_000}).status_code == 401
    other = {"Authorization": "Bearer clapi_" + "o" * 64}  # a user of the organization, not the owner
    assert httpx.post(url, json={"add": 1_000_000}, headers=other).status_code == 401
    assert httpx.get(sandbox.base_url + "/_sandbox/requests").status_code == 401
    assert httpx.post(url, json={"add": 5}, headers=_admin(sandbox)).status_code == 200


def test_the_sandboxs_wire_words_for_enrichment_types_are_the_shared_vocabulary() -> None:
    """The request model spells the types as a Literal (FastAPI's `literal_error` on a bad one); the
    words must stay those of `cleanlist.vocab.EnrichmentType`."""
    import typing

    from cleanlist.sandbox.app import BulkRequest
    from cleanlist.vocab import EnrichmentType

    annotation = BulkRequest.model_fields["enrichment_type"].annotation
    assert set(typing.get_args(annotation)) == {member.value for member in EnrichmentType}
