"""FastAPI app factory: the five public endpoints under /api/v1/public, and the /_sandbox admin API.

Every public request takes one path (`serve`): auth → rate limit → injected fault → the endpoint's
work, and every answer is counted and logged on the way out. The request body is parsed by hand
rather than by FastAPI so that this order holds (FastAPI would answer a malformed body with 422 before
checking the key); the 422 bodies keep FastAPI's exact format. Every error is built in the documented
`{"detail": …}` shape and rewritten in one place (`_in_envelope`) when the sandbox plays the newer
`{"error": …}` envelope. The behaviour the contract leaves open, and the options that play its other
readings, are listed in `cleanlist.sandbox.state`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cleanlist.sandbox.config import (
    BulkTaskIds,
    Endpoint,
    EnrichmentType,
    ErrorEnvelope,
    FaultSpec,
    SandboxConfig,
)
from cleanlist.sandbox.contacts import ContactIn, ContactRecord
from cleanlist.sandbox.state import ApiKey, ApiRefusal, SandboxState, Workflow
from cleanlist.sandbox.webhooks import WebhookDispatcher

PUBLIC_PREFIX = "/api/v1/public"
ADMIN_PREFIX = "/_sandbox"
MAX_CONTACTS = 250
NO_CONTACTS = "At least one contact is required."
TOO_MANY_CONTACTS = "Bulk enrichment supports up to 250 contacts per request."
FIELD_RULE = (
    "Each contact must include linkedin_url OR first_name + last_name + (company_domain or company_name)."
)
EXACTLY_ONE_ID = "Provide exactly one of workflow_id or task_id."
VALIDATION_FAILED = "Request validation failed"
# The "error" envelope's code per status (401's code depends on why: see ApiRefusal.code).
ERROR_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    402: "insufficient_credits",
    403: "forbidden",
    404: "not_found",
    422: "validation_error",
    429: "rate_limit_exceeded",
    500: "internal_error",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "gateway_timeout",
}


class BulkRequest(BaseModel):
    """Body of POST /enrich/bulk."""

    model_config = ConfigDict(extra="ignore")

    # The wire's words as a Literal, as the sandbox has always validated them: an unknown type is a
    # FastAPI `literal_error` (an enum would answer `enum`); read as the shared `EnrichmentType` after.
    enrichment_type: Literal["none", "partial", "phone_only", "full", "prospecting_only"] = "partial"
    webhook_url: str | None = None
    contacts: list[ContactIn]


class CreditsChange(BaseModel):
    """Body of POST /_sandbox/credits: exactly one of add or set."""

    add: float | None = None
    set_to: float | None = Field(default=None, alias="set")


class LatencyChange(BaseModel):
    """Body of POST /_sandbox/latency: workflows take `seconds` from now on, running ones at most that."""

    model_config = ConfigDict(extra="forbid")

    seconds: float = Field(ge=0.0)


class RateLimitChange(BaseModel):
    """Body of POST /_sandbox/rate-limit: (requests, window seconds), or null for no limit."""

    model_config = ConfigDict(extra="forbid")

    rate_limit: tuple[Annotated[int, Field(ge=1)], Annotated[float, Field(gt=0.0)]] | None


class KeyRef(BaseModel):
    """Body of the key revoke/restore admin endpoints."""

    api_key: str
    rearm: bool = False
    """Restore only: arm `revoke_after_batches` again (counting from zero) instead of disarming it."""


class RefusedSubstrings(BaseModel):
    """Body of POST /_sandbox/refuse-contacts: the `refuse_contacts_containing` test facility."""

    model_config = ConfigDict(extra="forbid")

    containing: list[Annotated[str, Field(min_length=1)]]


@dataclass(frozen=True, slots=True)
class Reply:
    """A public-API answer before it becomes a response."""

    status: int
    body: Any
    retry_after: int | str | None = None
    retry_after_ms: int | None = None
    code: str | None = None
    """The "error" envelope's code when the status alone does not tell it."""

    def response(self, *, with_retry_after_ms: bool = False) -> JSONResponse:
        """The JSON response, with Retry-After when there is one (and retry-after-ms if asked for)."""
        headers: dict[str, str] = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        if with_retry_after_ms and self.status == 429 and self.retry_after_ms is not None:
            headers["retry-after-ms"] = str(self.retry_after_ms)
        return JSONResponse(self.body, status_code=self.status, headers=headers or None)


def _in_envelope(reply: Reply, envelope: ErrorEnvelope) -> Reply:
    """An error reply in the envelope the sandbox plays; the documented `{"detail": …}` is unchanged.

    The newer surface's `{"error": {"code", "message"}}`: insufficient credits is a 400 there, a 429
    carries `retry_after_ms` when its wait is known, and a 422 keeps its items under `details`.
    """
    if envelope == "detail" or reply.status < 400:
        return reply
    detail = reply.body.get("detail") if isinstance(reply.body, dict) else None
    error: dict[str, Any] = {"code": reply.code or ERROR_CODES.get(reply.status, "error")}
    if isinstance(detail, list):
        error["message"] = VALIDATION_FAILED
        error["details"] = detail
    else:
        error["message"] = str(detail)
    if reply.status == 429 and reply.retry_after_ms is not None:
        error["retry_after_ms"] = reply.retry_after_ms
    status = 400 if reply.status == 402 else reply.status
    return Reply(status, {"error": error}, reply.retry_after, reply.retry_after_ms, reply.code)


def _unprocessable(errors: list[dict[str, Any]]) -> Reply:
    """FastAPI's 422 format, exactly as its default handler renders it."""
    return Reply(422, {"detail": jsonable_encoder(errors)})


@dataclass(frozen=True, slots=True)
class _ParsedBody:
    """A bulk body after JSON decoding: the value, or the 4xx that decoding produced."""

    value: Any
    failure: Reply | None

    @property
    def contact_count(self) -> int | None:
        """Contacts sent, for the request log, whatever the outcome of the request."""
        if isinstance(self.value, dict) and isinstance(self.value.get("contacts"), list):
            return len(self.value["contacts"])
        return None


def _decode(raw: bytes) -> _ParsedBody:
    if not raw.strip():
        return _ParsedBody(
            None,
            _unprocessable([{"type": "missing", "loc": ["body"], "msg": "Field required", "input": None}]),
        )
    try:
        return _ParsedBody(json.loads(raw), None)
    except json.JSONDecodeError as exc:
        error = {"type": "json_invalid", "loc": ["body", exc.pos], "msg": "JSON decode error", "input": {}}
        return _ParsedBody(None, _unprocessable([{**error, "ctx": {"error": exc.msg}}]))
    except UnicodeDecodeError:
        # What FastAPI answers for a body it cannot even decode.
        return _ParsedBody(None, Reply(400, {"detail": "There was an error parsing the body"}))


def _accepted(workflow: Workflow, task_ids: BulkTaskIds) -> dict[str, Any]:
    """The bulk answer; `task_ids` as documented ("listed"), left out ("absent") or one short ("short")."""
    body: dict[str, Any] = {
        "workflow_id": workflow.workflow_id,
        "status": "processing",
        "message": "Bulk enrichment started",
        "task_ids": [workflow.task_id(index) for index in range(workflow.total)],
        "total_contacts": workflow.total,
    }
    if task_ids == "absent":
        del body["task_ids"]
    elif task_ids == "short":
        body["task_ids"] = body["task_ids"][:-1]
    return body


# The five endpoints are nested route functions; their branches are the contract's documented answers.
def create_app(  # noqa: C901
    config: SandboxConfig | None = None, *, state: SandboxState | None = None
) -> FastAPI:
    """Build the sandbox app around `state` (or a fresh world made from `config`)."""
    world = state if state is not None else SandboxState(config or SandboxConfig())
    webhooks = WebhookDispatcher(world)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await webhooks.close()

    app = FastAPI(title="Cleanlist Public API sandbox", version="1", lifespan=lifespan)
    app.state.sandbox = world

    def serve(
        request: Request, endpoint: Endpoint, work: Callable[[ApiKey], Reply], contacts: int | None = None
    ) -> JSONResponse:
        try:
            key = world.authenticate(request.headers.get("authorization"))
            world.admit(key, endpoint)
            reply = work(key)
        except ApiRefusal as refusal:
            reply = Reply(
                refusal.status,
                {"detail": refusal.detail},
                refusal.retry_after,
                refusal.retry_after_ms,
                refusal.code,
            )
        reply = _in_envelope(reply, world.config.error_envelope)
        world.record_request(endpoint, reply.status, contacts, reply.retry_after)
        return reply.response(with_retry_after_ms=world.config.retry_after_ms)

    public = APIRouter(prefix=PUBLIC_PREFIX)

    @public.get("/auth/validate-key")
    async def validate_key(request: Request) -> JSONResponse:
        def work(key: ApiKey) -> Reply:
            body = {
                "valid": True,
                "user_id": key.user_id,
                "organization_id": key.organization.organization_id,
            }
            return Reply(200, body)

        return serve(request, "validate-key", work)

    @public.get("/credits/balance")
    async def credits_balance(request: Request) -> JSONResponse:
        def work(key: ApiKey) -> Reply:
            return Reply(
                200, {"organization_id": key.organization.organization_id, "credits": world.balance(key)}
            )

        return serve(request, "credits-balance", work)

    @public.post("/enrich/bulk")
    async def enrich_bulk(request: Request) -> JSONResponse:
        parsed = _decode(await request.body())

        def work(key: ApiKey) -> Reply:
            if parsed.failure is not None:
                return parsed.failure
            # Size before content: an empty or oversized list is a 400 whatever its items hold.
            if parsed.contact_count == 0:
                return Reply(400, {"detail": NO_CONTACTS})
            if parsed.contact_count is not None and parsed.contact_count > MAX_CONTACTS:
                return Reply(400, {"detail": TOO_MANY_CONTACTS})
            try:
                # from_attributes is how FastAPI validates bodies; it shapes the 422 wording.
                bulk = BulkRequest.model_validate(parsed.value, from_attributes=True)
            except ValidationError as exc:
                errors = exc.errors(include_url=False)
                return _unprocessable([{**error, "loc": ("body", *error["loc"])} for error in errors])
            raw_contacts = parsed.value["contacts"]
            bad = [
                {
                    "type": "value_error",
                    "loc": ["body", "contacts", index],
                    "msg": FIELD_RULE,
                    "input": raw_contacts[index],
                }
                for index, contact in enumerate(bulk.contacts)
                if not contact.is_identifiable() or world.refuses(raw_contacts[index])
            ]
            if bad:
                return _unprocessable(bad)
            records = [ContactRecord.from_input(contact) for contact in bulk.contacts]
            workflow = world.accept_bulk(key, EnrichmentType(bulk.enrichment_type), bulk.webhook_url, records)
            if workflow.webhook_url is not None:
                webhooks.schedule(workflow)
            return Reply(200, _accepted(workflow, world.config.bulk_task_ids))

        response = serve(request, "enrich-bulk", work, parsed.contact_count)
        if world.config.bulk_answer_delay > 0:
            await asyncio.sleep(world.config.bulk_answer_delay)  # judged and recorded; the answer is late
        return response

    @public.get("/enrich/status")
    async def enrich_status(request: Request) -> JSONResponse:
        workflow_id = request.query_params.get("workflow_id")
        task_id = request.query_params.get("task_id")

        def work(key: ApiKey) -> Reply:
            if (workflow_id is None) == (task_id is None):
                return Reply(400, {"detail": EXACTLY_ONE_ID})
            if workflow_id is not None:
                workflow = world.find_workflow(key, workflow_id, status_mode=True)
                return Reply(200, world.workflow_view(workflow))
            assert task_id is not None
            workflow, index = world.find_task(key, task_id)
            return Reply(200, world.task_view(workflow, index))

        return serve(request, "enrich-status", work)

    @public.get("/webhooks/deliveries")
    async def webhook_deliveries(request: Request) -> JSONResponse:
        workflow_id = request.query_params.get("workflow_id")

        def work(key: ApiKey) -> Reply:
            if workflow_id is None:
                missing = {
                    "type": "missing",
                    "loc": ["query", "workflow_id"],
                    "msg": "Field required",
                    "input": None,
                }
                return _unprocessable([missing])
            return Reply(200, world.deliveries_view(world.find_workflow(key, workflow_id)))

        return serve(request, "webhook-deliveries", work)

    app.include_router(public)
    app.include_router(_admin_router(world))
    return app


def _admin_router(world: SandboxState) -> APIRouter:  # noqa: C901 - one nested route per test facility
    """Controls for tests and benchmarks, not part of the real API: only for the sandbox's main key (as
    `Authorization: Bearer`, whether or not it is revoked at the moment), so another local user cannot
    refill credits or read the request log."""

    def owner_only(request: Request) -> None:
        scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), world.config.api_key):
            raise HTTPException(status_code=401, detail="The sandbox's admin API needs its main key")

    admin = APIRouter(prefix=ADMIN_PREFIX, dependencies=[Depends(owner_only)])

    @admin.post("/credits")
    async def change_credits(change: CreditsChange) -> JSONResponse:
        if (change.add is None) == (change.set_to is None):
            return JSONResponse({"detail": "Provide exactly one of add or set."}, status_code=400)
        if change.add is not None:
            balance = world.add_credits(change.add)
        else:
            assert change.set_to is not None
            balance = world.set_credits(change.set_to)
        return JSONResponse({"credits": balance})

    @admin.post("/latency")
    async def change_latency(change: LatencyChange) -> JSONResponse:
        return JSONResponse({"seconds": change.seconds, "brought_forward": world.set_latency(change.seconds)})

    @admin.post("/rate-limit")
    async def change_rate_limit(change: RateLimitChange) -> JSONResponse:
        world.set_rate_limit(change.rate_limit)
        return JSONResponse({"rate_limit": change.rate_limit})

    def set_revoked(ref: KeyRef, revoked: bool) -> JSONResponse:
        if not world.set_revoked(ref.api_key, revoked, rearm=ref.rearm):
            return JSONResponse({"detail": "Unknown key"}, status_code=404)
        return JSONResponse({"api_key": ref.api_key, "revoked": revoked})

    @admin.post("/keys/revoke")
    async def revoke_key(ref: KeyRef) -> JSONResponse:
        return set_revoked(ref, True)

    @admin.post("/keys/restore")
    async def restore_key(ref: KeyRef) -> JSONResponse:
        return set_revoked(ref, False)

    def faults_body() -> dict[str, Any]:
        return {"faults": {endpoint: spec.model_dump() for endpoint, spec in world.faults().items()}}

    @admin.get("/faults")
    async def get_faults() -> JSONResponse:
        return JSONResponse(faults_body())

    @admin.post("/faults")
    async def replace_faults(faults: dict[Endpoint, FaultSpec]) -> JSONResponse:
        world.set_faults(faults)
        return JSONResponse(faults_body())

    @admin.delete("/faults")
    async def clear_faults() -> JSONResponse:
        world.set_faults({})
        return JSONResponse(faults_body())

    @admin.get("/refuse-contacts")
    async def get_refused() -> JSONResponse:
        return JSONResponse({"containing": list(world.refused_substrings())})

    @admin.post("/refuse-contacts")
    async def set_refused(body: RefusedSubstrings) -> JSONResponse:
        world.set_refused_substrings(body.containing)
        return JSONResponse({"containing": list(world.refused_substrings())})

    @admin.get("/counters")
    async def counters() -> JSONResponse:
        return JSONResponse(world.counters())

    @admin.get("/requests")
    async def requests_log() -> JSONResponse:
        return JSONResponse(world.request_log())

    @admin.post("/reset")
    async def reset() -> JSONResponse:
        world.reset()
        return JSONResponse(world.counters())

    @admin.post("/forget")
    async def forget() -> JSONResponse:
        return JSONResponse({"forgotten": world.forget()})

    return admin
