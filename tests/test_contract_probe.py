"""An independent probe of the documented contract against `cleanlist-enrich sandbox`, run as a subprocess.

Plain httpx only, no project code on the client side: status codes, bodies and headers of all five
endpoints as `../shared/CONTRACT.md` states them, 402 and 429 included.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.sandbox_helpers import WebhookReceiver

KEY = "clapi_" + "Pr0be-_x" * 8
NO_ACCESS_KEY = "clapi_" + "n0access" * 8
EXTENSION_KEY = "clext_" + "Pr0be-_x" * 8
CREDITS = 5.0
WINDOW = (20, 2)  # the probe's rate limit: 20 requests per 2 s per endpoint
FIELD_RULE = (
    "Each contact must include linkedin_url OR first_name + last_name + (company_domain or company_name)."
)
RESULT_FIELDS = {
    "task_id",
    "status",
    "primary_email",
    "primary_email_status",
    "other_emails",
    "personal_phone_numbers",
    "prospect",
    "company",
}
ROOT = Path(__file__).resolve().parent.parent


def _command() -> list[str]:
    script = Path(sys.executable).parent / "cleanlist-enrich"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from cleanlist_prefect.deployments.cli import main; sys.exit(main())"]


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    """`cleanlist-enrich sandbox …` on a free port, stopped with Ctrl-C (SIGINT) afterwards."""
    options = [
        "--port", "0",
        "--api-key", KEY,
        "--credits", str(CREDITS),
        "--rate-limit", f"{WINDOW[0]}/{WINDOW[1]}",
        "--latency", "0.3",
        "--find-rate", "1",
        "--phone-rate", "0",
        "--no-api-access-key", NO_ACCESS_KEY,
        "--webhook-backoff-scale", "0",
    ]  # fmt: skip
    process = subprocess.Popen(
        [*_command(), "sandbox", *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert "serving at " in line, (line, process.stderr.read() if process.poll() is not None else "")
        yield line.split("serving at ", 1)[1].split()[0]
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture
def api(base_url: str) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=base_url + "/api/v1/public", headers=headers, timeout=10) as client:
        yield client


def json_of(response: httpx.Response) -> Any:
    assert response.headers["content-type"] == "application/json", response.headers
    assert "retry-after" not in response.headers or response.status_code == 429
    return response.json()


def contacts(count: int) -> list[dict[str, str]]:
    tag = uuid.uuid4().hex[:6]
    return [
        {"first_name": f"Pat{i}", "last_name": f"Doe{tag}", "company_domain": f"{tag}{i}.example"}
        for i in range(count)
    ]


ENDPOINTS: list[tuple[str, str, dict[str, Any]]] = [
    ("GET", "/auth/validate-key", {}),
    ("GET", "/credits/balance", {}),
    ("POST", "/enrich/bulk", {"json": {"contacts": [{"linkedin_url": "https://www.linkedin.com/in/x"}]}}),
    ("GET", "/enrich/status", {"params": {"workflow_id": "public_bulk_x"}}),
    ("GET", "/webhooks/deliveries", {"params": {"workflow_id": "public_bulk_x"}}),
]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer clapi_" + "unknown0" * 8},
        {"Authorization": f"Basic {KEY}"},
        {"X-API-Key": KEY},
        {"Authorization": f"Bearer {EXTENSION_KEY}"},
    ],
    ids=["missing", "unknown", "basic", "x-api-key", "clext"],
)
def test_every_endpoint_answers_401_without_a_valid_bearer_key(
    base_url: str, headers: dict[str, str]
) -> None:
    with httpx.Client(base_url=base_url + "/api/v1/public", headers=headers, timeout=10) as client:
        for method, path, kwargs in ENDPOINTS:
            response = client.request(method, path, **kwargs)
            assert response.status_code == 401, path
            assert json_of(response) == {"detail": "Not authenticated"}


def test_every_endpoint_answers_403_for_a_plan_without_api_access(base_url: str) -> None:
    headers = {"Authorization": f"Bearer {NO_ACCESS_KEY}"}
    with httpx.Client(base_url=base_url + "/api/v1/public", headers=headers, timeout=10) as client:
        for method, path, kwargs in ENDPOINTS:
            response = client.request(method, path, **kwargs)
            assert response.status_code == 403, path
            assert json_of(response) == {"detail": "Your plan does not include API access"}


def test_validate_key_names_the_user_and_organization(api: httpx.Client) -> None:
    response = api.get("/auth/validate-key")
    body = json_of(response)
    assert response.status_code == 200
    assert set(body) == {"valid", "user_id", "organization_id"}
    assert body["valid"] is True
    assert body["user_id"].startswith("user_") and body["organization_id"].startswith("org_")


def test_bulk_refusals_have_the_documented_bodies(api: httpx.Client) -> None:
    empty = api.post("/enrich/bulk", json={"contacts": []})
    too_many = api.post("/enrich/bulk", json={"contacts": contacts(251)})
    bad = [*contacts(2), {"first_name": "John"}, {"linkedin_url": ""}]
    unprocessable = api.post("/enrich/bulk", json={"contacts": bad})
    unaffordable = api.post("/enrich/bulk", json={"contacts": contacts(6), "enrichment_type": "partial"})
    assert (empty.status_code, json_of(empty)) == (400, {"detail": "At least one contact is required."})
    assert (too_many.status_code, json_of(too_many)) == (
        400,
        {"detail": "Bulk enrichment supports up to 250 contacts per request."},
    )
    assert unprocessable.status_code == 422
    assert json_of(unprocessable) == {
        "detail": [
            {"type": "value_error", "loc": ["body", "contacts", i], "msg": FIELD_RULE, "input": bad[i]}
            for i in (2, 3)
        ]
    }
    # 6 contacts of `partial` can cost 6 credits; the balance is 5.
    assert (unaffordable.status_code, json_of(unaffordable)) == (402, {"detail": "Insufficient credits"})


def test_a_workflow_runs_from_submission_to_webhook(api: httpx.Client, base_url: str) -> None:
    before = json_of(api.get("/credits/balance"))
    assert set(before) == {"organization_id", "credits"} and isinstance(before["credits"], int | float)
    sent = contacts(2)
    with WebhookReceiver([(503, 0.0), (200, 0.0)]).running() as receiver:
        submitted_response = api.post(
            "/enrich/bulk", json={"contacts": sent, "enrichment_type": "partial", "webhook_url": receiver.url}
        )
        submitted = json_of(submitted_response)
        assert submitted_response.status_code == 200
        assert set(submitted) == {"workflow_id", "status", "message", "task_ids", "total_contacts"}
        assert submitted["workflow_id"].startswith("public_bulk_")
        uuid.UUID(submitted["workflow_id"].removeprefix("public_bulk_"), version=4)
        assert (submitted["status"], submitted["message"]) == ("processing", "Bulk enrichment started")
        assert submitted["total_contacts"] == 2 and len(set(submitted["task_ids"])) == 2
        workflow_id = submitted["workflow_id"]

        processing = json_of(api.get("/enrich/status", params={"workflow_id": workflow_id}))
        assert processing["status"] == "processing" and processing["results"] == []

        deadline = time.monotonic() + 5
        while True:
            listed = api.get("/webhooks/deliveries", params={"workflow_id": workflow_id})
            deliveries = json_of(listed)["deliveries"]
            if len(deliveries) >= 2:
                break
            assert time.monotonic() < deadline, deliveries
            time.sleep(0.15)
        assert listed.status_code == 200 and json_of(listed)["workflow_id"] == workflow_id

    assert [(d["attempt"], d["status"], d["response_code"]) for d in deliveries] == [
        (1, "failed", 503),
        (2, "delivered", 200),
    ]
    done_response = api.get("/enrich/status", params={"workflow_id": workflow_id})
    done = json_of(done_response)
    assert done_response.status_code == 200
    assert done["status"] == "completed" and done["enrichment_type"] == "partial"
    assert done["total_contacts"] == 2 and done["completed_at"]
    assert set(done["summary"]) == {"total", "successful", "failed", "emails_found", "phones_found"}
    assert [result["task_id"] for result in done["results"]] == submitted["task_ids"]
    for result in done["results"]:
        assert set(result) == RESULT_FIELDS
        assert result["primary_email_status"] in ("reliable", "risky", "unknown")
        assert isinstance(result["other_emails"], list) and isinstance(result["personal_phone_numbers"], list)
        assert {"first_name", "last_name", "full_name"} <= set(result["prospect"])
        assert {"name", "domain"} <= set(result["company"])
    task = json_of(api.get("/enrich/status", params={"task_id": submitted["task_ids"][1]}))
    assert task == {**done["results"][1], "workflow_id": workflow_id}

    # Partial costs 1 credit per email found, nothing else.
    after = json_of(api.get("/credits/balance"))
    assert after["credits"] == pytest.approx(before["credits"] - done["summary"]["emails_found"])

    webhook = receiver.bodies[-1]
    assert receiver.bodies[0] == webhook  # the retry carries the same payload
    assert webhook["event"] == "enrichment.completed"
    assert webhook["workflow_id"] == workflow_id and webhook["lead_list_id"]
    assert (webhook["status"], webhook["enrichment_type"]) == ("completed", "partial")
    assert (webhook["results_limit"], webhook["results_truncated"]) == (250, 0)
    assert webhook["results_endpoint"] == f"/api/v1/public/enrich/status?workflow_id={workflow_id}"
    assert webhook["results"] == done["results"] and webhook["summary"] == done["summary"]
    assert webhook["completed_at"] == done["completed_at"]


def test_status_needs_exactly_one_known_id(api: httpx.Client) -> None:
    both = api.get("/enrich/status", params={"workflow_id": "a", "task_id": "b"})
    neither = api.get("/enrich/status")
    workflow = api.get("/enrich/status", params={"workflow_id": "public_bulk_nope"})
    task = api.get("/enrich/status", params={"task_id": str(uuid.uuid4())})
    deliveries = api.get("/webhooks/deliveries", params={"workflow_id": "public_bulk_nope"})
    exactly_one = {"detail": "Provide exactly one of workflow_id or task_id."}
    assert (both.status_code, json_of(both)) == (400, exactly_one)
    assert (neither.status_code, json_of(neither)) == (400, exactly_one)
    assert (workflow.status_code, json_of(workflow)) == (404, {"detail": "Workflow not found"})
    assert (task.status_code, json_of(task)) == (404, {"detail": "Task not found"})
    assert (deliveries.status_code, json_of(deliveries)) == (404, {"detail": "Workflow not found"})


def test_a_spent_window_answers_429_with_an_integer_retry_after(api: httpx.Client) -> None:
    statuses: list[int] = []
    limited: httpx.Response | None = None
    for _ in range(3 * WINDOW[0]):
        response = api.get("/credits/balance")
        statuses.append(response.status_code)
        if response.status_code == 429:
            limited = response
            break
    assert limited is not None, statuses
    assert set(statuses[:-1]) == {200}
    assert json_of(limited) == {"detail": "Rate limit exceeded"}
    retry_after = limited.headers["retry-after"]
    assert retry_after.isdigit() and 1 <= int(retry_after) <= WINDOW[1]
    # validate-key is free of credits, not of the rate limit (nothing in the docs exempts it); the
    # other endpoints keep their own windows.
    assert 429 in {api.get("/auth/validate-key").status_code for _ in range(2 * WINDOW[0] + 1)}
    assert api.get("/enrich/status", params={"workflow_id": "public_bulk_nope"}).status_code == 404
    # Waiting Retry-After always gets through.
    time.sleep(int(retry_after))
    assert api.get("/credits/balance").status_code == 200
